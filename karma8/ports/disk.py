"""A storage node's disk: the part store and its writers (``karma8.store`` implements it, and
``karma8.sim``'s memory disk)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol, runtime_checkable

import attrs

from karma8.ports.services import Appended, Loan, StoredPart


class StepRunner(Protocol):
    """Runs blocking steps in a thread before a sync that makes them durable, many writers'
    steps in one round (:class:`karma8.store.groupsync.GroupSync`)."""

    async def run_steps(self, fns: Sequence[Callable[[], None]]) -> list[BaseException | None]:
        """Run the steps in one round; what each raised, None for one that ran through."""
        ...


@attrs.frozen(kw_only=True, eq=False)
class PendingWrite:
    """A part's write begun but not run: ``step`` writes its bytes (blocking, for
    ``runner`` to run in a round with other writes' steps); ``end`` must then be called once,
    with what the step raised (None if it ran) or why it never ran, and returns the stored
    part or raises (DiskFull, StorageFailure, UploadConflict, or that exception)."""

    step: Callable[[], None]
    end: Callable[[BaseException | None], StoredPart]
    runner: StepRunner


@runtime_checkable
class WholePartStore(Protocol):
    """A :class:`PartStore` that can begin a whole part's write for a caller to run with
    others' (see :class:`WholePartWriter`)."""

    def whole_runner(self, size: int) -> StepRunner | None:
        """What runs the write of a whole part of ``size`` bytes begun by
        :meth:`begin_whole`; None if this store cannot take one that way."""
        ...

    async def begin_whole(self, key: str, data: bytes) -> PendingWrite:
        """Begin storing a whole part (``whole_runner`` says it can); raises as a writer's
        commit would (UploadConflict, DiskFull), or InvalidRequest for a bad key."""
        ...


@runtime_checkable
class LendingStore(Protocol):
    """A :class:`PartStore` that lends volumes to another process to append small parts to,
    and adopts them (:mod:`karma8.store.packed.loans`; the node's side of
    :class:`karma8.ports.LendingStorage`)."""

    async def lend(self, borrower: str) -> Loan:
        """A new volume for ``borrower``; Unavailable if this store packs no small parts."""
        ...

    def adopt(self, borrower: str, appended: Appended) -> StoredPart:
        """The needle made a part once read back and checked (NotFound, IntegrityError,
        UploadConflict, DiskFull otherwise). Blocking, but brief: one read of a needle just
        written, on the caller's thread."""
        ...

    async def give_back(self, borrower: str, volume: int, end: int) -> None:
        """End a loan (NotFound if it is not lent to ``borrower``)."""
        ...

    def end_loans(self) -> None:
        """End every loan, the borrowers gone (blocking: writes what waited for them)."""
        ...


class PartWriter(Protocol):
    """A part being written: invisible to readers until :meth:`commit`."""

    async def write(self, data: bytes) -> None: ...

    async def commit(self) -> StoredPart:
        """Make the part durable and visible; returns its size and the sha256 of its bytes,
        which the writer computes as they go to the disk (one pass with the block checks)."""
        ...

    async def discard(self) -> None:
        """Drop whatever was written. Safe to call after a failure, and more than once."""
        ...


class PartStore(Protocol):
    """A storage node's disk."""

    capacity_bytes: int

    async def create(self, key: str) -> PartWriter: ...

    def open(
        self, key: str, *, offset: int, length: int
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Read ``length`` bytes from ``offset``; raises NotFound, IntegrityError if short."""
        ...

    async def stat(self, key: str) -> StoredPart | None: ...

    async def delete(self, key: str) -> bool: ...

    async def keys(self) -> list[str]: ...

    async def used_bytes(self) -> int: ...

    async def free_bytes(self) -> int:
        """Bytes the disk under the store can still take, whatever the quota: a node's
        capacity is the smaller of its quota and what it uses plus this."""
        ...

    async def verify(self, key: str) -> bool:
        """Re-read a part; True if its bytes match its recorded checksum. Raises NotFound."""
        ...

    async def quarantine(self, key: str) -> bool:
        """Take a part out of service (kept aside for inspection); False if absent."""
        ...

    def close(self) -> None:
        """Release what the store holds open between calls (descriptors), once nothing uses
        it any more: no call may be running or come after."""
        ...
