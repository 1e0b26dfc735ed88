"""Lost parts and their repair in discovery's database.

A part of a current version is *lost* when its node is UNAVAILABLE or FORGOTTEN, or when its
node or a reader reported it corrupt or missing (``damaged_parts``, keyed by the part and the
node that lost it, so a report about a copy that has moved on since is ignored). A lost part of a
redundant version (copies or parity) is *due* for repair when it was reported, or its node has
been unavailable since before ``lost_before`` (``repair_after`` ago), and it can be rebuilt
now: enough of its version's other parts are readable (for parity, as many as the data
parts; for raid1, another copy of the same data part). One that cannot waits, without a
rebuild being tried, until a node holding parts of its version is back.

Repair is a move (:mod:`karma8.metadata.moves`) of kind ``repair`` whose bytes come from the
version's other parts instead of the source: when it finishes, the part row names the new
node, the report is forgotten and the lost copy becomes a stale copy, deleted if its node
ever comes back.

Forgetting a node (:meth:`karma8.metadata.nodes.NodeStore.forget_node`) reports each of its
current parts lost there: they are due at once, as reported ones are.
"""

from __future__ import annotations

from collections.abc import Sequence

from karma8.core.model import MISSING_ON_ITS_NODE
from karma8.core.rebalance import MovablePart
from karma8.metadata.sql import Connection

# Lost parts of current versions, one row each: on an unavailable or forgotten node (through
# parts_by_node, cheap while few nodes are down, and a forgotten one's parts move off it), or
# reported lost on the node that holds them.
LOST = """
    SELECT part_key, version_id, idx, node_id, size, last_seen, redundant, k, parity,
           max(reported) AS reported
    FROM (
        SELECT p.part_key, p.version_id, p.idx, p.node_id, p.size, n.last_seen, 0 AS reported,
               CASE WHEN v.copies > 1 OR v.parity > 0 THEN 1 ELSE 0 END AS redundant,
               v.k, v.parity
        FROM nodes n JOIN parts p USING (node_id) JOIN versions v USING (version_id)
        WHERE n.state IN ('unavailable', 'forgotten') AND v.state = 'committed'
        UNION ALL
        SELECT p.part_key, p.version_id, p.idx, p.node_id, p.size, n.last_seen, 1 AS reported,
               CASE WHEN v.copies > 1 OR v.parity > 0 THEN 1 ELSE 0 END AS redundant,
               v.k, v.parity
        FROM damaged_parts d JOIN parts p ON p.part_key = d.part_key AND p.node_id = d.node_id
        JOIN versions v ON v.version_id = p.version_id JOIN nodes n ON n.node_id = p.node_id
        WHERE v.state = 'committed'
    ) found
    GROUP BY part_key, version_id, idx, node_id, size, last_seen, redundant, k, parity
"""

# The lost parts with ``rebuildable``: 1 when a rebuild may succeed now, as many of the
# version's parts readable (on a node neither unavailable nor forgotten, not reported lost)
# as it needs: the data parts' count for parity, one other copy of the same data part for
# raid1.
LOST_REBUILDABLE = f"""
    SELECT lost.*,
           CASE WHEN redundant = 1 AND (
               SELECT count(*) FROM parts q JOIN nodes qn ON qn.node_id = q.node_id
               WHERE q.version_id = lost.version_id
                 AND qn.state NOT IN ('unavailable', 'forgotten')
                 AND (lost.parity > 0 OR q.idx % lost.k = lost.idx % lost.k)
                 AND NOT EXISTS (
                     SELECT 1 FROM damaged_parts d
                     WHERE d.part_key = q.part_key AND d.node_id = q.node_id)
           ) >= CASE WHEN lost.parity > 0 THEN lost.k ELSE 1 END
           THEN 1 ELSE 0 END AS rebuildable
    FROM ({LOST}) lost
"""


def mark_damaged(db: Connection, node_id: str, keys: Sequence[str], reason: str, now: float) -> int:
    """Record that ``node_id`` lost these parts; only parts it holds as far as discovery
    knows count. Returns how many were newly recorded. The reason is kept printable (it is
    shown in ``karma8 stat``) and at most 200 characters."""
    reason = "".join(c if c.isprintable() else "?" for c in reason[:200])
    marked = 0
    for key in keys:
        if (
            db.execute(
                "SELECT 1 FROM parts WHERE part_key = ? AND node_id = ?", (key, node_id)
            ).fetchone()
            is None
        ):
            continue
        cursor = db.execute(
            "INSERT INTO damaged_parts(part_key, node_id, reason, reported_at)"
            " VALUES (?, ?, ?, ?) ON CONFLICT(part_key) DO UPDATE SET"
            " node_id = excluded.node_id, reason = excluded.reason,"
            " reported_at = excluded.reported_at"
            " WHERE damaged_parts.node_id != excluded.node_id",
            (key, node_id, reason, now),
        )
        marked += cursor.rowcount
    return marked


