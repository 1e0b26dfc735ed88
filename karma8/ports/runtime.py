"""What an actor needs of its world besides other actors: time, ids, and a way to run a
blocking call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

T = TypeVar("T")


class Clock(Protocol):
    """Wall-clock time in seconds since the epoch (virtual in the simulator)."""

    def now(self) -> float: ...


class IdSource(Protocol):
    """Unique, unguessable ids (seeded in the simulator)."""

    def new_id(self) -> str: ...

    def new_version_id(self) -> str:
        """A version's id: unique, 21 hex digits, in the order versions are created (its
        first 13 the microseconds since the epoch), so that the metadata's indexes on it
        grow at their end instead of at a random leaf each. Not a secret."""
        ...


class BlockingRunner(Protocol):
    """Runs a short blocking call (a SQLite transaction, hashing a big chunk): inline in the
    simulator; in net mode hashing goes to a worker thread, and metadata calls run inline
    and return once their commits are durable (``karma8.net.metasync``), or, on PostgreSQL,
    in worker threads, as many as the store has connections."""

    async def __call__(self, fn: Callable[[], T]) -> T: ...


class MetadataRunner(BlockingRunner, Protocol):
    """The :class:`BlockingRunner` discovery calls its store through, with one more way in."""

    async def read_ahead(self, fn: Callable[[], T]) -> T:
        """Run ``fn``, which writes nothing, and return its answer without waiting for
        earlier commits to be durable; an exception it raises is raised as ``__call__``
        raises it (once they are). For an answer that grants nothing a power loss would not
        take back with those commits (a placement lease, held in memory)."""
        ...
