"""Every shipped scenario holds its invariants, deterministically."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from karma8.sim.runner import SimResult, run_scenario
from karma8.sim.scenario import load_scenario

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = sorted((ROOT / "scenarios").glob("*.toml"))


# Scenarios with a test of their own, which also checks the invariants (result_of): in the
# suite each scenario runs once (on one worker), not once more for the invariants on another.
REBALANCED = ["join_at_70", "join_at_92", "node_killed", "join_under_reads"]
OWN_TEST = {"add_nodes", "mixed_capacities", "failed_write", "capped_nodes", *REBALANCED}


@functools.cache
def result_of(stem: str) -> SimResult:
    """A scenario's result, its invariants checked (each runs once per test process)."""
    result = run_scenario(load_scenario(ROOT / "scenarios" / f"{stem}.toml"))
    assert result.ok, result.violations
    assert result.stats["succeeded"]["put"] > 0
    return result


def test_scenarios_are_shipped() -> None:
    names = {p.stem for p in SCENARIOS}
    assert {"basic"} | OWN_TEST <= names


@pytest.mark.slow
@pytest.mark.parametrize(
    "path", [p for p in SCENARIOS if p.stem not in OWN_TEST], ids=lambda p: p.stem
)
def test_scenario_invariants_hold(path: Path) -> None:
    result_of(path.stem)


@pytest.mark.slow
def test_add_nodes_new_nodes_receive_parts_and_catch_up() -> None:
    result = result_of("add_nodes")
    joined_late = [n for n in result.nodes if n.joined_at >= 12.0]
    assert len(joined_late) == 4
    assert all(n.parts > 0 for n in joined_late)
    mean = sum(n.used_bytes for n in result.nodes) / len(result.nodes)
    assert all(n.used_bytes > 0.85 * mean for n in joined_late)


@pytest.mark.slow
def test_mixed_capacities_fill_evenly_by_fraction_not_by_bytes() -> None:
    result = result_of("mixed_capacities")
    mib = 1 << 20
    assert sorted({n.capacity_bytes for n in result.nodes}) == [8 * mib, 16 * mib, 32 * mib]
    used = {
        size: sum(n.used_bytes for n in result.nodes if n.capacity_bytes == size) / 4
        for size in (8 * mib, 16 * mib, 32 * mib)
    }
    # Bytes follow capacity (1:2:4) ...
    assert 1.7 < used[16 * mib] / used[8 * mib] < 2.3
    assert 3.4 < used[32 * mib] / used[8 * mib] < 4.6
    # ... so fills are close, measured in percentage points.
    assert 0 < result.stats["fill_spread_pp"] < 5.0
    assert min(n.fill for n in result.nodes) > 0.1


@pytest.mark.slow
def test_failed_write_fails_some_puts_cleanly() -> None:
    result = result_of("failed_write")
    assert result.stats["failures"].get("put:storage_failure", 0) > 0
    assert result.stats["injected_write_failures"] > 0


@pytest.mark.slow
def test_same_seed_same_trace_within_one_process_and_other_seed_differs() -> None:
    scenario = load_scenario(ROOT / "scenarios" / "basic.toml")
    first = run_scenario(scenario, 11)
    assert run_scenario(scenario, 11).trace_sha256 == first.trace_sha256
    assert run_scenario(scenario, 12).trace_sha256 != first.trace_sha256


@pytest.mark.slow
def test_same_seed_same_trace_across_processes() -> None:
    def trace() -> str:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "karma8.cli",
                "sim",
                str(ROOT / "scenarios" / "basic.toml"),
                "--json",
                "--seed",
                "5",
            ],
            check=True,
            capture_output=True,
            text=True,
            env={"PYTHONHASHSEED": "random", "PATH": ""},
        ).stdout
        return str(json.loads(out)["trace_sha256"])

    assert trace() == trace()


@pytest.mark.slow
@pytest.mark.parametrize("stem", REBALANCED)
def test_the_rebalancer_evens_out_nodes_that_joined_or_came_back_empty(stem: str) -> None:
    result = result_of(stem)
    checked = set(result.invariants)
    assert {"fill_spread_within_bound", "refused_puts_within_bound"} <= checked
    assert result.stats["rebalance"]["moved_parts"] > 0
    assert result.stats["fill_spread_pp"] <= 2.0
    assert result.stats["refused_puts"] == 0
    if stem != "join_under_reads":  # overwrites retire moved parts there
        assert "moved_bytes_near_least" in checked
        assert result.stats["rebalance"]["ratio"] <= 1.1


@pytest.mark.slow
def test_nodes_too_big_to_fill_cause_no_refusal_and_no_moves() -> None:
    result = result_of("capped_nodes")
    assert result.stats["refused_puts"] == 0
    assert result.stats["rebalance"]["moved_parts"] == 0
    held = sum(n.used_bytes for n in result.nodes)
    assert held > 0.9 * result.stats["usable_capacity_bytes"]
    assert result.stats["usable_capacity_bytes"] == 80 << 20
