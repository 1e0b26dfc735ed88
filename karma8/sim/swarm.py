"""Swarm testing: many seeds, each a randomised cluster, workload and set of faults.

``swarm_scenario(seed)`` is a pure function of the seed, so a failing seed is replayed by
``karma8 sim --swarm 1 --seed SEED``. Runs are short (seconds of simulated load) so that
hundreds of seeds fit in CI.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import attrs

from karma8.actors.rebalancer import RebalancerConfig
from karma8.actors.repair import RepairConfig
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
QUIET = 40.0
# Disk sizes are a base size times one of these, so mixed clusters have capacities 1:2:4.
MULTIPLES = (1, 2, 4)


def _fault(rng: random.Random, kind: str, at: float, nodes: int, base: int) -> Event:
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
        count = rng.randint(1, 2)
        own = rng.random() < 0.5  # else the cluster's default for added nodes
        capacity = tuple(base * rng.choice(MULTIPLES) for _ in range(count)) if own else ()
        return Event(at=at, action=kind, count=count, capacity=capacity)
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


def _fault_kinds(rng: random.Random) -> list[str]:
    """No faults, a mix of kinds, or several faults of one kind."""
    mix = rng.choice(("none", "mixed", "mixed", "one kind"))
    if mix == "none":
        return []
    if mix == "one kind":
        return [rng.choice(FAULTS)] * rng.randint(2, 4)
    return [rng.choice(FAULTS) for _ in range(rng.randint(1, 5))]


def may_strand_uploads(event: Event) -> bool:
    """Whether ``event`` can cut the gateway off discovery while it settles a failed upload.

    The gateway then cannot abort the upload, and only its expiry (``upload_ttl``) removes
    the pending version: a leak the checker must tolerate.
    """
    if event.action == "crash":
        return event.target in ("gateway", "discovery")
    if event.action in ("partition", "lossy_link"):
        ends = set(event.between)
        return ends == {"gateway", "discovery"} or (
            "*" in ends and bool(ends & {"gateway", "discovery"})
        )
    return False


def swarm_scenario(seed: int) -> Scenario:
    """A random but reproducible scenario for ``seed``."""
    rng = random.Random(f"karma8-swarm/{seed}")
    nodes = rng.randint(6, 10)
    duration = round(rng.uniform(2.0, 6.0), 3)
    base = rng.choice([8 << 20, 1 << 30])
    capacity: int | tuple[int, ...] = base
    if rng.random() < 0.5:
        capacity = tuple(base * rng.choice(MULTIPLES) for _ in range(nodes))
    events = tuple(
        sorted(
            (
                _fault(rng, kind, round(rng.uniform(0.2, duration), 3), nodes, base)
                for kind in _fault_kinds(rng)
            ),
            key=lambda e: e.at,
        )
    )
    heartbeat = round(rng.uniform(0.2, 1.0), 3)
    # An upload TTL longer than the whole run means the sweeper never expires a pending
    # version, so an upload the gateway failed to abort stays visible to the checker. Only
    # faults that keep the gateway from aborting excuse such a leak; with those, the TTL is
    # short enough for the sweeper to expire stranded versions within the quiet phase.
    if rng.random() < 0.5 and not any(may_strand_uploads(e) for e in events):
        upload_ttl = round(duration + QUIET + rng.uniform(10.0, 60.0), 3)
    else:
        upload_ttl = round(rng.uniform(1.0, 12.0), 3)
    # Tiny stripe units exercise row edges; they are paired with tiny files, since a file
    # costs one segment per unit.
    unit = rng.choice([7, 1024, 8192])
    scenario = Scenario(
        name=f"swarm-{seed}",
        seed=seed,
        duration=duration,
        quiet=QUIET,
        cluster=ClusterSpec(
            storage_nodes=nodes,
            capacity=capacity,
            stripe_unit=unit,
            heartbeat_interval=heartbeat,
            node_timeout=round(heartbeat * rng.uniform(1.5, 6.0), 3),
            upload_ttl=upload_ttl,
            retire_grace=rng.choice([0.0, 1.0]),
            sweep_interval=0.5,
            # A part orphaned late in the load phase is gone within check + grace + check.
            orphan_check_interval=round(rng.uniform(0.5, 4.0), 3),
            orphan_grace=round(rng.uniform(0.0, 8.0), 3),
            # Half the seeds stream every body (the two-phase path), half hold small ones
            # (a placement lease, one transaction); drawn apart, so the rest is unchanged.
            small_file_max=random.Random(f"karma8-swarm/{seed}/small").choice([0, 1 << 20]),
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
        rebalance=_rebalance(rng),
        events=events,
    )
    scenario = _while_parts_move(rng, scenario) if rng.random() < 0.5 else scenario
    return _with_engine(random.Random(f"karma8-swarm/{seed}/engine"), scenario)


# (engine, copies, parity) drawn for a third of the seeds; the rest stay raid0 (and, drawn
# from their own stream, keep the scenario they had before engines existed).
ENGINES: tuple[tuple[str, int | None, int | None], ...] = (
    ("raid1", 2, None),
    ("parity", None, 1),
    ("parity", None, 2),
)


def _with_engine(rng: random.Random, scenario: Scenario) -> Scenario:
    """A third of the seeds: a redundant engine, enough nodes for it, and as many lost
    parts as it tolerates: nodes wiped for good (or back empty) and parts corrupt, each on
    its own node, at random times. No acknowledged file may then become unreadable, and
    repair (eager here: a short ``repair_after``, a scrubber every 2 s) must bring every
    file back to full redundancy by the end of the quiet phase."""
    if rng.random() >= 1 / 3:
        return scenario
    engine, copies, parity = rng.choice(ENGINES)
    slots = 5 * (copies or 1) + (parity or 0)
    tolerates = (copies or 1) - 1 + (parity or 0)
    cluster = scenario.cluster
    nodes = max(cluster.storage_nodes, slots + tolerates + rng.randint(0, 2))
    capacity = cluster.capacity
    if isinstance(capacity, tuple):
        capacity = capacity + capacity[: nodes - len(capacity)] * 4
        capacity = capacity[:nodes]
    victims = rng.sample(range(nodes), tolerates)
    losses = []
    for node in victims:
        at = round(rng.uniform(0.2, scenario.duration), 3)
        if rng.random() < 0.5:
            back = rng.choice([0.0, round(rng.uniform(0.5, 3.0), 3)])
            losses.append(Event(at=at, action="wipe", target=f"node:{node}", duration=back))
        else:
            count = rng.randint(1, 20)
            losses.append(Event(at=at, action="corrupt", target=f"node:{node}", count=count))
    eager = random.Random(f"karma8-swarm/{scenario.seed}/repair")
    repair = RepairConfig(interval=0.5, repair_after=round(eager.uniform(0.5, 8.0), 3), bandwidth=0)
    return attrs.evolve(
        scenario,
        cluster=attrs.evolve(
            cluster,
            storage_nodes=nodes,
            capacity=capacity,
            engine=engine,
            copies=copies,
            parity=parity,
            scrub_interval=2.0,
        ),
        repair=repair,
        checks=attrs.evolve(scenario.checks, full_redundancy=True),
        events=tuple(sorted((*scenario.events, *losses), key=lambda e: e.at)),
    )


def _while_parts_move(rng: random.Random, scenario: Scenario) -> Scenario:
    """The same seed made to strike while parts move: small nodes that take real data, empty
    nodes joining early, an eager rebalancer, and the faults after the join."""
    join = round(scenario.duration * rng.uniform(0.2, 0.4), 3)
    events = [
        attrs.evolve(e, at=round(rng.uniform(join + 0.1, scenario.duration + 3.0), 3))
        for e in scenario.events
        if e.action != "add_nodes"
    ]
    events.append(Event(at=join, action="add_nodes", count=rng.randint(1, 3)))
    big = scenario.cluster.stripe_unit > 7
    return attrs.evolve(
        scenario,
        cluster=attrs.evolve(scenario.cluster, capacity=rng.choice([2 << 20, 4 << 20])),
        workload=attrs.evolve(
            scenario.workload,
            names=400,
            file_size=(0, 40_000 if big else 300),
            delete=min(scenario.workload.delete, 0.5),
        ),
        rebalance=RebalancerConfig(
            interval=round(rng.uniform(0.2, 1.0), 3),
            start_pp=0.0,
            tolerance_pp=0.01,
            bandwidth=float(rng.choice([256 << 10, 1 << 20, 0])),
            concurrency=rng.randint(1, 4),
            batch=rng.choice([4, 64]),
            move_lease=rng.choice([0.05, 0.5, 5.0]),
        ),
        events=tuple(sorted(events, key=lambda e: e.at)),
    )


def _rebalance(rng: random.Random) -> RebalancerConfig:
    """An eager rebalancer most of the time, so parts move while the faults strike: low
    thresholds, short intervals and, now and then, leases shorter than a copy."""
    if rng.random() < 0.2:
        return RebalancerConfig()  # the defaults: rarely moves in a run this short
    return RebalancerConfig(
        interval=round(rng.uniform(0.2, 2.0), 3),
        start_pp=rng.choice([0.0, 0.01, 1.0]),
        tolerance_pp=rng.choice([0.001, 0.01, 0.25]),
        bandwidth=float(rng.choice([256 << 10, 2 << 20, 16 << 20, 0])),
        concurrency=rng.randint(1, 4),
        batch=rng.choice([4, 64, 256]),
        move_lease=rng.choice([0.05, 0.5, 5.0, 300.0]),
    )


class SwarmCrashed(Exception):
    """An exception escaped the run of one seed: a bug, not a failed invariant.

    The original exception is the ``__cause__``.
    """

    def __init__(self, seed: int) -> None:
        super().__init__(f"the simulation crashed at swarm seed {seed}")
        self.seed = seed


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
    """Run ``count`` swarm seeds from ``first_seed``; stop at the first failing one.

    Raises:
        SwarmCrashed: a seed's run raised instead of returning a result.
    """
    runs = 0
    for seed in range(first_seed, first_seed + count):
        try:
            scenario = swarm_scenario(seed)
            result = run_scenario(scenario, seed)
        except Exception as exc:
            raise SwarmCrashed(seed) from exc
        runs += 1
        if progress is not None:
            progress(seed, result)
        if not result.ok:
            return SwarmOutcome(runs=runs, failed=result, failed_scenario=scenario)
    return SwarmOutcome(runs=runs, failed=None, failed_scenario=None)
