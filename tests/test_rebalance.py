"""The rebalancing core: fill targets, the spread, and the planner's promises (Hypothesis)."""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from karma8.core.rebalance import (
    MovablePart,
    Move,
    NodeFill,
    bytes_over_target,
    capped_nodes,
    donors,
    fill_targets,
    imbalance_pp,
    plan_moves,
    spread_pp,
)


def fill(node_id: str, capacity: int, live: int, free: int | None = None) -> NodeFill:
    return NodeFill(
        node_id=node_id,
        capacity=capacity,
        live=live,
        free=capacity - live if free is None else free,
    )


nodes_st = st.lists(
    st.tuples(st.integers(1_000, 10**9), st.floats(0, 1)), min_size=5, max_size=16
).map(lambda rows: [fill(f"n{i}", cap, int(cap * f)) for i, (cap, f) in enumerate(rows)])


@given(nodes_st)
@example(  # capped at a fifth by a byte of rounding, above a free node rounded down by one
    [fill("n0", 1000, 1000)]
    + [fill(f"n{i}", cap, 0) for i, cap in enumerate([132998, 132998, 132995, 133001, 131996], 1)]
)
def test_targets_hold_every_live_byte_and_cap_no_node_over_a_fifth(nodes: list[NodeFill]) -> None:
    targets = fill_targets(nodes)
    total = sum(n.live for n in nodes)
    assert abs(sum(targets.values()) - total) <= len(nodes)  # rounding, a byte a node
    assert all(t <= total / 5 + 1 for t in targets.values())
    capped = capped_nodes(nodes)
    free = [n for n in nodes if n.node_id not in capped]
    fractions = {targets[n.node_id] / n.capacity for n in free}
    assert max(fractions) - min(fractions) <= 2 / min(n.capacity for n in free)
    # A capped node is bigger than the others' common fill would give a fifth of the bytes
    # (to a byte: the others' targets are whole bytes, rounded down).
    for n in nodes:
        if n.node_id in capped:
            assert targets[n.node_id] / n.capacity <= min(fractions) + 1 / min(
                f.capacity for f in free
            )


def test_a_node_bigger_than_a_fifth_is_capped_at_a_fifth() -> None:
    nodes = [fill("a", 8, 8), fill("b", 8, 8), fill("c", 16, 16), fill("d", 16, 16)]
    nodes += [fill("e", 32, 0), fill("f", 32, 32)]
    total = 80
    assert capped_nodes(nodes) == {"e", "f"}
    targets = fill_targets(nodes)
    assert targets["e"] == targets["f"] == total // 5
    assert targets["a"] == 8
    assert targets["c"] == 16
    assert spread_pp(nodes) == 0.0  # e's emptiness is the layout's, not an imbalance


@given(
    st.lists(st.integers(1, 1 << 40), min_size=5, max_size=12),
    st.fractions(0, 1),
)
def test_an_even_fill_spreads_by_zero_whatever_the_capacities(
    capacities: list[int], share: Fraction
) -> None:
    nodes = [fill(f"n{i}", c, int(c * share)) for i, c in enumerate(capacities)]
    # Rounding to whole bytes moves a fill by less than one byte's worth of each disk.
    assert spread_pp(nodes) <= 100 * max(1 / c for c in capacities) + 1e-9


@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(1000, 2000)), min_size=5, max_size=9))
def test_spread_of_equal_disks_is_max_minus_min_fill(rows: list[tuple[int, int]]) -> None:
    nodes = [fill(f"n{i}", 1000, used) for i, (used, _) in enumerate(rows)]
    fills = [100 * n.live / n.capacity for n in nodes]
    assert spread_pp(nodes) == pytest.approx(max(fills) - min(fills))


def test_fewer_nodes_than_parts_cap_nothing() -> None:
    assert spread_pp([fill("a", 4, 1), fill("b", 8, 4)]) == pytest.approx(25.0)


@st.composite
def clusters(
    draw: st.DrawFn, *, biggest: int = 2_000, files: int = 60, capacity: int | None = None
) -> tuple[list[NodeFill], dict[str, list[MovablePart]]]:
    """Nodes holding files of five parts each on five distinct nodes, unevenly (up to ``files``
    files of parts up to ``biggest`` bytes)."""
    count = draw(st.integers(6, 12))
    if capacity is None:
        capacity = draw(st.sampled_from([50_000, 100_000, 200_000]))
    ids = [f"n{i}" for i in range(count)]
    favoured = ids[: draw(st.integers(5, count))]  # new nodes joined empty
    held: dict[str, list[MovablePart]] = {i: [] for i in ids}
    for f in range(draw(st.integers(0, files))):
        size = draw(st.integers(1, biggest))
        nodes = draw(st.permutations(favoured))[:5]
        for index, node_id in enumerate(nodes):
            held[node_id].append(
                MovablePart(
                    key=f"v{f}.{index}",
                    version_id=f"v{f}",
                    size=size,
                    node_id=node_id,
                    blocked=frozenset(nodes),
                )
            )
    fills = [fill(i, capacity, sum(p.size for p in held[i])) for i in ids]
    return fills, held


