"""Discovery's metadata in PostgreSQL (psycopg 3), shared by several discovery instances.

Theory of operation
-------------------
The store's logic is :mod:`karma8.metadata.store`, written in SQLite's SQL. Here a pooled
connection runs it: :func:`translate` rewrites each statement once (``?`` and ``:name``
parameters to psycopg's, SQLite's planner hints dropped) and the result is cached, and rows
read by column name and by position, as ``sqlite3.Row`` does.

Every write transaction first takes one transaction-scoped advisory lock, so writers run one
at a time across every instance, as SQLite's ``BEGIN IMMEDIATE`` makes them; the statements
after it (READ COMMITTED) see every commit before. That is what keeps placement from
reserving past a node's capacity, and a name from two committed versions (the partial unique
index ``one_committed`` guards that as well), without the store's logic knowing. Reads take
no lock and run outside transactions, one statement at a time, as SQLite's do.

The schema is not created here: ``karma8 db upgrade`` does it, and a store refuses a
database whose schema is behind or ahead (:class:`~karma8.metadata.schema.SchemaError`).

A database that cannot be reached (down, restarting, a connection cut, the pool exhausted
for its timeout) is :class:`~karma8.core.errors.Unavailable` (503), not a crash: the pool
drops a broken connection and the next call opens another.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import RowMaker
from psycopg_pool import ConnectionPool

from karma8.core.errors import Unavailable
from karma8.metadata.schema import LATEST, Migration, SchemaError, schema_version, upgrade
from karma8.metadata.sql import POSTGRESQL, Connection, Cursor, Database
from karma8.metadata.store import SqlMetadataStore

# The advisory lock every write transaction takes first ("k8" "wr" as a number).
WRITER_LOCK = 0x6B38_7772


@functools.lru_cache(maxsize=512)
def translate(sql: str) -> str:
    """A statement of the store (SQLite's SQL) in PostgreSQL's, for psycopg."""
    sql = re.sub(r"\bINDEXED BY \w+", "", sql)  # SQLite's index choice
    sql = re.sub(r"(?<=[\s(])\+(?=[A-Za-z_])", "", sql)  # ``+col``: "not this index"
    sql = sql.replace("%", "%%")
    sql = re.sub(r"(?<!:):([A-Za-z_]\w*)", r"%(\1)s", sql)
    return sql.replace("?", "%s")


class PgRow(tuple[Any, ...]):
    """A row by position and by column name."""

    names: dict[str, int]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self.names[key])
        return tuple.__getitem__(self, key)


def _rows(cursor: psycopg.Cursor[Any]) -> RowMaker[PgRow]:
    # The field names straight from libpq: ``cursor.description`` makes a Column object per
    # field and query.
    result = cursor.pgresult
    if result is None:
        return _row_class(())
    return _row_class(tuple((result.fname(i) or b"").decode() for i in range(result.nfields)))


@functools.lru_cache(maxsize=512)
def _row_class(names: tuple[str, ...]) -> type[PgRow]:
    """The row class of one result shape (made once: a class per query would cost more than
    the query's rows)."""
    index = {name: i for i, name in enumerate(names)}
    return type("Row", (PgRow,), {"names": index, "__slots__": ()})


class PgConnection:
    """A pooled psycopg connection as the store's :class:`~karma8.metadata.sql.Connection`."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, parameters: Any = None, /) -> Cursor:
        return self._conn.execute(translate(sql), parameters)

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Cursor:
        cursor = self._conn.cursor()
        cursor.executemany(translate(sql), parameters)
        return cursor


class PostgresDatabase(Database):
    """A pool of connections to discovery's PostgreSQL database."""

    dialect = POSTGRESQL

    def __init__(self, url: str, *, pool_size: int = 8, check_schema: bool = True) -> None:
        """Connect to ``url`` (``postgresql://…``) with up to ``pool_size`` connections.

        Raises:
            SchemaError: ``check_schema`` and the schema is not this karma8's (run
                ``karma8 db upgrade``).
            psycopg.OperationalError: The database cannot be reached.
        """
        self.pool_size = pool_size
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True},
            timeout=10.0,  # waiting for a connection: then Unavailable (503)
            configure=_configure,
            open=False,
        )
        self._pool.open(wait=True, timeout=30.0)
        if check_schema:
            try:
                self.check_schema()
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        self._pool.close()

    @property
    def version(self) -> int:
        """The schema's version in the database."""
        with self._read() as db:
            return schema_version(db, POSTGRESQL)

    def check_schema(self) -> None:
        """Raise SchemaError unless the database has this karma8's schema."""
        version = self.version
        if version < LATEST:
            raise SchemaError(
                f"the metadata schema is at version {version}, this karma8 needs {LATEST}:"
                " run `karma8 db upgrade` (with the same metadata_url) first"
            )
        if version > LATEST:
            raise SchemaError(
                f"the metadata schema is at version {version}, newer than this karma8's"
                f" {LATEST}: run a karma8 as new as the one that upgraded it"
            )

    def upgrade(self) -> Sequence[Migration]:
        """Bring the schema up to date, in one transaction (under the writers' lock, so two
        upgrades, or an upgrade and a writer, never interleave); the migrations applied."""
        with self._tx() as db:
            return upgrade(db, POSTGRESQL)

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with _reachable(), self._pool.connection() as conn:
            yield PgConnection(conn)

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with _reachable(), self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITER_LOCK,))
            yield PgConnection(conn)


@contextmanager
def _reachable() -> Iterator[None]:
    """PostgreSQL's connection-level failures (SQLSTATE classes 08, 53, 57, 58, and the
    pool's timeout) as :class:`Unavailable`."""
    try:
        yield
    except psycopg.OperationalError as exc:
        raise Unavailable(f"the metadata database is unavailable: {exc}") from None


def _configure(conn: psycopg.Connection[Any]) -> None:
    conn.row_factory = _rows


class PostgresMetadataStore(PostgresDatabase, SqlMetadataStore):
    """The :class:`karma8.ports.MetadataStore` on PostgreSQL."""
