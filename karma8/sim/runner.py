"""Runs one scenario with one seed: build the world, drive the workload and the events, wait
for the quiet phase, check the invariants, report.

A run is a pure function of (scenario, seed): :func:`run_scenario` returns the same
``trace_sha256`` every time, in any process.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
import trio

from karma8.core.errors import Karma8Error
from karma8.core.model import RebalanceStatus
from karma8.core.placement import usable_capacity
from karma8.sim import checker
from karma8.sim.cluster import SimCluster
from karma8.sim.determinism import run_deterministic
from karma8.sim.disk import WriteFault
from karma8.sim.fillseries import DEFAULT_INTERVAL, FillSampler, FillSeries
from karma8.sim.monitor import FaultTimeline, Monitor, ObservedLeases, ObservedStore
from karma8.sim.network import LinkFault
from karma8.sim.scenario import LINK_ACTIONS, Event, Scenario
from karma8.sim.workload import Client, History, Op, read_file
from karma8.sim.world import World

T = TypeVar("T")


@attrs.frozen(kw_only=True)
class NodeReport:
    id: str
    capacity_bytes: int
    used_bytes: int
    parts: int
    joined_at: float

    @property
    def fill(self) -> float:
        return self.used_bytes / self.capacity_bytes


@attrs.frozen(kw_only=True)
class SimResult:
    scenario: str
    seed: int
    trace_sha256: str
    invariants: dict[str, bool]
    violations: dict[str, list[str]]
    stats: dict[str, Any]
    nodes: list[NodeReport]
    fill: FillSeries | None = None  # each node's fill over the run (karma8/sim/fillseries.py)

    @property
    def ok(self) -> bool:
        return all(self.invariants.values())


def run_with_cluster(
    fn: Callable[[SimCluster], Awaitable[T]],
    *,
    scenario: Scenario | None = None,
    seed: int = 1,
) -> T:
    """Run ``fn`` against a started simulated cluster, deterministically (for tests and tools)."""
    spec = scenario or Scenario(name="adhoc")

    async def main() -> T:
        world = World(seed)
        async with trio.open_nursery() as nursery:
            await nursery.start(world.pump.run)
            cluster = SimCluster(world, spec, nursery)
            await cluster.start()
            result = await fn(cluster)
            nursery.cancel_scope.cancel()
        return result

    return run_deterministic(main, seed=seed)


def run_scenario(
    scenario: Scenario, seed: int | None = None, *, fill_interval: float = DEFAULT_INTERVAL
) -> SimResult:
    """Run ``scenario`` deterministically (``seed`` overrides the scenario's own); sample the
    nodes' fill every ``fill_interval`` virtual seconds (:class:`FillSeries`)."""
    seed = scenario.seed if seed is None else seed
    started = time.perf_counter()
    result = run_deterministic(lambda: _simulate(scenario, seed, fill_interval), seed=seed)
    wall = time.perf_counter() - started
    stats = dict(result.stats)
    stats["wall_seconds"] = round(wall, 3)
    return attrs.evolve(result, stats=stats)


def _fill_sampler(cluster: SimCluster, timeline: FaultTimeline, interval: float) -> FillSampler:
    def nodes() -> list[tuple[str, int, int, bool]]:
        network = cluster.network
        return [
            (n.node_id, n.disk.used, n.disk.capacity_bytes, network.endpoint(n.node_id).up)
            for n in cluster.nodes
        ]

    sampler = FillSampler(
        nodes=nodes,
        joins=lambda: [(n.node_id, n.joined_at) for n in cluster.nodes],
        timeline=timeline,
        start=trio.current_time(),
        interval=interval,
    )
    cluster.world.pump.on_wake = sampler.observe
    return sampler


async def _simulate(scenario: Scenario, seed: int, fill_interval: float) -> SimResult:
    world = World(seed)
    history = History()
    monitor = Monitor(history, FaultTimeline())
    async with trio.open_nursery() as nursery:
        await nursery.start(world.pump.run)
        cluster = SimCluster(
            world,
            scenario,
            nursery,
            store=ObservedStore(monitor),
            leases=lambda: ObservedLeases(monitor),
        )
        monitor.disk_of = cluster.disk_of
        monitor.tolerates = scenario.cluster.tolerates
        monitor.attach(cluster.store, nursery)
        await cluster.start()
        sampler = _fill_sampler(cluster, monitor.timeline, fill_interval)
        wall_start = time.perf_counter()
        async with trio.open_nursery() as load:
            load.start_soon(
                _play_events, cluster, monitor.timeline, scenario.events, name="sim-events"
            )
            for index in range(scenario.workload.clients):
                client = Client(
                    index=index,
                    world=world,
                    network=cluster.network,
                    spec=scenario.workload,
                    history=history,
                )
                load.start_soon(client.run, scenario.duration, name=f"sim-{client.name}")
        load_end = trio.current_time()
        load_wall = time.perf_counter() - wall_start
        world.record("quiet")
        await trio.sleep(scenario.quiet)
        finals = await _final_reads(cluster, history)
        rebalance = await cluster.rebalancer.status() if cluster.rebalancer else None
        result = _judge(
            scenario, seed, world, cluster, history, monitor, finals, load_end, load_wall
        )
        if rebalance is not None:
            result.stats["rebalance"] = _rebalance_stats(rebalance, cluster, monitor)
        if monitor.repairs:
            result.stats["repair"] = {
                "repaired_parts": len(monitor.repairs),
                "repaired_bytes": sum(size for *_, size in monitor.repairs),
            }
        result = attrs.evolve(result, fill=sampler.finish(trio.current_time()))
        nursery.cancel_scope.cancel()
    return result


async def _play_events(
    cluster: SimCluster, timeline: FaultTimeline, events: tuple[Event, ...]
) -> None:
    async with trio.open_nursery() as restarts:
        for event in events:
            await trio.sleep_until(event.at)
            cluster.world.record(f"event {event.action}")
            await _apply(cluster, timeline, event, restarts)


async def _restart_later(cluster: SimCluster, spec: str, at: float) -> None:
    await trio.sleep_until(at)
    cluster.restart(spec)


async def _apply(
    cluster: SimCluster, timeline: FaultTimeline, event: Event, restarts: trio.Nursery
) -> None:
    until = event.at + event.duration
    if event.action == "add_nodes":
        for capacity in event.added_capacities(cluster.scenario.cluster):
            await cluster.add_node(capacity)
    elif event.action == "crash":
        timeline.add("crash", event.at, until, [cluster.endpoint_name(event.target)])
        cluster.crash(event.target)
        restarts.start_soon(_restart_later, cluster, event.target, until, name="sim-restart")
    elif event.action == "disk_full":
        node = cluster.nodes[event.node]
        timeline.add("disk_full", event.at, until, [node.node_id])
        node.disk.full_until = max(node.disk.full_until, until)
    elif event.action in LINK_ACTIONS:
        a, b = (cluster.endpoint_name(spec) for spec in event.between)
        timeline.add(event.action, event.at, until, [a, b])
        cluster.network.faults.append(
            LinkFault(
                a=a,
                b=b,
                until=until,
                partitioned=event.action == "partition",
                extra_latency=event.latency,
                loss=event.loss,
            )
        )
    elif event.action == "wipe":
        # The node is lost with its disk; with a duration it comes back empty (a replaced
        # disk). Its parts stay lost where they were (repair rebuilds those of redundant
        # files elsewhere), so the fault never ends.
        name = cluster.endpoint_name(event.target)
        timeline.add("wipe", event.at, math.inf, [name])
        cluster.crash(event.target)
        disk = cluster.disk_of(name)
        assert disk is not None
        cluster.lost_keys.update(disk.wipe())
        if event.duration > 0:
            restarts.start_soon(_restart_later, cluster, event.target, until, name="sim-restart")
    elif event.action == "corrupt":
        name = cluster.endpoint_name(event.target)
        timeline.add("corrupt", event.at, math.inf, [name])
        disk = cluster.disk_of(name)
        assert disk is not None
        keys = sorted(disk.parts)
        rng = cluster.world.rng("corrupt")
        for key in rng.sample(keys, min(event.count, len(keys))):
            stored = disk.parts[key]
            data = stored.data
            if data:
                at = rng.randrange(len(data))
                stored.data = data[:at] + bytes([data[at] ^ 0x5A]) + data[at + 1 :]
                cluster.lost_keys.add(key)
    elif event.action == "fail_writes":
        node = cluster.nodes[event.node]
        timeline.add("fail_writes", event.at, until, [node.node_id])
        node.disk.faults.append(
            WriteFault(
                start=event.at,
                until=until,
                probability=event.probability,
                at_byte=event.at_byte,
            )
        )


async def _final_reads(cluster: SimCluster, history: History, *, readers: int = 16) -> list[Op]:
    """Read back every name ever written, ``readers`` at a time."""
    finals = [Op(kind="get", name=name, start=0.0) for name in sorted(history.by_name)]

    async def reader(index: int) -> None:
        for op in finals[index::readers]:
            op.start = trio.current_time()
            try:
                op.value, op.size = await read_file(cluster.network, f"checker-{index}", op.name)
                op.ok = True
            except Karma8Error as exc:  # judged later: any failure is a violation
                op.error = exc.code
            op.end = trio.current_time()

    async with trio.open_nursery() as nursery:
        for index in range(readers):
            nursery.start_soon(reader, index, name=f"sim-checker-{index}")
    return finals


def _judge(
    scenario: Scenario,
    seed: int,
    world: World,
    cluster: SimCluster,
    history: History,
    monitor: Monitor,
    finals: list[Op],
    load_end: float,
    load_wall: float,
) -> SimResult:
    reads = [op for op in history.ops if op.kind == "get" and op.ok]
    failed_reads, failed_writes = monitor.unexplained_failures()
    violations = {
        "acknowledged_writes_read_back": checker.final_reads(history, finals),
        "no_torn_or_stale_reads": checker.reads_consistent(history, reads),
        "committed_parts_stored": monitor.committed_parts,
        "failed_reads_explained": failed_reads,
        "failed_writes_explained": failed_writes,
        "failed_uploads_cleaned_up": monitor.uploads_cleaned,
        "parts_obey_layout": checker.layout_holds(cluster),
        "no_orphan_parts": checker.no_orphans(cluster),
        "reservations_released": checker.reservations_released(cluster),
        "moved_parts_stored": monitor.moved_parts,
    }
    checks = scenario.checks
    if checks.max_fill_spread_pp is not None:
        violations["fill_spread_within_bound"] = checker.fill_within(
            cluster, checks.max_fill_spread_pp
        )
    if checks.max_refused_puts is not None:
        violations["refused_puts_within_bound"] = checker.refusals_within(
            history, checks.max_refused_puts
        )
    if checks.full_redundancy:
        violations["full_redundancy_restored"] = checker.fully_redundant(cluster)
    if checks.failed_puts_only_in_flight:
        violations["failed_puts_were_in_flight"] = monitor.puts_failed_after_faults(
            {node.node_id for node in cluster.nodes}
        )
    if checks.max_move_ratio is not None:
        moved = sum(size for *_, size in monitor.moves)
        violations["moved_bytes_near_least"] = checker.moves_within(
            moved, checker.least_to_move(cluster, monitor.moves), checks.max_move_ratio
        )
    ops = Counter(op.kind for op in history.ops)
    ok_ops = Counter(op.kind for op in history.ops if op.ok)
    nodes = [
        NodeReport(
            id=node.node_id,
            capacity_bytes=node.disk.capacity_bytes,
            used_bytes=node.disk.used,
            parts=len(node.disk.parts),
            joined_at=round(node.joined_at, 6),
        )
        for node in cluster.nodes
    ]
    stats: dict[str, Any] = {
        "ops": {kind: ops.get(kind, 0) for kind in ("put", "get", "delete")},
        "succeeded": {kind: ok_ops.get(kind, 0) for kind in ("put", "get", "delete")},
        "failures": dict(sorted(history.failures().items())),
        "bytes_put": sum(op.size for op in history.ops if op.kind == "put" and op.ok),
        "files": len(cluster.store.versions()),
        "injected_write_failures": sum(node.disk.failed_writes for node in cluster.nodes),
        "network_calls": cluster.network.calls,
        "trace_events": world.trace_events,
        "load_seconds": round(load_end, 6),
        # Wall-clock figures are measurements, not part of the deterministic result.
        "load_wall_seconds": round(load_wall, 3),
        "puts_per_wall_second": round(ops.get("put", 0) / load_wall, 1) if load_wall else 0.0,
        "sim_seconds": round(trio.current_time(), 6),
        "fill_spread_pp": round(checker.fill_spread(cluster), 4),
        "capacity_bytes": sum(node.disk.capacity_bytes for node in cluster.nodes),
        "usable_capacity_bytes": usable_capacity([n.disk.capacity_bytes for n in cluster.nodes]),
    }
    stats["refused_puts"] = checker.refused_puts(history)
    return SimResult(
        scenario=scenario.name,
        seed=seed,
        trace_sha256=world.trace_sha256,
        invariants={name: not found for name, found in violations.items()},
        violations={name: found for name, found in violations.items() if found},
        stats=stats,
        nodes=nodes,
    )


def _rebalance_stats(
    status: RebalanceStatus, cluster: SimCluster, monitor: Monitor
) -> dict[str, Any]:
    """What the rebalancer did: bytes and parts moved, the least that had to move, what is left."""
    moved = sum(size for *_, size in monitor.moves)
    least = checker.least_to_move(cluster, monitor.moves)
    return {
        "moved_bytes": moved,
        "moved_parts": len(monitor.moves),
        "least_bytes": least,
        "ratio": round(checker.move_ratio(moved, least), 4),
        "remaining_bytes": status.remaining_bytes,
        "imbalance_pp": round(status.imbalance_pp, 4),
    }
