"""The storage nodes discovery knows, in its database: registrations and heartbeats, the
suspicion a failed write raises, the nodes not heard from that go unavailable, and the
cluster's totals. Part of :class:`karma8.metadata.store.SqlMetadataStore`.
"""

from __future__ import annotations

from karma8.core.model import (
    ClusterTotals,
    NodeArrival,
    NodeRegistration,
    NodeState,
    NodeStatus,
)
from karma8.metadata import totals
from karma8.metadata.rows import node_status
from karma8.metadata.sql import Connection, Database


class NodeStore(Database):
    """The share of :class:`karma8.ports.MetadataStore` that keeps the nodes' rows."""

    def upsert_node(
        self,
        registration: NodeRegistration,
        now: float,
        *,
        suspect_for: float = 0.0,
    ) -> NodeArrival:
        """Record a registration or heartbeat: the node is AVAILABLE again, unless a write to
        it failed less than ``suspect_for`` seconds ago (then it stays SUSPECT). Returns the
        state it had (None: a new node) and the nodes whose address it took.

        An address is one node's: another node's record that names the same url is stale
        (its node is gone from there: a wiped disk restarted under a new id on the same port,
        say; discovery refuses the newcomer while it still hears that node there). Its
        address is cleared and the node UNAVAILABLE, so that no reader is sent to the
        newcomer for that node's parts; it has an address again when it registers from its
        own."""
        with self._tx() as db:
            displaced = _take_url(db, registration)
            before = db.execute(
                "SELECT state FROM nodes WHERE node_id = ?", (registration.node_id,)
            ).fetchone()
            db.execute(
                """
                INSERT INTO nodes(node_id, url, capacity_bytes, disk_used_bytes, state,
                                  registered_at, last_seen)
                VALUES (:id, :url, :cap, :disk, 'available', :now, :now)
                ON CONFLICT(node_id) DO UPDATE SET
                    url = excluded.url, capacity_bytes = excluded.capacity_bytes,
                    disk_used_bytes = excluded.disk_used_bytes,
                    state = CASE WHEN nodes.failed_at IS NOT NULL
                                      AND nodes.failed_at > :cleared_before
                                 THEN 'suspect' ELSE 'available' END,
                    last_seen = excluded.last_seen
                """,
                {
                    "id": registration.node_id,
                    "url": registration.url,
                    "cap": registration.capacity_bytes,
                    "disk": registration.disk_used_bytes,
                    "now": now,
                    "cleared_before": now - suspect_for,
                },
            )
        was = None if before is None else NodeState(before["state"])
        return NodeArrival(was=was, displaced=displaced)

    def mark_node_suspect(self, node_id: str, now: float) -> bool:
        """A write to the node failed because of it: no new parts until it proves healthy.

        An UNAVAILABLE node stays so (its next heartbeat decides); returns False for an
        unknown node.
        """
        with self._tx() as db:
            changed = db.execute(
                "UPDATE nodes"
                " SET failed_at = CASE WHEN failed_at > :now THEN failed_at ELSE :now END,"
                " state = CASE WHEN state = 'unavailable' THEN state ELSE 'suspect' END"
                " WHERE node_id = :id",
                {"id": node_id, "now": now},
            ).rowcount
        return changed > 0

    def mark_stale_nodes(self, seen_before: float) -> list[str]:
        with self._tx() as db:
            rows = db.execute(
                "SELECT node_id FROM nodes WHERE state != 'unavailable' AND last_seen < ?"
                " ORDER BY node_id",
                (seen_before,),
            ).fetchall()
            db.execute(
                "UPDATE nodes SET state = 'unavailable'"
                " WHERE state != 'unavailable' AND last_seen < ?",
                (seen_before,),
            )
        return [r["node_id"] for r in rows]

    def list_nodes(self) -> list[NodeStatus]:
        with self._read() as db:
            rows = db.execute("SELECT * FROM nodes ORDER BY registered_at, node_id").fetchall()
        return [node_status(r) for r in rows]

    def totals(self) -> ClusterTotals:
        with self._read() as db:
            return totals.totals(db)


def _take_url(db: Connection, registration: NodeRegistration) -> tuple[str, ...]:
    """Clear the address of the other nodes whose records name ``registration``'s url (see
    upsert_node); returns their ids."""
    url, node_id = registration.url, registration.node_id
    rows = db.execute(
        "SELECT node_id FROM nodes WHERE url = ? AND node_id != ? ORDER BY node_id",
        (url, node_id),
    ).fetchall()
    if rows:
        db.execute(
            "UPDATE nodes SET url = '', state = 'unavailable' WHERE url = ? AND node_id != ?",
            (url, node_id),
        )
    return tuple(row["node_id"] for row in rows)
