"""Part moves in discovery's database: each step one transaction, safe to crash between any two.

A move of part ``key`` from ``source`` to ``target`` goes:

1. :func:`begin_move` records it in ``moves`` with a lease and reserves its bytes on the
   target; the target's copy is known to discovery from then on (never taken for an orphan).
2. The rebalancer copies the part (outside any transaction).
3. :func:`finish_move` checks the copy's checksum against the part's and, in one
   transaction, points the part at the target and records the source's copy as *stale*.
   Readers that resolved the version before the switch still read the source's copy; it is
   deleted like garbage (heartbeat replies) ``retire_grace`` after the switch.

A move that cannot finish (its lease ran out: the rebalancer crashed or hung; the version was
retired meanwhile; the copy was wrong) is aborted: its reservation goes and the target's
copy, whole, partial or absent, becomes a stale copy to delete. A node never receives a part
while it still holds a stale copy of it, so a late deletion can never hit a live part.
"""

from __future__ import annotations

from collections.abc import Sequence

from karma8.core.errors import IntegrityError, MoveConflict
from karma8.core.model import MoveTicket, NodeRef, NodeState
from karma8.core.rebalance import MovablePart, NodeFill
from karma8.metadata.sql import Connection


def node_fills(db: Connection) -> list[NodeFill]:
    """The available nodes with capacity, their live bytes counting moves under way as done."""
    outgoing = _sum_by(db, "SELECT source, sum(size) FROM moves GROUP BY source")
    incoming = _sum_by(db, "SELECT target, sum(size) FROM moves GROUP BY target")
    rows = db.execute(
        "SELECT node_id, capacity_bytes, used_bytes, reserved_bytes, live_bytes FROM nodes"
        " WHERE state = ? AND capacity_bytes > 0 ORDER BY node_id",
        (NodeState.AVAILABLE.value,),
    ).fetchall()
    return [
        NodeFill(
            node_id=r["node_id"],
            capacity=r["capacity_bytes"],
            live=r["live_bytes"] - outgoing.get(r["node_id"], 0) + incoming.get(r["node_id"], 0),
            free=r["capacity_bytes"] - r["used_bytes"] - r["reserved_bytes"],
        )
        for r in rows
    ]


def movable_parts(
    db: Connection, node_id: str, limit: int, receivers: Sequence[str]
) -> list[MovablePart]:
    """Up to ``limit`` committed parts on ``node_id`` not already moving that at least one of
    ``receivers`` may take, each with the nodes it may not go to (those holding a part of its
    version or a stale copy of it).

    Filtering by receivers in the query matters: a receiver soon holds a part of many old
    versions, and the first parts of every donor would otherwise be the same blocked ones.
    """
    if not receivers:
        return []
    marks = _marks(receivers)
    rows = db.execute(
        f"""
        SELECT p.part_key, p.version_id, p.size FROM parts p JOIN versions v USING (version_id)
        WHERE p.node_id = ? AND v.state = 'committed' AND p.size > 0
          AND NOT EXISTS (SELECT 1 FROM moves m WHERE m.part_key = p.part_key)
          AND (SELECT count(*) FROM parts q
               WHERE q.version_id = p.version_id AND +q.node_id IN ({marks})) < ?
        LIMIT ?
        """,
        (node_id, *receivers, len(receivers), limit),
    ).fetchall()
    blocked: dict[str, set[str]] = {r["version_id"]: set() for r in rows}
    stale: dict[str, set[str]] = {}
    # Two statements for the whole batch, not two a candidate: a plan asks for hundreds.
    for versions in _chunks(list(blocked)):
        for s in db.execute(
            f"SELECT version_id, node_id FROM parts WHERE version_id IN ({_marks(versions)})",
            versions,
        ):
            blocked[s["version_id"]].add(s["node_id"])
    for keys in _chunks([r["part_key"] for r in rows]):
        for s in db.execute(
            f"SELECT part_key, node_id FROM stale_copies WHERE part_key IN ({_marks(keys)})",
            keys,
        ):
            stale.setdefault(s["part_key"], set()).add(s["node_id"])
    return [
        MovablePart(
            key=r["part_key"],
            version_id=r["version_id"],
            size=r["size"],
            node_id=node_id,
            blocked=frozenset(blocked[r["version_id"]] | stale.get(r["part_key"], set())),
        )
        for r in rows
    ]


