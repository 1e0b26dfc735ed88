"""Part moves and repair in discovery's database: each method one transaction, each step
of a move one (see :mod:`karma8.metadata.moves` and :mod:`karma8.metadata.repairs` for the
SQL and the rules; :class:`karma8.metadata.store.SqlMetadataStore` is the whole store).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs

from karma8.core.errors import MoveConflict
from karma8.core.model import MoveTicket, Repair
from karma8.core.placement import NodeLoad
from karma8.core.rebalance import MovablePart, NodeFill
from karma8.metadata import moves, repairs
from karma8.metadata.rows import load_version, node_load
from karma8.metadata.sql import Database


class MoveStore(Database):
    """The part-move and repair share of :class:`karma8.ports.MetadataStore`."""

    # -- part moves (see karma8.metadata.moves) -------------------------------------------

    def rebalance_fills(self) -> list[NodeFill]:
        with self._read() as db:
            return moves.node_fills(db)

    def movable_parts(
        self, node_id: str, *, limit: int, receivers: Sequence[str]
    ) -> list[MovablePart]:
        with self._read() as db:
            return moves.movable_parts(db, node_id, limit, receivers)

    def begin_move(
        self,
        *,
        key: str,
        source: str,
        target: str,
        now: float,
        lease_until: float,
        held: int = 0,
    ) -> MoveTicket:
        with self._tx() as db:
            return moves.begin_move(
                db,
                key=key,
                source=source,
                target=target,
                now=now,
                lease_until=lease_until,
                held=held,
            )

    def finish_move(self, *, key: str, target: str, checksum: str, now: float) -> None:
        """Switch a moved part to its copy on ``target``. Raises MoveConflict or
        IntegrityError, having aborted the move, when it cannot."""
        with self._tx() as db:
            problem = moves.finish_move(db, key=key, target=target, checksum=checksum, now=now)
        if problem is not None:
            raise problem

    def abort_move(self, key: str, now: float) -> bool:
        with self._tx() as db:
            return moves.abort_move(db, key=key, now=now)

    def expire_moves(self, now: float) -> int:
        """Abort the moves whose lease ran out (their mover died or hung)."""
        with self._tx() as db:
            expired = moves.expired_moves(db, now)
            for key in expired:
                moves.abort_move(db, key=key, now=now)
        return len(expired)

    def move_counts(self) -> dict[str, int]:
        """Moves under way and done: ``moving_parts``, ``moving_bytes``, ``moved_parts``,
        ``moved_bytes``, and ``stale_copies`` left by moves and not yet deleted."""
        with self._read() as db:
            parts, size = moves.moving(db)
            stale = db.execute("SELECT count(*) FROM stale_copies").fetchone()[0]
            return {
                "stale_copies": int(stale),
                "moving_parts": parts,
                "moving_bytes": size,
                "moved_parts": moves.counter(db, "moved_parts"),
                "moved_bytes": moves.counter(db, "moved_bytes"),
            }

    # -- repair (see karma8.metadata.repairs) ---------------------------------------------

    def mark_damaged(self, node_id: str, keys: Sequence[str], reason: str, now: float) -> int:
        with self._tx() as db:
            return repairs.mark_damaged(db, node_id, keys, reason, now)

    def forget_present(self, node_id: str, present: Sequence[str]) -> int:
        """Forget ``node_id``'s reports, made by its own parts check, that parts were missing
        on it, of those it now lists as ``present`` (a node that was away from its directory,
        a disk put back, another karma8 run on it for a while): how many. Reports of damage,
        the node's or a reader's, stay: a part that is there may be damaged still."""
        with self._read() as db:
            found = sorted(set(repairs.missing_reported(db, node_id)).intersection(present))
        if found:  # rarely: no transaction otherwise
            with self._tx() as db:
                repairs.forget_missing(db, node_id, found)
        return len(found)

    def begin_repairs(
        self,
        *,
        lost_before: float,
        limit: int,
        now: float,
        lease_until: float,
        place: Callable[[Sequence[NodeLoad], MovablePart], str | None],
        held: Callable[[str], int],
    ) -> list[Repair]:
        """Record repair moves for up to ``limit`` due parts (see
        :func:`karma8.metadata.repairs.due_parts`), each to the node ``place`` picks among
        the available ones it may go to (None: none can take it now)."""
        repaired: list[Repair] = []
        with self._tx() as db:
            loads = {
                r["node_id"]: node_load(r)
                for r in db.execute("SELECT * FROM nodes ORDER BY node_id").fetchall()
            }
            for part in repairs.due_parts(db, lost_before, limit):
                allowed = [n for n in loads.values() if n.node_id not in part.blocked]
                target = place(allowed, part)
                if target is None:
                    continue
                try:
                    ticket = moves.begin_move(
                        db,
                        key=part.key,
                        source=part.node_id,
                        target=target,
                        now=now,
                        lease_until=lease_until,
                        held=held(target),
                        kind="repair",
                    )
                except MoveConflict:
                    continue  # (checked before anything was written)
                load = loads[target]
                loads[target] = attrs.evolve(load, reserved=load.reserved + part.size)
                version = load_version(db, part.version_id)
                slot = next(p.index for p in version.parts if p.key == part.key)
                repaired.append(Repair(ticket=ticket, version=version, slot=slot))
        return repaired

    def repair_counts(self, lost_before: float) -> dict[str, int]:
        with self._read() as db:
            return repairs.counts(db, lost_before)
