"""The storage nodes discovery knows, in its database: registrations and heartbeats, the
suspicion a failed write raises, the nodes not heard from that go unavailable, those the
operator forgets for good, and the cluster's totals. Part of
:class:`karma8.metadata.store.SqlMetadataStore`.

A FORGOTTEN node keeps its row (its parts' rows name it until repair moves them) but no
state change reaches it any more: not the sweep's, not a failure report's, not a newcomer
taking its address; and it may never register or heartbeat again.
"""

from __future__ import annotations

from karma8.core.errors import NodeForgotten, NodeNotGone, NotFound
from karma8.core.model import (
    ClusterTotals,
    NodeArrival,
    NodeRegistration,
    NodeState,
    NodeStatus,
)
from karma8.metadata import repairs, totals
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
        own.

        Raises NodeForgotten, recording nothing, for a node the operator forgot."""
        with self._tx() as db:
            before = db.execute(
                "SELECT state FROM nodes WHERE node_id = ?", (registration.node_id,)
            ).fetchone()
            if before is not None and before["state"] == NodeState.FORGOTTEN.value:
                raise NodeForgotten(forgotten_message(registration.node_id))
            displaced = _take_url(db, registration)
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
        unknown or a forgotten node.
        """
        with self._tx() as db:
            changed = db.execute(
                "UPDATE nodes"
                " SET failed_at = CASE WHEN failed_at > :now THEN failed_at ELSE :now END,"
                " state = CASE WHEN state = 'unavailable' THEN state ELSE 'suspect' END"
                " WHERE node_id = :id AND state != 'forgotten'",
                {"id": node_id, "now": now},
            ).rowcount
        return changed > 0

    def mark_stale_nodes(self, seen_before: float) -> list[str]:
        with self._tx() as db:
            rows = db.execute(
                "SELECT node_id FROM nodes"
                " WHERE state NOT IN ('unavailable', 'forgotten') AND last_seen < ?"
                " ORDER BY node_id",
                (seen_before,),
            ).fetchall()
            db.execute(
                "UPDATE nodes SET state = 'unavailable'"
                " WHERE state NOT IN ('unavailable', 'forgotten') AND last_seen < ?",
                (seen_before,),
            )
        return [r["node_id"] for r in rows]

    def forget_node(self, node_id: str, now: float, *, heard_before: float) -> NodeStatus:
        """The operator declares ``node_id`` gone for good, in one transaction: it becomes
        FORGOTTEN and every part of a current version on it is reported lost there (repair
        rebuilds those of redundant files at once, without waiting for ``repair_after``;
        raid0 files with a part there are lost). Returns the node as it is then; forgetting
        a forgotten node changes nothing.

        Raises NotFound for an unknown id, NodeNotGone unless the node is UNAVAILABLE or was
        last heard before ``heard_before`` (``node_timeout`` ago: the sweep is about to mark
        it so)."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
            if row is None:
                raise NotFound(f"no storage node {node_id!r}")
            if row["state"] == NodeState.FORGOTTEN.value:
                return node_status(row)
            if row["state"] != NodeState.UNAVAILABLE.value and row["last_seen"] >= heard_before:
                ago = max(0.0, now - row["last_seen"])
                raise NodeNotGone(
                    f"node {node_id} is {row['state']}, heard {ago:.1f} s ago: only an"
                    " unavailable node can be forgotten (stop it, or wait until discovery has"
                    " not heard it for node_timeout)"
                )
            db.execute(
                "UPDATE nodes SET state = 'forgotten', forgotten_at = ? WHERE node_id = ?",
                (now, node_id),
            )
            keys = [
                r[0]
                for r in db.execute(
                    "SELECT p.part_key FROM parts p JOIN versions v USING (version_id)"
                    " WHERE p.node_id = ? AND v.state = 'committed' ORDER BY p.part_key",
                    (node_id,),
                )
            ]
            repairs.mark_damaged(db, node_id, keys, FORGOTTEN_REASON, now)
            after = db.execute("SELECT * FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
        return node_status(after)

    def list_nodes(self) -> list[NodeStatus]:
        with self._read() as db:
            rows = db.execute("SELECT * FROM nodes ORDER BY registered_at, node_id").fetchall()
        return [node_status(r) for r in rows]

    def totals(self) -> ClusterTotals:
        with self._read() as db:
            return totals.totals(db)


# Why a forgotten node's parts are lost (shown in ``karma8 stat``).
FORGOTTEN_REASON = "its node was forgotten by the operator"


def forgotten_message(node_id: str) -> str:
    """Why a forgotten node's registration or heartbeat is refused, and what to do."""
    return (
        f"node {node_id} was forgotten by the operator (karma8 nodes forget); its parts were"
        " rebuilt elsewhere or written off: wipe its directory (the one holding its node_id"
        " file) and start it as a new node"
    )


def _take_url(db: Connection, registration: NodeRegistration) -> tuple[str, ...]:
    """Clear the address of the other nodes whose records name ``registration``'s url (see
    upsert_node); returns their ids."""
    url, node_id = registration.url, registration.node_id
    rows = db.execute(
        "SELECT node_id, state FROM nodes WHERE url = ? AND node_id != ? ORDER BY node_id",
        (url, node_id),
    ).fetchall()
    if rows:
        db.execute(
            "UPDATE nodes SET url = '',"
            " state = CASE WHEN state = 'forgotten' THEN state ELSE 'unavailable' END"
            " WHERE url = ? AND node_id != ?",
            (url, node_id),
        )
    # A forgotten node is gone already: it loses the address, and nothing else.
    return tuple(row["node_id"] for row in rows if row["state"] != NodeState.FORGOTTEN.value)
