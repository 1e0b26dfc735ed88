"""A node's parts as discovery knows them, in its database: the garbage each node is to
delete and forgets once deleted, the keys it may hold (its orphan check) and those it must
hold (its check for lost parts). Part of :class:`karma8.metadata.store.SqlMetadataStore`.
"""

from __future__ import annotations

from collections.abc import Sequence

from karma8.metadata import moves, repairs
from karma8.metadata.sql import Database


class NodePartsStore(Database):
    """The share of :class:`karma8.ports.MetadataStore` that storage nodes' upkeep uses."""

    def stale_copies(self) -> list[tuple[str, str]]:
        """Every copy a move left behind, not deleted yet: (part key, node id)."""
        with self._read() as db:
            rows = db.execute(
                "SELECT part_key, node_id FROM stale_copies ORDER BY part_key, node_id"
            ).fetchall()
        return [(r["part_key"], r["node_id"]) for r in rows]

    def garbage_for_node(self, node_id: str, *, retired_before: float, limit: int) -> list[str]:
        """Up to ``limit`` keys the node should delete, sorted: parts of aborted versions,
        parts of versions retired before ``retired_before``, and copies a move left behind
        as long ago.

        Each source stops at ``limit`` rows, in index order, unsorted: a node with its
        share of garbage costs a batch, not every garbage part there is (every heartbeat
        asks, and a mass delete of small files leaves millions)."""
        with self._read() as db:
            parts = db.execute(
                """
                SELECT p.part_key FROM versions v CROSS JOIN parts p
                WHERE v.state IN ('aborted', 'retired')
                  AND (v.state = 'aborted' OR v.retired_at <= ?)
                  AND p.version_id = v.version_id AND +p.node_id = ?
                LIMIT ?
                """,
                (retired_before, node_id, limit),
            ).fetchall()
            stale = db.execute(
                "SELECT part_key FROM stale_copies WHERE node_id = ? AND released_at <= ? LIMIT ?",
                (node_id, retired_before, limit),
            ).fetchall()
        return sorted({r["part_key"] for r in parts} | {r["part_key"] for r in stale})[:limit]

    def forget_parts(self, node_id: str, keys: Sequence[str]) -> int:
        """Drop rows of garbage parts the node has deleted. Live parts are never dropped."""
        forgotten = 0
        with self._tx() as db:
            for key in keys:
                if moves.forget_stale(db, node_id, key):
                    forgotten += 1
                    continue
                row = db.execute(
                    """
                    SELECT p.version_id, p.size FROM parts p JOIN versions v USING (version_id)
                    WHERE p.part_key = ? AND p.node_id = ? AND v.state IN ('aborted', 'retired')
                    """,
                    (key, node_id),
                ).fetchone()
                if row is None:
                    continue
                db.execute("DELETE FROM parts WHERE part_key = ?", (key,))
                repairs.forget(db, key)
                db.execute(
                    "UPDATE nodes SET used_bytes = used_bytes - ?, parts = parts - 1"
                    " WHERE node_id = ?",
                    (row["size"] or 0, node_id),
                )
                remaining = db.execute(
                    "SELECT 1 FROM parts WHERE version_id = ? LIMIT 1", (row["version_id"],)
                ).fetchone()
                if remaining is None:
                    db.execute("DELETE FROM versions WHERE version_id = ?", (row["version_id"],))
                forgotten += 1
        return forgotten

    def part_keys_on_node(self, node_id: str) -> set[str]:
        """Every key discovery knows on the node: its parts, copies moving to it, and stale
        copies waiting for deletion."""
        with self._read() as db:
            return {
                r[0]
                for r in db.execute(
                    "SELECT part_key FROM parts WHERE node_id = :id"
                    " UNION SELECT part_key FROM moves WHERE target = :id"
                    " UNION SELECT part_key FROM stale_copies WHERE node_id = :id",
                    {"id": node_id},
                )
            }

    def expected_parts(self, node_id: str) -> list[str]:
        """Keys of the parts of current versions that the node holds, as discovery knows."""
        with self._read() as db:
            return [
                r[0]
                for r in db.execute(
                    "SELECT p.part_key FROM parts p JOIN versions v USING (version_id)"
                    " WHERE p.node_id = ? AND v.state = 'committed' ORDER BY p.part_key",
                    (node_id,),
                )
            ]
