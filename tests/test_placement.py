"""Properties of placement (pure core)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from karma8.core.errors import NotEnoughNodes
from karma8.core.placement import NodeLoad, place_parts, usable_capacity


@st.composite
def clusters(draw: st.DrawFn) -> list[NodeLoad]:
    count = draw(st.integers(5, 20))
    nodes = []
    for i in range(count):
        capacity = draw(st.integers(1, 10_000))
        used = draw(st.integers(0, capacity))
        reserved = draw(st.integers(0, capacity - used))
        nodes.append(
            NodeLoad(
                node_id=f"n{i:02d}",
                capacity=capacity,
                used=used,
                reserved=reserved,
                available=draw(st.booleans()) if i >= 5 else True,
            )
        )
    return nodes


@given(nodes=clusters(), part_size=st.integers(0, 500), salt=st.text(max_size=8))
def test_picks_distinct_available_nodes_with_room_emptiest_first(
    nodes: list[NodeLoad], part_size: int, salt: str
) -> None:
    candidates = [n for n in nodes if n.available and n.free >= part_size]
    if len(candidates) < 5:
        with pytest.raises(NotEnoughNodes):
            place_parts(nodes, count=5, part_size=part_size, salt=salt)
        return
    chosen = place_parts(nodes, count=5, part_size=part_size, salt=salt)
    assert len(set(chosen)) == 5
    by_id = {n.node_id: n for n in nodes}
    assert all(by_id[c] in candidates for c in chosen)
    fullest_chosen = max(by_id[c].fill for c in chosen)
    assert all(n.fill >= fullest_chosen for n in candidates if n.node_id not in chosen)
    # Deterministic: the same inputs in another order give the same answer.
    assert place_parts(list(reversed(nodes)), count=5, part_size=part_size, salt=salt) == chosen


def test_reservations_count_towards_fill() -> None:
    nodes = [NodeLoad(node_id=f"n{i}", capacity=100, used=10) for i in range(6)]
    nodes[0] = NodeLoad(node_id="n0", capacity=100, used=10, reserved=50)
    assert "n0" not in place_parts(nodes, count=5, part_size=1, salt="v")


def test_ties_break_differently_per_upload_so_uploads_do_not_herd() -> None:
    nodes = [NodeLoad(node_id=f"n{i}", capacity=100, used=0) for i in range(10)]
    picks = {place_parts(nodes, count=5, part_size=1, salt=f"v{i}") for i in range(50)}
    assert len(picks) > 10
    counts = {n.node_id: 0 for n in nodes}
    for pick in picks:
        for node_id in pick:
            counts[node_id] += 1
    assert min(counts.values()) > 0


def test_not_enough_nodes_says_how_many() -> None:
    nodes = [NodeLoad(node_id=f"n{i}", capacity=100, used=0) for i in range(6)]
    nodes[1] = NodeLoad(node_id="n1", capacity=100, used=0, available=False)
    nodes[2] = NodeLoad(node_id="n2", capacity=100, used=95)
    with pytest.raises(NotEnoughNodes, match="have 4"):
        place_parts(nodes, count=5, part_size=10, salt="v")


@given(st.lists(st.integers(min_value=0, max_value=1 << 40), min_size=5, max_size=30))
def test_usable_capacity_is_what_equal_parts_on_distinct_nodes_can_fill(caps: list[int]) -> None:
    usable = usable_capacity(caps)
    assert usable <= sum(caps)
    # No node holds more than a fifth of the stored bytes, and that much fits on the nodes.
    assert sum(min(c, usable // 5) for c in caps) >= usable - 5
    if max(caps) * 5 <= sum(caps):
        assert usable == sum(caps)  # nobody is too big: every byte is usable
    assert usable_capacity([*caps, 1 << 30]) >= usable  # a node never takes room away


def test_usable_capacity_of_mixed_nodes() -> None:
    assert usable_capacity([100] * 6) == 600
    assert usable_capacity([100] * 4) == 0  # fewer than 5 nodes hold nothing
    # One huge node next to five small ones: it can only ever hold a fifth of the total.
    assert usable_capacity([1000, 100, 100, 100, 100, 100]) == 625
    assert usable_capacity([8, 8, 16, 16, 32, 32]) == 80
