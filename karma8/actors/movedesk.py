"""Discovery's side of part moves: the plans and the steps that the rebalancer and repair
ask for (:class:`karma8.ports.RebalanceAPI`), over discovery's store and its placement
leases (room a lease holds is not free for a move). A part of :class:`Discovery`
(``discovery.moves``), kept apart because moving parts is its own concern: the store's side
is :mod:`karma8.metadata.moves` and :mod:`karma8.metadata.repairs`.
"""

from __future__ import annotations

from collections.abc import Sequence

from karma8.core.errors import NotEnoughNodes
from karma8.core.leases import PlacementLeases
from karma8.core.model import MoveTicket, RebalanceStatus, Repair, RepairStatus
from karma8.core.placement import NodeLoad, place_parts
from karma8.core.rebalance import (
    MovablePart,
    Move,
    RebalancePlan,
    bytes_over_target,
    donors,
    fill_targets,
    imbalance_pp,
    plan_moves,
    spread_pp,
)
from karma8.ports import BlockingRunner, Clock, MetadataStore


class MoveDesk:
    """Implements :class:`karma8.ports.RebalanceAPI` for one discovery process."""

    def __init__(
        self,
        *,
        store: MetadataStore,
        blocking: BlockingRunner,
        clock: Clock,
        leases: PlacementLeases,
        parts: int,
    ) -> None:
        self._store = store
        self._blocking = blocking
        self._clock = clock
        self._leases = leases
        self._parts = parts  # data parts of a file (a node's fill target is at most 1/parts)

    async def plan_rebalance(
        self,
        *,
        tolerance_pp: float,
        batch: int,
        max_bytes: int | None = None,
        no_donors: frozenset[str] = frozenset(),
        no_receivers: frozenset[str] = frozenset(),
    ) -> RebalancePlan:
        """The next moves towards even filling, from up to ``batch`` parts of each node that
        may give (see :func:`karma8.core.rebalance.donors` and ``plan_moves``)."""
        parts = self._parts

        def plan() -> RebalancePlan:
            fills = self._leases.less_held(self._store.rebalance_fills())
            targets = fill_targets(fills, parts=parts)
            candidates = {
                d: self._store.movable_parts(d, limit=batch, receivers=receivers)
                for d, receivers in donors(
                    fills,
                    targets,
                    tolerance_pp=tolerance_pp,
                    no_donors=no_donors,
                    no_receivers=no_receivers,
                ).items()
            }
            moves = plan_moves(
                fills,
                candidates,
                parts=parts,
                tolerance_pp=tolerance_pp,
                max_bytes=max_bytes,
                no_donors=no_donors,
                no_receivers=no_receivers,
            )
            return RebalancePlan(fills=tuple(fills), targets=targets, moves=tuple(moves))

        return await self._blocking(plan)

    async def rebalance_status(self) -> RebalanceStatus:
        """How even the filling is and what moved so far (without the mover's rate)."""
        parts = self._parts

        def status() -> RebalanceStatus:
            fills = self._leases.less_held(self._store.rebalance_fills())
            targets = fill_targets(fills, parts=parts)
            counts = self._store.move_counts()
            live = {n.node_id: n.live for n in fills}
            return RebalanceStatus(
                spread_pp=spread_pp(fills, parts=parts),
                imbalance_pp=imbalance_pp(fills, targets),
                remaining_bytes=bytes_over_target(live, targets) + counts["moving_bytes"],
                moving_bytes=counts["moving_bytes"],
                moving_parts=counts["moving_parts"],
                moved_bytes=counts["moved_bytes"],
                moved_parts=counts["moved_parts"],
            )

        return await self._blocking(status)

    async def begin_move(self, move: Move, *, lease: float) -> MoveTicket:
        now = self._clock.now()
        return await self._blocking(
            lambda: self._store.begin_move(
                key=move.key,
                source=move.source,
                target=move.target,
                now=now,
                lease_until=now + lease,
                held=self._leases.reserved_on(move.target),
            )
        )

    async def finish_move(self, *, key: str, target: str, checksum: str) -> None:
        now = self._clock.now()
        await self._blocking(
            lambda: self._store.finish_move(key=key, target=target, checksum=checksum, now=now)
        )

    async def abort_move(self, *, key: str) -> None:
        now = self._clock.now()
        await self._blocking(lambda: self._store.abort_move(key, now))

    async def begin_repairs(self, *, repair_after: float, limit: int, lease: float) -> list[Repair]:
        """Each lost part goes where a new part would: the emptiest available node with room
        that holds no part of its version (ties broken by the part's key)."""
        now = self._clock.now()
        leases = self._leases

        def place(loads: Sequence[NodeLoad], part: MovablePart) -> str | None:
            try:
                (target,) = place_parts(
                    self._leases.with_held(loads), count=1, part_size=part.size, salt=part.key
                )
            except NotEnoughNodes:
                return None
            return target

        return await self._blocking(
            lambda: self._store.begin_repairs(
                lost_before=now - repair_after,
                limit=limit,
                now=now,
                lease_until=now + lease,
                place=place,
                held=leases.reserved_on,
            )
        )

    async def repair_status(self, *, repair_after: float) -> RepairStatus:
        lost_before = self._clock.now() - repair_after
        c = await self._blocking(lambda: self._store.repair_counts(lost_before))
        return RepairStatus(
            degraded_files=c["degraded_files"],
            lost_parts=c["lost_parts"],
            due_parts=c["due_parts"],
            unrebuildable_parts=c["unrebuildable_parts"],
            repairing_parts=c["repairing_parts"],
            repaired_parts=c["repaired_parts"],
            repaired_bytes=c["repaired_bytes"],
        )
