"""Swarm: random clusters, workloads and faults, seed after seed; every invariant must hold."""

from __future__ import annotations

import contextlib
import hashlib

import pytest
import trio

from karma8.actors.gateway import Gateway
from karma8.core.errors import Karma8Error
from karma8.core.model import PartPlacement, PartReceipt
from karma8.sim.runner import run_scenario
from karma8.sim.swarm import run_swarm, swarm_scenario
from karma8.sim.workload import BytesChunks

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


def test_the_swarm_catches_a_gateway_that_ignores_failed_part_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A deliberately broken gateway: a failed part write is treated as written."""

    async def optimistic(
        self: Gateway,
        placement: PartPlacement,
        chunks: trio.MemoryReceiveChannel[bytes],
        size: int | None,
        receipts: list[PartReceipt | None],
    ) -> None:
        async with chunks:
            data = b"".join([chunk async for chunk in chunks])
        with contextlib.suppress(Karma8Error):  # the bug: a failed write counts as done
            await self._storage.put_part(placement.node, placement.key, BytesChunks(data))
        receipts[placement.index] = PartReceipt(
            index=placement.index, size=len(data), checksum=hashlib.sha256(data).hexdigest()
        )

    monkeypatch.setattr(Gateway, "_write_part", optimistic)
    outcome = run_swarm(30, first_seed=1)
    assert outcome.failed is not None
    replay = run_scenario(swarm_scenario(outcome.failed.seed), outcome.failed.seed)
    assert replay.trace_sha256 == outcome.failed.trace_sha256
    assert not replay.ok