@settings(max_examples=200)
@given(clusters(), st.floats(0.1, 2.0), st.none() | st.integers(1, 50_000))
def test_a_plan_keeps_every_rule(
    cluster: tuple[list[NodeFill], dict[str, list[MovablePart]]],
    tolerance: float,
    max_bytes: int | None,
) -> None:
    nodes, held = cluster
    targets = fill_targets(nodes)
    moves = plan_moves(nodes, held, tolerance_pp=tolerance, max_bytes=max_bytes)
    parts = {p.key: p for ps in held.values() for p in ps}
    assert len({m.key for m in moves}) == len(moves)  # each part moves once
    if max_bytes is not None:
        assert sum(m.size for m in moves) <= max_bytes
    placed = {key: p.node_id for key, p in parts.items()}
    load = {n.node_id: n.live for n in nodes}
    for move in moves:
        part = parts[move.key]
        assert move.source == part.node_id
        assert move.size == part.size
        assert move.target not in part.blocked
        placed[move.key] = move.target
        load[move.source] -= move.size
        load[move.target] += move.size
    # Never two parts of one version on one node, after the moves as before.
    per_node = Counter((key.split(".")[0], node) for key, node in placed.items())
    assert max(per_node.values(), default=1) == 1
    slack = {n.node_id: tolerance / 100 * n.capacity for n in nodes}
    sources = {m.source for m in moves}
    receivers = {m.target for m in moves}
    assert not sources & receivers  # no byte moves back within a plan
    biggest = max((m.size for m in moves), default=0)
    for node_id in sources:
        assert load[node_id] >= targets[node_id] - max(slack[node_id], biggest / 2)
    for node_id in receivers:
        assert load[node_id] <= targets[node_id] + biggest / 2
    # Each byte moves once, from above target to below it: about the least needed.
    live = {n.node_id: n.live for n in nodes}
    least = bytes_over_target(live, targets)
    assert sum(m.size for m in moves) <= least + biggest / 2 * len(receivers) + len(nodes)


@settings(max_examples=100)
@given(clusters())
def test_plans_applied_in_turn_converge_within_the_tolerance(
    cluster: tuple[list[NodeFill], dict[str, list[MovablePart]]],
) -> None:
    nodes, held = cluster
    tolerance = 0.5
    biggest = max((p.size for ps in held.values() for p in ps), default=0)
    nodes, held = _plans_in_turn(nodes, held, tolerance)
    # A node can stay off its target by the tolerance or half a part, or by parts no receiver
    # can take (every receiver holds a part of their version).
    targets = fill_targets(nodes)
    for n in nodes:
        if n.live > targets[n.node_id] + tolerance / 100 * n.capacity + biggest:
            stuck = [p for p in held[n.node_id] if len(p.blocked) < len(nodes)]
            assert not any(
                targets[r.node_id] - r.live >= p.size
                for p in stuck
                for r in nodes
                if r.node_id not in p.blocked
            )


def _plans_in_turn(
    nodes: list[NodeFill], held: dict[str, list[MovablePart]], tolerance: float
) -> tuple[list[NodeFill], dict[str, list[MovablePart]]]:
    """The cluster once plans, applied in turn, run out (at most 50 of them)."""
    for _ in range(50):
        moves = plan_moves(nodes, held, tolerance_pp=tolerance)
        if not moves:
            return nodes, held
        nodes, held = _apply(nodes, held, moves)
    pytest.fail("plans never ran out")


def _apply(
    nodes: list[NodeFill], held: dict[str, list[MovablePart]], moves: list[Move]
) -> tuple[list[NodeFill], dict[str, list[MovablePart]]]:
    held = {k: list(v) for k, v in held.items()}
    for move in moves:
        part = next(p for p in held[move.source] if p.key == move.key)
        held[move.source].remove(part)
        blocked = (part.blocked - {move.source}) | {move.target}
        moved = MovablePart(
            key=part.key,
            version_id=part.version_id,
            size=part.size,
            node_id=move.target,
            blocked=blocked,
        )
        held[move.target].append(moved)
        for ps in held.values():  # the siblings now avoid the new node, not the old one
            for i, p in enumerate(ps):
                if p.version_id == part.version_id and p.key != part.key:
                    ps[i] = MovablePart(
                        key=p.key,
                        version_id=p.version_id,
                        size=p.size,
                        node_id=p.node_id,
                        blocked=blocked,
                    )
    return [fill(n.node_id, n.capacity, sum(p.size for p in held[n.node_id])) for n in nodes], held