def _marks(values: Sequence[object]) -> str:
    return ", ".join("?" * len(values))


def _chunks(values: list[str], size: int = 500) -> list[list[str]]:
    """``values`` in runs short enough for one statement's parameters on either database."""
    return [values[i : i + size] for i in range(0, len(values), size)]


def begin_move(
    db: Connection,
    *,
    key: str,
    source: str,
    target: str,
    now: float,
    lease_until: float,
    held: int = 0,
    kind: str = "rebalance",
) -> MoveTicket:
    """Record a move and reserve its bytes on the target. Raises MoveConflict when the part is
    not a committed part on ``source``, is moving already, or ``target`` may not take it
    (``held``: bytes reserved on the target outside the metadata, by placement leases). A
    ``repair`` brings the part from the version's other parts: its source may be away."""
    part = db.execute(
        """
        SELECT p.version_id, p.size, p.checksum, p.node_id, v.state
        FROM parts p JOIN versions v USING (version_id) WHERE p.part_key = ?
        """,
        (key,),
    ).fetchone()
    if part is None or part["state"] != "committed" or part["node_id"] != source:
        raise MoveConflict(f"part {key} is not a committed part on {source}")
    if db.execute("SELECT 1 FROM moves WHERE part_key = ?", (key,)).fetchone():
        raise MoveConflict(f"part {key} is moving already")
    if target == source:
        raise MoveConflict(f"part {key} is on {target} already")
    nodes = {
        r["node_id"]: r
        for r in db.execute(
            "SELECT * FROM nodes WHERE node_id IN (?, ?)", (source, target)
        ).fetchall()
    }
    node = nodes.get(target)
    if node is None or node["state"] != NodeState.AVAILABLE.value:
        raise MoveConflict(f"node {target} is not available")
    room = node["capacity_bytes"] - node["used_bytes"] - node["reserved_bytes"] - held
    if room < part["size"]:
        raise MoveConflict(f"node {target} has no room for part {key}")
    taken = db.execute(
        "SELECT 1 FROM parts WHERE version_id = :v AND +node_id = :t"
        " UNION ALL SELECT 1 FROM stale_copies WHERE part_key = :k AND node_id = :t"
        " UNION ALL SELECT 1 FROM moves WHERE version_id = :v AND target = :t",
        {"v": part["version_id"], "t": target, "k": key},
    ).fetchone()
    if taken:
        raise MoveConflict(f"node {target} holds a part of that version or a copy of {key}")
    db.execute(
        "INSERT INTO moves(part_key, version_id, source, target, size, started_at, lease_until,"
        " kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (key, part["version_id"], source, target, part["size"], now, lease_until, kind),
    )
    db.execute(
        "UPDATE nodes SET reserved_bytes = reserved_bytes + ? WHERE node_id = ?",
        (part["size"], target),
    )
    return MoveTicket(
        key=key,
        size=part["size"],
        checksum=part["checksum"],
        source=NodeRef(node_id=source, url=nodes[source]["url"]),
        target=NodeRef(node_id=target, url=node["url"]),
        lease_until=lease_until,
    )


