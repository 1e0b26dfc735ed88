"""Scenario files: per-node capacities, and the fill spread in percentage points."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from karma8.core import rebalance
from karma8.sim.runner import run_scenario
from karma8.sim.scenario import ClusterSpec, Event, Scenario, ScenarioError, parse_scenario

MIB = 1 << 20


def spread_pp(disks: list[tuple[int, int]]) -> float:
    """The core's fill spread of (used, capacity) disks; ``parts=1`` caps no node (a node may
    hold every byte), so it is the plain max - min fill."""
    fills = [
        rebalance.NodeFill(node_id=f"n{i}", capacity=capacity, live=used, free=capacity - used)
        for i, (used, capacity) in enumerate(disks)
    ]
    return rebalance.spread_pp(fills, parts=1)


def test_one_capacity_applies_to_every_node_and_to_added_ones() -> None:
    scenario = parse_scenario(
        "[cluster]\nstorage_nodes = 7\ncapacity = '8 MiB'\n"
        "[[events]]\nat = 1.0\naction = 'add_nodes'\ncount = 2\n"
    )
    assert scenario.cluster.initial_capacities() == (8 * MIB,) * 7
    assert scenario.events[0].added_capacities(scenario.cluster) == (8 * MIB,) * 2


def test_a_list_gives_each_initial_node_its_capacity_and_added_nodes_the_largest() -> None:
    scenario = parse_scenario(
        "[cluster]\nstorage_nodes = 6\n"
        "capacity = ['8 MiB', '8 MiB', '16 MiB', 16777216, '32 MiB', '32MiB']\n"
        "[[events]]\nat = 1.0\naction = 'add_nodes'\ncount = 3\n"
    )
    assert (
        scenario.cluster.initial_capacities() == (8 * MIB,) * 2 + (16 * MIB,) * 2 + (32 * MIB,) * 2
    )
    assert scenario.events[0].added_capacities(scenario.cluster) == (32 * MIB,) * 3


@pytest.mark.parametrize(
    ("capacity", "expected"),
    [("'4 MiB'", (4 * MIB,) * 2), ("['4 MiB', '64 MiB']", (4 * MIB, 64 * MIB))],
)
def test_add_nodes_takes_one_capacity_or_one_per_added_node(
    capacity: str, expected: tuple[int, ...]
) -> None:
    scenario = parse_scenario(
        f"[[events]]\nat = 1.0\naction = 'add_nodes'\ncount = 2\ncapacity = {capacity}\n"
    )
    assert scenario.events[0].added_capacities(scenario.cluster) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[cluster]\nstorage_nodes = 6\ncapacity = ['8 MiB', '16 MiB']\n",
            "<s>:3: cluster.capacity: expected one size or 6 sizes (one per storage node), got 2",
        ),
        (
            "[cluster]\ncapacity = ['8 MiB', '8 MiB', '8 MiB', '8 MiB', '8 MiB', 0]\n",
            "<s>:2: cluster.capacity: item 5: must be >= 1 bytes, got 0",
        ),
        (
            "[cluster]\ncapacity = ['8 MiB', '8 MiB', '8 MiB', '8 MiB', '8 MiB', '8 MB?']\n",
            "<s>:2: cluster.capacity: item 5: expected a size",
        ),
        (
            "[[events]]\nat = 1.0\naction = 'add_nodes'\ncount = 3\ncapacity = ['1 MiB']\n",
            "<s>:5: events[0].capacity: expected one size or 3 sizes (one per added node), got 1",
        ),
        (
            "[[events]]\nat = 1.0\naction = 'add_nodes'\ncapacity = 'big'\n",
            "<s>:4: events[0].capacity: expected a size",
        ),
        ("[checks]\nmax_fill_spread = 0.1\n", "<s>:2: checks.max_fill_spread: unknown key"),
    ],
)
def test_bad_capacities_name_the_key_and_line(text: str, message: str) -> None:
    with pytest.raises(ScenarioError) as error:
        parse_scenario(text, origin="<s>")
    assert str(error.value).startswith(message), str(error.value)


def test_specs_built_in_code_keep_one_capacity_per_node() -> None:
    with pytest.raises(ValueError, match="2 capacities for 6 storage nodes"):
        ClusterSpec(capacity=(1, 2))
    with pytest.raises(ValueError, match="1 capacities for 2 added nodes"):
        Event(at=0.0, action="add_nodes", count=2, capacity=(1,))


@given(st.lists(st.integers(1, 1 << 40), min_size=6, max_size=12))
def test_capacity_lists_round_trip(sizes: list[int]) -> None:
    text = f"[cluster]\nstorage_nodes = {len(sizes)}\ncapacity = {sizes}\n"
    cluster = parse_scenario(text).cluster
    assert cluster.initial_capacities() == tuple(sizes)
    assert cluster.join_capacity == max(sizes)


@given(
    st.lists(st.integers(1, 1 << 40), min_size=1, max_size=12),
    st.fractions(0, 1),
)
def test_an_even_fill_spreads_by_zero_whatever_the_capacities(
    capacities: list[int], fill: Fraction
) -> None:
    disks = [(int(c * fill), c) for c in capacities]
    # Rounding to whole bytes moves a fill by less than one byte's worth of each disk.
    assert spread_pp(disks) <= 100 * max(1 / c for c in capacities) + 1e-9


@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(1, 1000)), min_size=1))
def test_spread_is_max_minus_min_fill_in_percentage_points(disks: list[tuple[int, int]]) -> None:
    fills = [100 * used / capacity for used, capacity in disks]
    assert spread_pp(disks) == pytest.approx(max(fills) - min(fills))
    assert spread_pp([(1, 4), (2, 8), (8, 32)]) == 0.0
    assert spread_pp([(1, 4), (4, 8)]) == pytest.approx(25.0)


def test_nodes_get_their_capacities_in_a_run() -> None:
    """Initial nodes in list order, then added nodes: their own capacities or the largest."""
    scenario = Scenario(
        name="capacities",
        duration=1.0,
        quiet=1.0,
        cluster=ClusterSpec(capacity=(MIB, MIB, 2 * MIB, 2 * MIB, 4 * MIB, 4 * MIB)),
        events=(
            Event(at=0.2, action="add_nodes", count=2, capacity=(8 * MIB, MIB)),
            Event(at=0.5, action="add_nodes"),
        ),
    )
    result = run_scenario(scenario)
    assert [n.capacity_bytes // MIB for n in result.nodes] == [1, 1, 2, 2, 4, 4, 8, 1, 4]


def test_an_unset_quiet_phase_is_long_enough_for_the_timers_to_collect_garbage() -> None:
    short = parse_scenario(
        "[cluster]\nretire_grace = 1.0\norphan_grace = 2.0\n"
        "orphan_check_interval = 1.0\nheartbeat_interval = 0.5\n"
        "sweep_interval = 0.5\n"
    )
    assert short.quiet == 30.0  # the timers need less: the usual 30 s
    defaults = parse_scenario("")
    assert defaults.quiet == defaults.cluster.settle_seconds > 700  # production timers
    assert parse_scenario("quiet = 5.0").quiet == 5.0  # what a scenario says wins
