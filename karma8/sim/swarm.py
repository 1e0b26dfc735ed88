"""Swarm testing: many seeds, each a randomised cluster, workload and set of faults.

``swarm_scenario(seed)`` is a pure function of the seed, so a failing seed is replayed by
``karma8 sim --swarm 1 --seed SEED``. Runs are short (seconds of simulated load) so that
hundreds of seeds fit in CI.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import attrs

from karma8.sim.runner import SimResult, run_scenario
from karma8.sim.scenario import ClusterSpec, Event, Scenario, WorkloadSpec

FAULTS = (
    "fail_writes",
    "disk_full",
    "crash_node",
    "crash_discovery",
    "crash_gateway",
    "partition",
    "slow_link",
    "lossy_link",
    "add_nodes",
)


def _fault(rng: random.Random, kind: str, at: float, nodes: int) -> Event:
    node = rng.randrange(nodes)
    duration = round(rng.uniform(0.3, 3.0), 3)
    peers = ["gateway", "discovery", f"node:{node}"]
    if kind == "fail_writes":
        return Event(
            at=at,
            action=kind,
            node=node,
            duration=duration,
            probability=rng.choice([1.0, 0.5, 0.1]),
            at_byte=rng.choice([0, 1, 4096, 20_000]),
        )
    if kind == "disk_full":
        return Event(at=at, action=kind, node=node, duration=duration)
    if kind.startswith("crash_"):
        target = kind.removeprefix("crash_")
        return Event(
            at=at,
            action="crash",
            target=f"node:{node}" if target == "node" else target,
            duration=duration,
        )
    if kind == "add_nodes":
        return Event(at=at, action=kind, count=rng.randint(1, 2))
    a, b = rng.sample(peers, 2)
    if kind == "partition":
        return Event(at=at, action=kind, between=(a, b), duration=duration)
    if kind == "slow_link":
        return Event(
            at=at,
            action=kind,
            between=(a, b),
            duration=duration,
            latency=round(rng.uniform(0.005, 0.1), 4),
        )
    return Event(
        at=at,
        action="lossy_link",
        between=(a, rng.choice([b, "*"])),
        duration=duration,
        loss=round(rng.uniform(0.01, 0.3), 3),
    )


def swarm_scenario(seed: int) -> Scenario:
    """A random but reproducible scenario for ``seed``."""
    rng = random.Random(f"karma8-swarm/{seed}")
    nodes = rng.randint(6, 10)
    duration = round(rng.uniform(2.0, 6.0), 3)
    events = []
    added = 0
    for _ in range(rng.randint(0, 5)):
        kind = rng.choice(FAULTS)
        event = _fault(rng, kind, round(rng.uniform(0.2, duration), 3), nodes)
        added += event.count if event.action == "add_nodes" else 0
        events.append(event)
    # Tiny stripe units exercise row edges; they are paired with tiny files, since a file
    # costs one segment per unit.
    unit = rng.choice([7, 1024, 8192])
    return Scenario(
        name=f"swarm-{seed}",
        seed=seed,
        duration=duration,
        quiet=40.0,
        cluster=ClusterSpec(
            storage_nodes=nodes,
            capacity=rng.choice([8 << 20, 1 << 30]),
            stripe_unit=unit,
            heartbeat_interval=0.5,
            node_timeout=2.0,
            upload_ttl=8.0,
            retire_grace=rng.choice([0.0, 1.0]),
            sweep_interval=0.5,
        ),
        workload=WorkloadSpec(
            clients=rng.randint(1, 6),
            names=rng.choice([3, 20, 200]),
            file_size=(0, rng.choice([10, 5 * unit + 3, 40_000 if unit > 7 else 300])),
            think_time=(0.0, rng.choice([0.0, 0.01, 0.05])),
            put=rng.uniform(1, 6),
            get=rng.uniform(0, 4),
            delete=rng.uniform(0, 2),
        ),
        events=tuple(sorted(events, key=lambda e: e.at)),
    )


@attrs.frozen(kw_only=True)
class SwarmOutcome:
    runs: int
    failed: SimResult | None
    failed_scenario: Scenario | None


def run_swarm(
    count: int,
    *,
    first_seed: int = 1,
    progress: Callable[[int, SimResult], None] | None = None,
) -> SwarmOutcome:
    """Run ``count`` swarm seeds from ``first_seed``; stop at the first failing one."""
    runs = 0
    for seed in range(first_seed, first_seed + count):
        scenario = swarm_scenario(seed)
        result = run_scenario(scenario, seed)
        runs += 1
        if progress is not None:
            progress(seed, result)
        if not result.ok:
            return SwarmOutcome(runs=runs, failed=result, failed_scenario=scenario)
    return SwarmOutcome(runs=runs, failed=None, failed_scenario=None)
