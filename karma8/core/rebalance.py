"""Rebalancing: the bytes each node should hold, and the part moves that get it there.

Theory of operation
-------------------
Every node should hold the same fraction of its capacity. One limit bends that: a node holds
at most one part of a file, so at most ``1/parts`` of all stored bytes. A node whose fair
share is bigger is capped at ``total/parts`` and the others share the rest by capacity
(water-filling); :func:`fill_targets` computes this.

Any rebalancer that ends at these targets must move at least the bytes each node holds above
its target (:func:`bytes_over_target`). :func:`plan_moves` moves a part only from a node above
its target to one below it, never further than a tolerance (or half a part) past either, so
each byte moves at most once and the bytes moved stay close to that minimum (parts are
discrete, hence the tolerance). One end of each move is further from its target than the
tolerance: a node more than the tolerance above its target gives to any node below its own,
and a node less above gives only to a node more than the tolerance below (a new node, say,
while the others are each a little over: together they owe it far more than the tolerance).
A part never goes to a node that holds another part of its version, or a copy of the same
part still waiting for deletion (the move's ``blocked`` nodes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs


@attrs.frozen(kw_only=True)
class NodeFill:
    """A node as the rebalancer sees it.

    ``live``: bytes of committed parts it holds, counting moves under way as done. ``free``:
    bytes its disk can still take (capacity minus everything on it and reserved for it).
    """

    node_id: str
    capacity: int
    live: int
    free: int

    @property
    def fill(self) -> float:
        return self.live / self.capacity if self.capacity > 0 else 1.0


@attrs.frozen(kw_only=True)
class MovablePart:
    """A committed part that may move, and the nodes it may not move to."""

    key: str
    version_id: str
    size: int
    node_id: str
    blocked: frozenset[str] = frozenset()


@attrs.frozen(kw_only=True)
class Move:
    """Copy part ``key`` from ``source`` to ``target``, then switch and delete the source."""

    key: str
    size: int
    source: str
    target: str


@attrs.frozen(kw_only=True)
class RebalancePlan:
    """Moves planned from the nodes' fills, and the targets they were planned towards."""

    fills: tuple[NodeFill, ...]
    targets: dict[str, int]
    moves: tuple[Move, ...]

    @property
    def bytes(self) -> int:
        return sum(m.size for m in self.moves)


def fill_targets(nodes: Sequence[NodeFill], *, parts: int = 5) -> dict[str, int]:
    """The bytes each node holds when the ``live`` bytes are spread evenly by capacity, no
    node holding more than ``1/parts`` of them (water-filling)."""
    fraction, capped, share = _water_fill(nodes, parts)
    return {
        n.node_id: round(share) if n.node_id in capped else round(fraction * n.capacity)
        for n in nodes
    }


def capped_nodes(nodes: Sequence[NodeFill], *, parts: int = 5) -> set[str]:
    """The nodes too big to fill: their target is ``1/parts`` of all live bytes."""
    return _water_fill(nodes, parts)[1]


def _water_fill(nodes: Sequence[NodeFill], parts: int) -> tuple[float, set[str], float]:
    """(fill fraction of the uncapped nodes, the capped nodes, the cap in bytes)."""
    total = sum(n.live for n in nodes)
    share = total / parts
    capped: set[str] = set()
    if len(nodes) < parts:  # no file fits at all: nothing to cap
        share = float(total)
    ordered = sorted(nodes, key=lambda n: (-n.capacity, n.node_id))
    while True:
        rest = [n for n in ordered if n.node_id not in capped]
        rest_capacity = sum(n.capacity for n in rest)
        if not rest or rest_capacity <= 0:
            return 0.0, capped, share
        fraction = (total - share * len(capped)) / rest_capacity
        if len(rest) > 1 and fraction * rest[0].capacity > share * (1 + 1e-9):
            capped.add(rest[0].node_id)
            continue
        return fraction, capped, share


def bytes_over_target(live: Mapping[str, int], targets: Mapping[str, int]) -> int:
    """The least any rebalancer must move to bring ``live`` bytes to ``targets``."""
    return sum(max(0, live[node_id] - target) for node_id, target in targets.items())


def imbalance_pp(nodes: Sequence[NodeFill], targets: Mapping[str, int]) -> float:
    """How far the node furthest from its target is, in percentage points of its capacity."""
    return max(
        (100 * abs(n.live - targets[n.node_id]) / n.capacity for n in nodes if n.capacity > 0),
        default=0.0,
    )


def spread_pp(nodes: Sequence[NodeFill], *, parts: int = 5) -> float:
    """Max - min fill, in percentage points, of the nodes that can fill: those not capped at
    ``1/parts`` of the bytes (a capped node's lower fill is the layout's, not an imbalance)."""
    capped = capped_nodes(nodes, parts=parts)
    fills = [100 * n.fill for n in nodes if n.capacity > 0 and n.node_id not in capped]
    return max(fills) - min(fills) if fills else 0.0