def test_roles_and_room_are_respected() -> None:
    nodes = [fill(f"o{i}", 1000, 800) for i in range(5)] + [fill("new", 1000, 0, free=0)]
    held = {
        f"o{i}": [
            MovablePart(key=f"v{j}.{i}", version_id=f"v{j}", size=10, node_id=f"o{i}")
            for j in range(80)
        ]
        for i in range(5)
    }
    assert plan_moves(nodes, held) == []  # the only receiver has no free space
    nodes[-1] = fill("new", 1000, 0)
    assert plan_moves(nodes, held, no_receivers=frozenset({"new"})) == []
    assert plan_moves(nodes, held, no_donors=frozenset(f"o{i}" for i in range(5))) == []
    moves = plan_moves(nodes, held)
    assert moves
    assert {m.target for m in moves} == {"new"}
    assert imbalance_pp(nodes, fill_targets(nodes)) > 50


def _old_nodes_and_a_new_one() -> tuple[list[NodeFill], dict[str, list[MovablePart]]]:
    """Six old nodes 0.9 tolerance (of 0.5 pp) above their target, a new one empty 5.4
    tolerances below it: 126 files of five 30-byte parts, each on all old nodes but one."""
    old = [f"o{i}" for i in range(6)]
    held: dict[str, list[MovablePart]] = {node_id: [] for node_id in [*old, "new"]}
    for f in range(126):
        owners = [node_id for i, node_id in enumerate(old) if i != f % 6]
        for index, node_id in enumerate(owners):
            held[node_id].append(
                MovablePart(
                    key=f"v{f}.{index}",
                    version_id=f"v{f}",
                    size=30,
                    node_id=node_id,
                    blocked=frozenset(owners),
                )
            )
    return [fill(node_id, 100_000, sum(p.size for p in held[node_id])) for node_id in held], held


def test_a_node_far_below_its_target_takes_from_donors_within_the_tolerance() -> None:
    nodes, held = _old_nodes_and_a_new_one()
    targets = fill_targets(nodes)
    assert {n.live - targets[n.node_id] for n in nodes} == {450, -2700}  # slack: 500 bytes
    moves = plan_moves(nodes, held, tolerance_pp=0.5)
    assert {m.target for m in moves} == {"new"}
    nodes, held = _apply(nodes, held, moves)
    assert imbalance_pp(nodes, fill_targets(nodes)) <= 0.5
    assert plan_moves(nodes, held, tolerance_pp=0.5) == []


def test_donors_within_the_tolerance_give_only_to_a_node_beyond_it() -> None:
    nodes, _ = _old_nodes_and_a_new_one()
    targets = fill_targets(nodes)
    old = {f"o{i}": ["new"] for i in range(6)}
    assert donors(nodes, targets, tolerance_pp=0.5) == old
    assert donors(nodes, targets, tolerance_pp=0.5, no_donors=frozenset({"o0"})) == {
        d: r for d, r in old.items() if d != "o0"
    }
    assert donors(nodes, targets, tolerance_pp=0.5, no_receivers=frozenset({"new"})) == {}
    assert donors(nodes, targets, tolerance_pp=5.4) == {}  # the new node is within it too
    assert donors(nodes, targets, tolerance_pp=0.4) == old  # now over by more: the same
    # Targets 540, tolerance 50 bytes: a is over by more (to any node below its target), d by
    # less (to c only, more than the tolerance below); b is below by less.
    nodes = [fill("a", 1000, 700), fill("d", 1000, 560), fill("b", 1000, 520)]
    nodes.append(fill("c", 1000, 380))
    assert donors(nodes, fill_targets(nodes), tolerance_pp=5) == {"a": ["b", "c"], "d": ["c"]}


@st.composite
def small_parts(
    draw: st.DrawFn,
) -> tuple[list[NodeFill], dict[str, list[MovablePart]], float]:
    """A cluster of 100 kB nodes whose parts are small beside the tolerance (at most
    1/12 of it), with the tolerance."""
    tolerance = draw(st.floats(0.1, 2.0))
    nodes, held = draw(clusters(biggest=int(tolerance * 1_000) // 12, files=200, capacity=100_000))
    return nodes, held, tolerance


@settings(max_examples=100)
@given(small_parts())
@example((*_old_nodes_and_a_new_one(), 0.5))
def test_plans_in_turn_bring_every_node_within_the_tolerance_when_parts_are_small(
    cluster: tuple[list[NodeFill], dict[str, list[MovablePart]], float],
) -> None:
    # Nodes of one size, files whose parts are of one size: a node below its target never
    # holds a part of every file of a node above its own, so some part can always move. This
    # holds too when every node above its target is within the tolerance and the one below is
    # far from it (a new node): those must give as well.
    nodes, held, tolerance = cluster
    biggest = max((p.size for ps in held.values() for p in ps), default=0)
    nodes, held = _plans_in_turn(nodes, held, tolerance)
    targets = fill_targets(nodes)
    for n in nodes:
        assert abs(n.live - targets[n.node_id]) <= tolerance / 100 * n.capacity + biggest / 2
