"""What the metadata store's logic needs of a database, whichever it is.

The store (:mod:`karma8.metadata.store`) is written once, in SQLite's SQL, against
:class:`Database`: ``_tx()`` opens a write transaction and ``_read()`` a connection for reads,
both yielding a :class:`Connection` (``execute``/``executemany`` with ``?`` or ``:name``
parameters, rows readable by column name and by position). SQLite (:mod:`.database`) hands
out its ``sqlite3`` connection itself, so the hot path has no layer in between; PostgreSQL
(:mod:`.postgres`) wraps a pooled connection that rewrites each statement once (parameters,
SQLite's planner hints) and caches the result.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

import attrs

# A row: its columns by name (``row["size"]``) and by position (``row[0]``).
Row = Any


class Cursor(Protocol):
    """The part of a DB-API cursor the store uses (``sqlite3.Cursor``, psycopg's)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """The part of a connection the store uses; ``sqlite3.Connection`` is one as it is."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Cursor: ...


@attrs.frozen
class Dialect:
    """Which database a store runs on: ``sqlite`` or ``postgresql``."""

    name: str


SQLITE = Dialect("sqlite")
POSTGRESQL = Dialect("postgresql")


class Database(ABC):
    """A store's database: transactions, reads, and the dialect. Subclasses implement it.

    ``_tx()`` is one transaction that sees every commit before it and that no other write
    transaction interleaves with (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: one lock that
    every writer takes first), so the store's read-decide-write steps hold on both.
    """

    dialect: Dialect

    @abstractmethod
    def _tx(self) -> AbstractContextManager[Connection]: ...

    @abstractmethod
    def _read(self) -> AbstractContextManager[Connection]: ...

    @abstractmethod
    def close(self) -> None: ...
