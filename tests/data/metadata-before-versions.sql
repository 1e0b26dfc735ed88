-- A discovery database as karma8 c29f847 (before schema versions) left it: two namespaces, a
-- token, six nodes, a file overwritten once, another file, a part move under way. Made with
-- that commit's SqliteMetadataStore, dumped with sqlite3's iterdump.
BEGIN TRANSACTION;
CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE damaged_parts (
    part_key    TEXT PRIMARY KEY,
    node_id     TEXT NOT NULL REFERENCES nodes(node_id),
    reason      TEXT NOT NULL,
    reported_at REAL NOT NULL
);
CREATE TABLE moves (
    part_key    TEXT PRIMARY KEY,
    version_id  TEXT NOT NULL,
    source      TEXT NOT NULL REFERENCES nodes(node_id),
    target      TEXT NOT NULL REFERENCES nodes(node_id),
    size        INTEGER NOT NULL,
    started_at  REAL NOT NULL,
    lease_until REAL NOT NULL,
    kind        TEXT NOT NULL DEFAULT 'rebalance'
);
INSERT INTO "moves" VALUES('v3.0','v3','n0','n5',10,5.0,50.0,'rebalance');
CREATE TABLE namespaces (
    name        TEXT PRIMARY KEY,
    created_at  REAL NOT NULL,
    enabled     INTEGER NOT NULL DEFAULT 1,
    public      INTEGER NOT NULL DEFAULT 0,
    copies      INTEGER NOT NULL DEFAULT 1,
    parity      INTEGER NOT NULL DEFAULT 0
);
INSERT INTO "namespaces" VALUES('default',1.0,1,1,1,0);
INSERT INTO "namespaces" VALUES('team',1.0,1,0,1,0);
CREATE TABLE nodes (
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
INSERT INTO "nodes" VALUES('n0','http://n0',1000,30,0,0,20,3,'available',1.0,1.0,NULL);
INSERT INTO "nodes" VALUES('n1','http://n1',1000,30,0,0,20,3,'available',1.0,1.0,NULL);
INSERT INTO "nodes" VALUES('n2','http://n2',1000,30,0,0,20,3,'available',1.0,1.0,NULL);
INSERT INTO "nodes" VALUES('n3','http://n3',1000,30,0,0,20,3,'available',1.0,1.0,NULL);
INSERT INTO "nodes" VALUES('n4','http://n4',1000,30,0,0,20,3,'available',1.0,1.0,NULL);
INSERT INTO "nodes" VALUES('n5','http://n5',1000,0,10,0,0,0,'available',1.0,1.0,NULL);
CREATE TABLE parts (
    version_id  TEXT NOT NULL REFERENCES versions(version_id),
    idx         INTEGER NOT NULL,
    part_key    TEXT NOT NULL UNIQUE,
    node_id     TEXT NOT NULL REFERENCES nodes(node_id),
    reserved    INTEGER NOT NULL,
    size        INTEGER,
    checksum    TEXT,
    PRIMARY KEY (version_id, idx)
);
INSERT INTO "parts" VALUES('v1',0,'v1.0','n0',0,10,'c0');
INSERT INTO "parts" VALUES('v1',1,'v1.1','n1',0,10,'c1');
INSERT INTO "parts" VALUES('v1',2,'v1.2','n2',0,10,'c2');
INSERT INTO "parts" VALUES('v1',3,'v1.3','n3',0,10,'c3');
INSERT INTO "parts" VALUES('v1',4,'v1.4','n4',0,10,'c4');
INSERT INTO "parts" VALUES('v2',0,'v2.0','n0',0,10,'c0');
INSERT INTO "parts" VALUES('v2',1,'v2.1','n1',0,10,'c1');
INSERT INTO "parts" VALUES('v2',2,'v2.2','n2',0,10,'c2');
INSERT INTO "parts" VALUES('v2',3,'v2.3','n3',0,10,'c3');
INSERT INTO "parts" VALUES('v2',4,'v2.4','n4',0,10,'c4');
INSERT INTO "parts" VALUES('v3',0,'v3.0','n0',0,10,'c0');
INSERT INTO "parts" VALUES('v3',1,'v3.1','n1',0,10,'c1');
INSERT INTO "parts" VALUES('v3',2,'v3.2','n2',0,10,'c2');
INSERT INTO "parts" VALUES('v3',3,'v3.3','n3',0,10,'c3');
INSERT INTO "parts" VALUES('v3',4,'v3.4','n4',0,10,'c4');
CREATE TABLE stale_copies (
    part_key    TEXT NOT NULL,
    node_id     TEXT NOT NULL REFERENCES nodes(node_id),
    size        INTEGER NOT NULL,
    released_at REAL NOT NULL,
    PRIMARY KEY (part_key, node_id)
);
CREATE TABLE tokens (
    token_id    TEXT PRIMARY KEY,
    namespace   TEXT NOT NULL REFERENCES namespaces(name),
    can_read    INTEGER NOT NULL,
    can_write   INTEGER NOT NULL,
    secret_hash TEXT NOT NULL,
    created_at  REAL NOT NULL,
    revoked_at  REAL
);
INSERT INTO "tokens" VALUES('t1','team',1,1,'abababababababababababababababababababababababababababababababab',2.0,NULL);
CREATE TABLE versions (
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
INSERT INTO "versions" VALUES('v1','default','a/file','retired',50,50,5,4,1,0,'"efe6b1393fa14e611a3dace370715f8e"',3.0,100.0,4.0,4.0);
INSERT INTO "versions" VALUES('v2','default','a/file','committed',50,50,5,4,1,0,'"efe6b1393fa14e611a3dace370715f8e"',3.0,100.0,4.0,NULL);
INSERT INTO "versions" VALUES('v3','default','b','committed',50,50,5,4,1,0,'"efe6b1393fa14e611a3dace370715f8e"',3.0,100.0,4.0,NULL);
CREATE INDEX tokens_by_namespace ON tokens(namespace);
CREATE UNIQUE INDEX one_committed
    ON versions(namespace, name) WHERE state = 'committed';
CREATE INDEX versions_pending ON versions(expires_at) WHERE state = 'pending';
CREATE INDEX versions_garbage
    ON versions(state, retired_at) WHERE state IN ('aborted', 'retired');
CREATE INDEX parts_by_node ON parts(node_id);
CREATE INDEX stale_by_node ON stale_copies(node_id, released_at);
COMMIT;