def donors(
    nodes: Sequence[NodeFill],
    targets: Mapping[str, int],
    *,
    tolerance_pp: float,
    no_donors: frozenset[str] = frozenset(),
    no_receivers: frozenset[str] = frozenset(),
) -> dict[str, list[str]]:
    """The nodes that may give parts, each with the nodes it may give to: a node more than
    ``tolerance_pp`` above its target gives to any node below its own, and one less above to
    the nodes more than ``tolerance_pp`` below theirs (see :func:`plan_moves`)."""
    live = {n.node_id: n.live for n in nodes}
    slack = {n.node_id: _slack(n, tolerance_pp) for n in nodes}
    below = [r for r in live if live[r] < targets[r] and r not in no_receivers]
    short = [r for r in below if targets[r] - live[r] > slack[r]]
    gives = {
        d: below if live[d] - targets[d] > slack[d] else short
        for d in live
        if live[d] > targets[d] and d not in no_donors
    }
    return {d: receivers for d, receivers in gives.items() if receivers}


def _slack(node: NodeFill, tolerance_pp: float) -> float:
    return tolerance_pp / 100 * node.capacity


def plan_moves(
    nodes: Sequence[NodeFill],
    candidates: Mapping[str, Sequence[MovablePart]],
    *,
    parts: int = 5,
    tolerance_pp: float = 0.5,
    max_bytes: int | None = None,
    no_donors: frozenset[str] = frozenset(),
    no_receivers: frozenset[str] = frozenset(),
) -> list[Move]:
    """Moves that bring every node within ``tolerance_pp`` of its target, as far as the
    ``candidates`` (movable parts, by the node holding them) allow.

    The donor furthest over its target gives next, its biggest part first, to the node furthest
    below its target that may take it. A donor is a node more than the tolerance over its
    target, giving to any node below its own; or, while some node that may take is more than
    the tolerance below its target, any node over its target, giving only to such a node (so
    nodes each a little over still fill a new node, and nodes within the tolerance trade no
    parts among themselves). A part moves only if the two nodes' squared distances from their
    targets shrink (so plans applied in turn end), the donor ends no further below its target
    than the tolerance, and the receiver no further above it than half the part (half a part
    either way when parts are big against a node). Receivers are not filled past that: new
    files keep landing on the emptiest nodes while parts move. ``max_bytes`` caps
    the plan; ``no_donors`` and ``no_receivers`` keep nodes to one direction (a caller
    rebalancing in rounds keeps each node's first role, so no byte moves back and forth).
    """
    targets = fill_targets(nodes, parts=parts)
    by_id = {n.node_id: n for n in nodes}
    load = {n.node_id: n.live for n in nodes}
    free = {n.node_id: n.free for n in nodes}
    slack = {n.node_id: _slack(n, tolerance_pp) for n in nodes}

    def excess(node_id: str) -> float:
        return load[node_id] - targets[node_id]

    def room(node_id: str) -> float:
        return targets[node_id] - load[node_id]

    def fraction_over(node_id: str) -> float:
        return excess(node_id) / max(by_id[node_id].capacity, 1)

    def over(node_id: str) -> bool:  # gives to any node below its target
        return excess(node_id) > slack[node_id]

    def short(node_id: str) -> bool:  # takes from any node above its target
        return room(node_id) > slack[node_id]

    # Each donor's parts, biggest first; the donor furthest over its target gives next.
    queues = {
        d: sorted(candidates.get(d, ()), key=lambda p: (p.size, p.key))
        for d in donors(
            nodes,
            targets,
            tolerance_pp=tolerance_pp,
            no_donors=no_donors,
            no_receivers=no_receivers,
        )
    }
    moves: list[Move] = []
    planned = 0
    gained: dict[str, set[str]] = {}  # version id -> nodes this plan gives one of its parts
    gave: set[str] = set()
    took: set[str] = set()
    while True:
        wanted = any(short(r) for r in load if r not in no_receivers)
        giving = [
            d
            for d, queue in queues.items()
            if queue and d not in took and (over(d) or (wanted and excess(d) > 0))
        ]
        if not giving:
            return moves
        donor = max(giving, key=lambda d: (fraction_over(d), d))
        part = queues[donor].pop()
        # A move leaves the donor at most the tolerance (or half the part, for parts big
        # against a node) below its target, and the receiver at most half the part above.
        if part.size <= 0 or part.size > excess(donor) + max(slack[donor], part.size / 2):
            continue
        if max_bytes is not None and planned + part.size > max_bytes:
            return moves
        receivers = [
            node_id
            for node_id in load
            if node_id != donor
            and node_id not in no_receivers
            and node_id not in gave
            and node_id not in part.blocked
            and node_id not in gained.get(part.version_id, ())
            and room(node_id) >= part.size / 2
            and (over(donor) or short(node_id))
            and excess(donor) + room(node_id) > part.size  # the squared gaps shrink
            and free[node_id] >= part.size
        ]
        if not receivers:
            continue
        target = max(receivers, key=lambda r: (room(r) / max(by_id[r].capacity, 1), r))
        moves.append(Move(key=part.key, size=part.size, source=donor, target=target))
        planned += part.size
        gained.setdefault(part.version_id, set()).add(target)
        gave.add(donor)
        took.add(target)
        load[donor] -= part.size
        load[target] += part.size
        free[target] -= part.size
