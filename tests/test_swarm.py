"""Swarm: random clusters, workloads and faults, seed after seed; every invariant must hold."""

from __future__ import annotations

import pytest

from karma8.sim.swarm import run_swarm, swarm_scenario

SEEDS = 200
BATCH = 50


@pytest.mark.parametrize("first", range(1, SEEDS + 1, BATCH))
def test_swarm_seeds_hold_every_invariant(first: int) -> None:
    outcome = run_swarm(BATCH, first_seed=first)
    failed = outcome.failed
    assert failed is None, (
        f"seed {failed.seed} failed: {failed.violations}; replay: karma8 sim --swarm 1"
        f" --seed {failed.seed}"
    )


def test_swarm_scenarios_are_a_function_of_the_seed_and_vary() -> None:
    assert swarm_scenario(5) == swarm_scenario(5)
    scenarios = [swarm_scenario(seed) for seed in range(1, 40)]
    assert len({s.cluster.storage_nodes for s in scenarios}) > 2
    actions = {e.action for s in scenarios for e in s.events}
    assert {"crash", "partition", "fail_writes", "disk_full", "lossy_link"} <= actions
