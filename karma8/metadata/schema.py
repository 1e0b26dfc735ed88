"""Discovery's SQLite schema: namespaces and their tokens, nodes, versions and parts, and
part moves.

The partial unique index ``one_committed`` makes "at most one committed version per name" a
property of the schema; node load is kept as counters on the node row (see
:mod:`karma8.metadata.sqlite`). ``moves`` holds the part copies under way (one per part at
most; ``kind``: evening out fill or a repair); ``stale_copies`` the copies a move left
behind, deleted like garbage once readers are done (see :mod:`karma8.metadata.moves`).
``tokens`` holds each token's sha256 of its secret, never the secret (see
:mod:`karma8.metadata.access`). ``damaged_parts`` holds parts their node or a reader reported
corrupt or missing, until repair moves them (see :mod:`karma8.metadata.repairs`).
"""

import sqlite3

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