def finish_move(
    db: Connection, *, key: str, target: str, checksum: str, now: float
) -> Exception | None:
    """Switch the part to its copy on ``target``, or abort the move: returns None when the
    part moved, else the error to raise once this transaction has committed the abort."""
    move = db.execute(
        "SELECT * FROM moves WHERE part_key = ? AND target = ?", (key, target)
    ).fetchone()
    if move is None:
        return MoveConflict(f"no move of {key} to {target} is under way (aborted?)")
    part = db.execute(
        """
        SELECT p.node_id, p.checksum, v.state FROM parts p JOIN versions v USING (version_id)
        WHERE p.part_key = ?
        """,
        (key,),
    ).fetchone()
    problem: Exception | None = None
    if move["lease_until"] <= now:
        problem = MoveConflict(f"the move of {key} outlived its lease")
    elif part is None or part["state"] != "committed" or part["node_id"] != move["source"]:
        problem = MoveConflict(f"part {key} changed while it moved (retired or deleted)")
    elif checksum != part["checksum"]:
        problem = IntegrityError(f"the copy of {key} on {target} does not match its checksum")
    if problem is not None:
        abort_move(db, key=key, now=now)
        return problem
    size = move["size"]
    db.execute("UPDATE parts SET node_id = ? WHERE part_key = ?", (target, key))
    db.execute(
        "UPDATE nodes SET reserved_bytes = reserved_bytes - :size, used_bytes = used_bytes + :size,"
        " live_bytes = live_bytes + :size, parts = parts + 1 WHERE node_id = :id",
        {"size": size, "id": target},
    )
    db.execute(
        "UPDATE nodes SET live_bytes = live_bytes - ?, parts = parts - 1 WHERE node_id = ?",
        (size, move["source"]),
    )
    db.execute(
        "INSERT INTO stale_copies(part_key, node_id, size, released_at) VALUES (?, ?, ?, ?)",
        (key, move["source"], size, now),
    )
    db.execute("DELETE FROM moves WHERE part_key = ?", (key,))
    db.execute("DELETE FROM damaged_parts WHERE part_key = ?", (key,))
    done = "repaired" if move["kind"] == "repair" else "moved"
    _count(db, f"{done}_bytes", size)
    _count(db, f"{done}_parts", 1)
    return None


def abort_move(db: Connection, *, key: str, now: float) -> bool:
    """Drop a move: release its reservation; whatever reached the target is a stale copy."""
    move = db.execute("SELECT * FROM moves WHERE part_key = ?", (key,)).fetchone()
    if move is None:
        return False
    db.execute("DELETE FROM moves WHERE part_key = ?", (key,))
    db.execute(
        "UPDATE nodes SET reserved_bytes = reserved_bytes - ? WHERE node_id = ?",
        (move["size"], move["target"]),
    )
    # Its bytes were never counted in the target's used_bytes: the stale copy weighs 0.
    db.execute(
        "INSERT INTO stale_copies(part_key, node_id, size, released_at)"
        " VALUES (?, ?, 0, ?) ON CONFLICT DO NOTHING",
        (key, move["target"], now),
    )
    return True


def expired_moves(db: Connection, now: float) -> list[str]:
    return [
        r["part_key"]
        for r in db.execute(
            "SELECT part_key FROM moves WHERE lease_until <= ? ORDER BY part_key", (now,)
        )
    ]


def forget_stale(db: Connection, node_id: str, key: str) -> bool:
    """A node deleted a stale copy: forget it and the bytes it took."""
    row = db.execute(
        "SELECT size FROM stale_copies WHERE part_key = ? AND node_id = ?", (key, node_id)
    ).fetchone()
    if row is None:
        return False
    db.execute("DELETE FROM stale_copies WHERE part_key = ? AND node_id = ?", (key, node_id))
    db.execute(
        "UPDATE nodes SET used_bytes = used_bytes - ? WHERE node_id = ?", (row["size"], node_id)
    )
    return True


def moving(db: Connection, kind: str = "rebalance") -> tuple[int, int]:
    """(parts, bytes) of the moves of ``kind`` under way."""
    row = db.execute(
        "SELECT count(*), coalesce(sum(size), 0) FROM moves WHERE kind = ?", (kind,)
    ).fetchone()
    return int(row[0]), int(row[1])


def counter(db: Connection, name: str) -> int:
    row = db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
    return 0 if row is None else int(row["value"])


def _count(db: Connection, name: str, delta: int) -> None:
    db.execute(
        "INSERT INTO counters(name, value) VALUES (?, ?)"
        " ON CONFLICT(name) DO UPDATE SET value = counters.value + excluded.value",
        (name, delta),
    )


def _sum_by(db: Connection, sql: str) -> dict[str, int]:
    return {r[0]: int(r[1]) for r in db.execute(sql)}
