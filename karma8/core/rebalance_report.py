"""What an operator sees of rebalancing: its state, its settings, and a dry run's plan.

The rebalancer (karma8/actors/rebalancer.py) and discovery compute the numbers; this module
only shapes them for ``GET``/``POST /v1/rebalance``, ``karma8 nodes`` and ``karma8 rebalance``:

- the *state*: ``rebalancing`` (a pass runs, was just asked for, or parts are moving),
  ``balanced`` (every node is within ``start_pp`` of its fill target: the rebalancer would not
  start by itself) or ``idle`` (further off, waiting for the next check, or switched off);
- a plan's *summary*: each node's capacity, live bytes, target, and fill now and once the
  next round's moves are done, without the moves themselves (a round may hold thousands).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from karma8.core.model import RebalanceStatus
from karma8.core.rebalance import NodeFill, RebalancePlan, spread_pp

REBALANCING, BALANCED, IDLE = "rebalancing", "balanced", "idle"
STATES = (REBALANCING, BALANCED, IDLE)


@attrs.frozen(kw_only=True)
class RebalanceSettings:
    """The rebalancer's settings an operator may want to see (the throttle first)."""

    enabled: bool
    interval: float
    start_pp: float
    tolerance_pp: float
    bandwidth: float  # bytes/s for all copies together; 0: unthrottled
    concurrency: int


@attrs.frozen(kw_only=True)
class RebalanceReport:
    """``GET /v1/rebalance``: discovery's status with the mover's rate, a state, settings."""

    status: RebalanceStatus
    state: str
    settings: RebalanceSettings


def rebalance_state(status: RebalanceStatus, *, start_pp: float, requested: bool = False) -> str:
    """:data:`REBALANCING`, :data:`BALANCED` or :data:`IDLE` (see the module docstring)."""
    if requested or status.active or status.moving_parts > 0:
        return REBALANCING
    return BALANCED if status.imbalance_pp <= start_pp else IDLE


@attrs.frozen(kw_only=True)
class NodePlan:
    """A node in a dry run: its live bytes now, its target, and its live bytes ``after`` the
    next round's moves."""

    node_id: str
    capacity: int
    live: int
    target: int
    after: int

    @property
    def fill_percent(self) -> float:
        return _percent(self.live, self.capacity)

    @property
    def target_percent(self) -> float:
        return _percent(self.target, self.capacity)

    @property
    def after_percent(self) -> float:
        return _percent(self.after, self.capacity)


@attrs.frozen(kw_only=True)
class PlanSummary:
    """The next round of a rebalancing, as ``POST /v1/rebalance?dry_run=1`` answers it.

    ``remaining_bytes``: the least that must still move to reach every target (parts moving
    now included); ``spread_pp`` and ``spread_after_pp``: the fill spread now and after the
    round (see :func:`karma8.core.rebalance.spread_pp`).
    """

    nodes: tuple[NodePlan, ...]
    moves: int
    move_bytes: int
    remaining_bytes: int
    spread_pp: float
    spread_after_pp: float


def summarize_plan(plan: RebalancePlan, *, remaining_bytes: int, parts: int = 5) -> PlanSummary:
    """Each node of ``plan`` before and after its moves; the moves counted, not listed."""
    after = {n.node_id: n.live for n in plan.fills}
    for move in plan.moves:
        after[move.source] -= move.size
        after[move.target] += move.size
    moved: Sequence[NodeFill] = [attrs.evolve(n, live=after[n.node_id]) for n in plan.fills]
    return PlanSummary(
        nodes=tuple(
            NodePlan(
                node_id=n.node_id,
                capacity=n.capacity,
                live=n.live,
                target=plan.targets[n.node_id],
                after=after[n.node_id],
            )
            for n in plan.fills
        ),
        moves=len(plan.moves),
        move_bytes=plan.bytes,
        remaining_bytes=remaining_bytes,
        spread_pp=spread_pp(plan.fills, parts=parts),
        spread_after_pp=spread_pp(moved, parts=parts),
    )


def _percent(part: int, whole: int) -> float:
    return 100 * part / whole if whole > 0 else 100.0
