"""Discovery's schema, on SQLite and PostgreSQL, and its versions.

Tables: namespaces and their tokens, nodes, versions and parts, part moves, parts reported
lost, and the leadership leases of background duties. The partial unique index
``one_committed`` makes "at most one committed version per name" a property of the schema;
node load is kept as counters on the node row (see :mod:`karma8.metadata.store`). ``moves``
holds the part copies under way (one per part at most; ``kind``: evening out fill or a
repair); ``stale_copies`` the copies a move left behind, deleted like garbage once readers are
done (see :mod:`karma8.metadata.moves`). ``tokens`` holds each token's sha256 of its secret,
never the secret (see :mod:`karma8.metadata.access`). ``damaged_parts`` holds parts their node
or a reader reported corrupt or missing, until repair moves them (see
:mod:`karma8.metadata.repairs`).

Versions: ``schema_version`` holds the number of the last migration applied; :data:`MIGRATIONS`
are applied in order, each in the transaction of :func:`upgrade`. The DDL is written for
SQLite; :func:`ddl` gives PostgreSQL's (64-bit integers, doubles, and byte-order text, so
that names sort and compare as in SQLite). A SQLite database from before versions (no
``schema_version``) is brought up to the first version by migration 1 itself.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable

import attrs

from karma8.metadata.sql import SQLITE, Connection, Dialect

SCHEMA = """
CREATE TABLE IF NOT EXISTS namespaces (
    name        TEXT PRIMARY KEY,
    created_at  REAL NOT NULL,
    enabled     INTEGER NOT NULL DEFAULT 1,
    public      INTEGER NOT NULL DEFAULT 0,
    copies      INTEGER NOT NULL DEFAULT 1,
    parity      INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS tokens (
    token_id    TEXT PRIMARY KEY,
    namespace   TEXT NOT NULL REFERENCES namespaces(name),
    can_read    INTEGER NOT NULL,
    can_write   INTEGER NOT NULL,
    secret_hash TEXT NOT NULL,
    created_at  REAL NOT NULL,
    revoked_at  REAL
);
CREATE INDEX IF NOT EXISTS tokens_by_namespace ON tokens(namespace);
CREATE TABLE IF NOT EXISTS nodes (
    node_id         TEXT PRIMARY KEY,
    url             TEXT NOT NULL,
    capacity_bytes  INTEGER NOT NULL,
    used_bytes      INTEGER NOT NULL DEFAULT 0,
    reserved_bytes  INTEGER NOT NULL DEFAULT 0,
    disk_used_bytes INTEGER NOT NULL DEFAULT 0,
    live_bytes      INTEGER NOT NULL DEFAULT 0,
    parts           INTEGER NOT NULL DEFAULT 0,
    state           TEXT NOT NULL,
    registered_at   REAL NOT NULL,
    last_seen       REAL NOT NULL,
    failed_at       REAL
);
CREATE TABLE IF NOT EXISTS versions (
    version_id    TEXT PRIMARY KEY,
    namespace     TEXT NOT NULL REFERENCES namespaces(name),
    name          TEXT NOT NULL,
    state         TEXT NOT NULL,
    size          INTEGER,
    size_hint     INTEGER,
    k             INTEGER NOT NULL,
    unit          INTEGER NOT NULL,
    copies        INTEGER NOT NULL DEFAULT 1,
    parity        INTEGER NOT NULL DEFAULT 0,
    etag          TEXT,
    created_at    REAL NOT NULL,
    expires_at    REAL NOT NULL,
    committed_at  REAL,
    retired_at    REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS one_committed
    ON versions(namespace, name) WHERE state = 'committed';
CREATE INDEX IF NOT EXISTS versions_pending ON versions(expires_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS versions_garbage
    ON versions(state, retired_at) WHERE state IN ('aborted', 'retired');
CREATE TABLE IF NOT EXISTS parts (
    version_id  TEXT NOT NULL REFERENCES versions(version_id),
    idx         INTEGER NOT NULL,
    part_key    TEXT NOT NULL UNIQUE,
    node_id     TEXT NOT NULL REFERENCES nodes(node_id),
    reserved    INTEGER NOT NULL,
    size        INTEGER,
    checksum    TEXT,
    PRIMARY KEY (version_id, idx)
);
CREATE INDEX IF NOT EXISTS parts_by_node ON parts(node_id);
CREATE TABLE IF NOT EXISTS moves (
    part_key    TEXT PRIMARY KEY,
    version_id  TEXT NOT NULL,
    source      TEXT NOT NULL REFERENCES nodes(node_id),
    target      TEXT NOT NULL REFERENCES nodes(node_id),
    size        INTEGER NOT NULL,
    started_at  REAL NOT NULL,
    lease_until REAL NOT NULL,
    kind        TEXT NOT NULL DEFAULT 'rebalance'
);
CREATE TABLE IF NOT EXISTS stale_copies (
    part_key    TEXT NOT NULL,
    node_id     TEXT NOT NULL REFERENCES nodes(node_id),
    size        INTEGER NOT NULL,
    released_at REAL NOT NULL,
    PRIMARY KEY (part_key, node_id)
);
CREATE INDEX IF NOT EXISTS stale_by_node ON stale_copies(node_id, released_at);
CREATE TABLE IF NOT EXISTS damaged_parts (
    part_key    TEXT PRIMARY KEY,
    node_id     TEXT NOT NULL REFERENCES nodes(node_id),
    reason      TEXT NOT NULL,
    reported_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


def add_missing_columns(db: sqlite3.Connection) -> None:
    """Bring a database created by an older karma8 up to the schema (columns added later)."""
    namespace_columns = {r[1] for r in db.execute("PRAGMA table_info(namespaces)")}
    if "public" not in namespace_columns:  # namespaces before access control: private
        db.execute("ALTER TABLE namespaces ADD COLUMN public INTEGER NOT NULL DEFAULT 0")
    # Engines came later: older namespaces and versions are raid0 (one copy, no parity).
    for table in ("namespaces", "versions"):
        have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
        if "copies" not in have:
            db.execute(f"ALTER TABLE {table} ADD COLUMN copies INTEGER NOT NULL DEFAULT 1")
        if "parity" not in have:
            db.execute(f"ALTER TABLE {table} ADD COLUMN parity INTEGER NOT NULL DEFAULT 0")
    if "kind" not in {r[1] for r in db.execute("PRAGMA table_info(moves)")}:
        db.execute("ALTER TABLE moves ADD COLUMN kind TEXT NOT NULL DEFAULT 'rebalance'")
    columns = {r[1] for r in db.execute("PRAGMA table_info(nodes)")}
    if "failed_at" not in columns:
        db.execute("ALTER TABLE nodes ADD COLUMN failed_at REAL")
    if "live_bytes" not in columns:
        db.execute("ALTER TABLE nodes ADD COLUMN live_bytes INTEGER NOT NULL DEFAULT 0")
        db.execute(
            """
            UPDATE nodes SET live_bytes = coalesce((
                SELECT sum(p.size) FROM parts p JOIN versions v USING (version_id)
                WHERE p.node_id = nodes.node_id AND v.state = 'committed'), 0)
            """
        )


LEADERS = """
CREATE TABLE IF NOT EXISTS leaders (
    role        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    expires_at  REAL NOT NULL
);
"""


# A node's parts check asks for its own reports (``repairs.missing_reported``) on every
# listing; without it that query scans every report of every node, which a lost disk makes
# as many as the parts it held.
DAMAGED_BY_NODE = """
CREATE INDEX IF NOT EXISTS damaged_by_node ON damaged_parts(node_id, reason);
"""


def _forgotten_at(db: Connection, dialect: Dialect) -> None:
    """When the operator forgot a node (``karma8 nodes forget``: state 'forgotten', for
    good). Not in SCHEMA: every database, new or old, gets it here (once: a SQLite database
    from before versions runs every migration, and may have it)."""
    if dialect is SQLITE:
        if "forgotten_at" in {r[1] for r in db.execute("PRAGMA table_info(nodes)")}:
            return
        db.execute("ALTER TABLE nodes ADD COLUMN forgotten_at REAL")
    else:
        db.execute(ddl("ALTER TABLE nodes ADD COLUMN IF NOT EXISTS forgotten_at REAL", dialect))


class SchemaError(Exception):
    """The database's schema is not the one this karma8 runs on (behind or ahead)."""


@attrs.frozen(kw_only=True)
class Migration:
    """One step of the schema: ``version`` is the schema's number once it is applied."""

    version: int
    what: str
    apply: Callable[[Connection, Dialect], None]


def _script(sql: str) -> Callable[[Connection, Dialect], None]:
    def apply(db: Connection, dialect: Dialect) -> None:
        for statement in sql.split(";"):
            if statement.strip():
                db.execute(ddl(statement, dialect))

    return apply


def _baseline(db: Connection, dialect: Dialect) -> None:
    _script(SCHEMA)(db, dialect)
    if dialect is SQLITE:
        assert isinstance(db, sqlite3.Connection)
        add_missing_columns(db)


MIGRATIONS = (
    Migration(version=1, what="the schema before versions", apply=_baseline),
    Migration(version=2, what="leadership leases (leaders)", apply=_script(LEADERS)),
    Migration(
        version=3,
        what="reports of damaged parts by node (damaged_by_node)",
        apply=_script(DAMAGED_BY_NODE),
    ),
    Migration(
        version=4,
        what="nodes the operator forgot (nodes.forgotten_at)",
        apply=_forgotten_at,
    ),
)
LATEST = MIGRATIONS[-1].version

_PG_TYPES = {"INTEGER": "BIGINT", "REAL": "DOUBLE PRECISION", "TEXT": 'TEXT COLLATE "C"'}


def ddl(sql: str, dialect: Dialect) -> str:
    """``sql`` (SQLite's DDL) in ``dialect``."""
    if dialect is SQLITE:
        return sql
    return re.sub(r"\b(INTEGER|REAL|TEXT)\b", lambda m: _PG_TYPES[m.group(1)], sql)


def schema_version(db: Connection, dialect: Dialect) -> int:
    """The last migration applied to ``db`` (0: none, or a SQLite database from before)."""
    if dialect is SQLITE:
        exists = "SELECT count(*) FROM sqlite_master WHERE name = 'schema_version'"
    else:
        exists = (
            "SELECT count(*) FROM information_schema.tables"
            " WHERE table_schema = current_schema() AND table_name = 'schema_version'"
        )
    if not db.execute(exists).fetchone()[0]:
        return 0
    row = db.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def upgrade(db: Connection, dialect: Dialect) -> list[Migration]:
    """Apply the migrations ``db`` lacks, in order, inside the caller's transaction; returns
    them. Raises SchemaError if the database is newer than this karma8."""
    db.execute(ddl("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER)", dialect))
    current = schema_version(db, dialect)
    if current > LATEST:
        raise SchemaError(
            f"the metadata schema is version {current}, newer than this karma8's {LATEST}:"
            " upgrade karma8"
        )
    applied = [m for m in MIGRATIONS if m.version > current]
    for migration in applied:
        migration.apply(db, dialect)
    if applied:
        db.execute("DELETE FROM schema_version")
        db.execute("INSERT INTO schema_version(version) VALUES (?)", (LATEST,))
    return applied