def missing_reported(db: Connection, node_id: str) -> list[str]:
    """The parts ``node_id``'s own parts check reported missing there."""
    return [
        r[0]
        for r in db.execute(
            "SELECT part_key FROM damaged_parts WHERE node_id = ? AND reason = ?",
            (node_id, MISSING_ON_ITS_NODE),
        )
    ]


def forget_missing(db: Connection, node_id: str, keys: Sequence[str]) -> None:
    """Forget the node's reports that these parts were missing on it."""
    db.executemany(
        "DELETE FROM damaged_parts WHERE part_key = ? AND node_id = ? AND reason = ?",
        [(key, node_id, MISSING_ON_ITS_NODE) for key in keys],
    )


def forget(db: Connection, key: str) -> None:
    """The part moved or is gone: its report no longer applies."""
    db.execute("DELETE FROM damaged_parts WHERE part_key = ?", (key,))


def due_parts(db: Connection, lost_before: float, limit: int) -> list[MovablePart]:
    """Up to ``limit`` lost parts of redundant versions due for repair, rebuildable now and
    not moving, those reported lost first, each with the nodes it may not go to (those
    holding a part of its version, a stale copy of it or a copy on its way)."""
    rows = db.execute(
        f"""
        SELECT * FROM ({LOST_REBUILDABLE}) lost
        WHERE rebuildable = 1 AND (reported = 1 OR last_seen <= ?)
          AND NOT EXISTS (SELECT 1 FROM moves m WHERE m.part_key = lost.part_key)
        ORDER BY reported DESC, version_id, idx LIMIT ?
        """,
        (lost_before, limit),
    ).fetchall()
    parts = []
    for r in rows:
        blocked = {
            s[0]
            for s in db.execute(
                "SELECT node_id FROM parts WHERE version_id = :v"
                " UNION SELECT node_id FROM stale_copies WHERE part_key = :k"
                " UNION SELECT target FROM moves WHERE version_id = :v",
                {"v": r["version_id"], "k": r["part_key"]},
            )
        }
        parts.append(
            MovablePart(
                key=r["part_key"],
                version_id=r["version_id"],
                size=r["size"],
                node_id=r["node_id"],
                blocked=frozenset(blocked),
            )
        )
    return parts


def counts(db: Connection, lost_before: float) -> dict[str, int]:
    """``degraded_files`` (current files with a lost part, raid0 too), ``lost_parts``,
    ``due_parts`` (rebuildable now) and ``unrebuildable_parts`` (too few
    readable parts of their file, due or not) of redundant files, ``repairing_parts``,
    ``repaired_parts`` and ``repaired_bytes``."""
    degraded, lost, due, unrebuildable = db.execute(
        f"""
        SELECT count(DISTINCT version_id), coalesce(sum(redundant), 0),
               coalesce(sum(CASE WHEN rebuildable = 1 AND (reported = 1 OR last_seen <= ?)
                            THEN 1 ELSE 0 END), 0),
               coalesce(sum(CASE WHEN redundant = 1 AND rebuildable = 0
                            THEN 1 ELSE 0 END), 0)
        FROM ({LOST_REBUILDABLE}) lost
        """,
        (lost_before,),
    ).fetchone()
    (repairing,) = db.execute("SELECT count(*) FROM moves WHERE kind = 'repair'").fetchone()
    done = {
        r[0]: int(r[1])
        for r in db.execute(
            "SELECT name, value FROM counters WHERE name IN ('repaired_parts', 'repaired_bytes')"
        )
    }
    return {
        "degraded_files": int(degraded),
        "lost_parts": int(lost),
        "due_parts": int(due),
        "unrebuildable_parts": int(unrebuildable),
        "repairing_parts": int(repairing),
        "repaired_parts": done.get("repaired_parts", 0),
        "repaired_bytes": done.get("repaired_bytes", 0),
    }
