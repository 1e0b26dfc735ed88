"""Discovery's SQLite schema: namespaces, nodes, versions and parts.

The partial unique index ``one_committed`` makes "at most one committed version per name" a
property of the schema; node load is kept as counters on the node row (see
:mod:`karma8.metadata.sqlite`).
"""

import sqlite3

SCHEMA = """
CREATE TABLE IF NOT EXISTS namespaces (
    name        TEXT PRIMARY KEY,
    created_at  REAL NOT NULL,
    enabled     INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS nodes (
    node_id         TEXT PRIMARY KEY,
    url             TEXT NOT NULL,
    capacity_bytes  INTEGER NOT NULL,
    used_bytes      INTEGER NOT NULL DEFAULT 0,
    reserved_bytes  INTEGER NOT NULL DEFAULT 0,
    disk_used_bytes INTEGER NOT NULL DEFAULT 0,
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
"""


def add_missing_columns(db: sqlite3.Connection) -> None:
    """Bring a database created by an older karma8 up to the schema (columns added later)."""
    columns = {r[1] for r in db.execute("PRAGMA table_info(nodes)")}
    if "failed_at" not in columns:
        db.execute("ALTER TABLE nodes ADD COLUMN failed_at REAL")
