"""Scenario files: a TOML description of a cluster, a workload, faults and the checks.

The format is documented in docs/scenarios.md. Parsing is strict: an unknown key, a wrong type
or an out-of-range value is a :class:`ScenarioError` naming the key and, where it can be found,
the line, so a typo never silently turns a fault off.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import attrs

from karma8.actors.discovery import DiscoveryConfig
from karma8.actors.gateway import GatewayConfig
from karma8.actors.rebalancer import RebalancerConfig, read_rebalance
from karma8.actors.repair import RepairConfig, read_repair
from karma8.actors.storage import StorageConfig
from karma8.core.layout import StripeLayout, engine_redundancy
from karma8.core.tomlconf import ConfigError, ConfigSource, TableReader

T = TypeVar("T")


class ScenarioError(ConfigError):
    """A scenario file that cannot be used, with what and where."""


# The actors' settings default to the actors' own configs, as in net mode: one definition.
_DISCOVERY = DiscoveryConfig()
_STORAGE = StorageConfig()
_GATEWAY = GatewayConfig()


@attrs.frozen(kw_only=True)
class ClusterSpec:
    """The initial cluster and the actors' timers.

    ``capacity`` is one size for every initial node, or one size per initial node.
    """

    storage_nodes: int = 6
    capacity: int | tuple[int, ...] = attrs.field(default=1 << 30)
    stripe_unit: int = _DISCOVERY.layout.unit
    heartbeat_interval: float = _STORAGE.heartbeat_interval
    node_timeout: float = _DISCOVERY.node_timeout
    upload_ttl: float = _DISCOVERY.upload_ttl
    retire_grace: float = _DISCOVERY.retire_grace
    sweep_interval: float = _DISCOVERY.sweep_interval
    orphan_check_interval: float = _STORAGE.orphan_check_interval
    orphan_grace: float = _STORAGE.orphan_grace
    placement_lease: float = _DISCOVERY.placement_lease
    # How often each node's scrubber re-reads all its parts (0: never).
    scrub_interval: float = _STORAGE.scrub_interval
    # Bodies up to this size take the small-file path (0: every body streams).
    small_file_max: int = _GATEWAY.small_file_max
    # The engine of the workload's namespace (see karma8.core.layout.engine_redundancy).
    engine: str = "raid0"
    copies: int | None = None
    parity: int | None = None

    @property
    def tolerates(self) -> int:
        """How many lost, wiped or corrupt nodes the workload's files survive."""
        copies, parity = engine_redundancy(self.engine, copies=self.copies, parity=self.parity)
        return copies - 1 + parity

    @capacity.validator
    def _one_per_node(self, attribute: object, value: int | tuple[int, ...]) -> None:
        if isinstance(value, tuple) and len(value) != self.storage_nodes:
            raise ValueError(f"{len(value)} capacities for {self.storage_nodes} storage nodes")

    def initial_capacities(self) -> tuple[int, ...]:
        """The capacity of each initial node, in join order."""
        if isinstance(self.capacity, int):
            return (self.capacity,) * self.storage_nodes
        return self.capacity

    @property
    def join_capacity(self) -> int:
        """Capacity of a node added without its own: the largest initial capacity.

        A node added later is assumed to be no smaller than any already in the cluster.
        """
        return self.capacity if isinstance(self.capacity, int) else max(self.capacity)

    @property
    def settle_seconds(self) -> float:
        """How long garbage takes to go once the load stops, under these timers: retired parts
        after their grace, orphans after a check and their grace, each confirmed by heartbeats.
        A scenario's quiet phase is at least this long unless it says otherwise."""
        return (
            self.retire_grace
            + self.orphan_check_interval
            + self.orphan_grace
            + 5 * self.heartbeat_interval
            + 2 * self.sweep_interval
        )


@attrs.frozen(kw_only=True)
class NetworkSpec:
    latency: tuple[float, float] = (0.0002, 0.002)
    bandwidth: float = 1e9


@attrs.frozen(kw_only=True)
class DiskSpec:
    fsync_latency: float = 0.0005


@attrs.frozen(kw_only=True)
class WorkloadSpec:
    clients: int = 8
    names: int = 200
    file_size: tuple[int, int] = (0, 64 * 1024)
    think_time: tuple[float, float] = (0.0, 0.02)
    put: float = 6.0
    get: float = 3.0
    delete: float = 1.0


@attrs.frozen(kw_only=True)
class ChecksSpec:
    # max - min of the nodes' fill (used / capacity) at the end, in percentage points, among
    # the nodes that can fill (not capped at a fifth of the bytes by the layout).
    max_fill_spread_pp: float | None = None
    # PUTs refused (not_enough_nodes) while the cluster held less than its usable capacity.
    max_refused_puts: int | None = None
    # Bytes the rebalancer moved over the least any rebalancer must move to reach the end state.
    max_move_ratio: float | None = None
    # A failed PUT must have been in flight when a fault on a storage node began: PUTs that
    # start later find the node avoided (suspect or unavailable) or their part placed again.
    failed_puts_only_in_flight: bool = False
    # Every current file of a redundant engine is back at full redundancy at the end: each
    # stored part intact on an available node (repair rebuilt what the faults took).
    full_redundancy: bool = False


@attrs.frozen(kw_only=True)
class Event:
    """A scheduled change to the world. ``action`` picks which fields matter."""

    at: float
    action: str
    count: int = 1
    node: int = 0
    duration: float = 0.0
    probability: float = 1.0
    at_byte: int = 0
    target: str = ""
    between: tuple[str, str] = ("", "")
    latency: float = 0.0
    loss: float = 0.0
    # add_nodes: one capacity per added node; empty means each gets the cluster's join_capacity.
    capacity: tuple[int, ...] = attrs.field(default=())

    @capacity.validator
    def _one_per_added_node(self, attribute: object, value: tuple[int, ...]) -> None:
        if value and len(value) != self.count:
            raise ValueError(f"{len(value)} capacities for {self.count} added nodes")

    def added_capacities(self, cluster: ClusterSpec) -> tuple[int, ...]:
        """The capacity of each node an ``add_nodes`` event adds, in join order."""
        return self.capacity or (cluster.join_capacity,) * self.count


ACTIONS = (
    "add_nodes",
    "fail_writes",
    "disk_full",
    "crash",
    "partition",
    "slow_link",
    "lossy_link",
    "wipe",
    "corrupt",
)
LINK_ACTIONS = ("partition", "slow_link", "lossy_link")
_TARGET = re.compile(r"discovery|gateway|node:(\d+)")
_PEER = re.compile(r"discovery|gateway|node:(\d+)|\*")


def target_node(spec: str) -> int | None:
    """The node index of a ``node:N`` spec, else None."""
    match = _TARGET.fullmatch(spec)
    return int(match.group(1)) if match and match.group(1) is not None else None


@attrs.frozen(kw_only=True)
class Scenario:
    name: str
    description: str = ""
    seed: int = 1
    duration: float = 30.0
    quiet: float = 30.0
    cluster: ClusterSpec = ClusterSpec()
    network: NetworkSpec = NetworkSpec()
    disk: DiskSpec = DiskSpec()
    workload: WorkloadSpec = WorkloadSpec()
    checks: ChecksSpec = ChecksSpec()
    rebalance: RebalancerConfig = attrs.Factory(RebalancerConfig)
    repair: RepairConfig = attrs.Factory(RepairConfig)
    events: tuple[Event, ...] = ()


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"{path}: not UTF-8 text (byte {exc.start}): not TOML") from None
    return parse_scenario(text, origin=str(path), default_name=path.stem)


def parse_scenario(
    text: str, *, origin: str = "<scenario>", default_name: str = "scenario"
) -> Scenario:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{origin}: not valid TOML: {exc}") from None
    source = ConfigSource(origin, text, error_type=ScenarioError)
    top = TableReader(source, data, "")
    defaults = Scenario(name=default_name)

    c = top.table("cluster")
    cd = defaults.cluster
    storage_nodes = c.integer("storage_nodes", cd.storage_nodes, minimum=6)
    cluster = ClusterSpec(
        storage_nodes=storage_nodes,
        capacity=c.sizes(
            "capacity", cd.capacity, count=storage_nodes, each="storage node", minimum=1
        ),
        stripe_unit=c.size("stripe_unit", cd.stripe_unit, minimum=1),
        heartbeat_interval=c.number("heartbeat_interval", cd.heartbeat_interval, minimum=0.001),
        node_timeout=c.number("node_timeout", cd.node_timeout, minimum=0.001),
        upload_ttl=c.number("upload_ttl", cd.upload_ttl, minimum=0.001),
        retire_grace=c.number("retire_grace", cd.retire_grace),
        sweep_interval=c.number("sweep_interval", cd.sweep_interval, minimum=0.001),
        orphan_check_interval=c.number(
            "orphan_check_interval", cd.orphan_check_interval, minimum=0.001
        ),
        orphan_grace=c.number("orphan_grace", cd.orphan_grace),
        placement_lease=c.number("placement_lease", cd.placement_lease, minimum=0.001),
        scrub_interval=c.number("scrub_interval", cd.scrub_interval),
        small_file_max=c.size("small_file_max", cd.small_file_max),
        engine=c.string("engine", cd.engine),
        copies=_optional(c, "copies", lambda key: c.integer(key, 2)),
        parity=_optional(c, "parity", lambda key: c.integer(key, 1)),
    )
    try:
        copies, parity = engine_redundancy(
            cluster.engine, copies=cluster.copies, parity=cluster.parity
        )
    except ValueError as exc:
        raise c.fail("engine", str(exc)) from None
    slots = StripeLayout(copies=copies, parity=parity).slots  # each on a node of its own
    if storage_nodes < slots:
        raise c.fail(
            "storage_nodes",
            f"{cluster.engine} puts a file's {slots} parts on {slots} nodes: give at least"
            f" {slots}, got {storage_nodes}",
        )
    c.finish()

    n = top.table("network")
    network = NetworkSpec(
        latency=n.number_range("latency", defaults.network.latency),
        bandwidth=float(n.size("bandwidth", int(defaults.network.bandwidth), minimum=1)),
    )
    n.finish()

    d = top.table("disk")
    disk = DiskSpec(fsync_latency=d.number("fsync_latency", defaults.disk.fsync_latency))
    d.finish()

    w = top.table("workload")
    wd = defaults.workload
    mix = w.table("mix")
    workload = WorkloadSpec(
        clients=w.integer("clients", wd.clients, minimum=1),
        names=w.integer("names", wd.names, minimum=1),
        file_size=w.size_range("file_size", wd.file_size),
        think_time=w.number_range("think_time", wd.think_time),
        put=mix.number("put", wd.put),
        get=mix.number("get", wd.get),
        delete=mix.number("delete", wd.delete),
    )
    mix.finish()
    w.finish()
    if workload.put + workload.get + workload.delete <= 0:
        raise source.error("workload.mix", "put", "at least one operation needs a weight > 0")

    k = top.table("checks")
    checks = ChecksSpec(
        max_fill_spread_pp=_optional(k, "max_fill_spread_pp", lambda key: k.number(key, 0.0)),
        max_refused_puts=_optional(k, "max_refused_puts", lambda key: k.integer(key, 0)),
        max_move_ratio=_optional(k, "max_move_ratio", lambda key: k.number(key, 1.0)),
        failed_puts_only_in_flight=k.boolean("failed_puts_only_in_flight", False),
        full_redundancy=k.boolean("full_redundancy", False),
    )
    k.finish()

    rebalance = read_rebalance(top.table("rebalance"), defaults.rebalance)
    repair = read_repair(top.table("repair"), defaults.repair)

    raw_events = top.get("events", [])
    if not isinstance(raw_events, list):
        raise source.error("", "events", "expected an array of tables ([[events]])")
    events = []
    for i, raw in enumerate(raw_events):
        if not isinstance(raw, dict):
            raise source.error("", "events", f"event {i} is not a table")
        e = TableReader(source, raw, f"events[{i}]")
        action = e.string("action", "")
        if action not in ACTIONS:
            raise e.fail("action", f"unknown action {action!r} (known: {', '.join(ACTIONS)})")
        count = e.integer("count", 1, minimum=1)
        event = Event(
            at=e.number("at", 0.0),
            action=action,
            count=count,
            node=e.integer("node", 0),
            duration=e.number("duration", 0.0),
            probability=e.number("probability", 1.0),
            at_byte=e.integer("at_byte", 0),
            target=e.string("target", ""),
            between=_pair(e, "between"),
            latency=e.number("latency", 0.0),
            loss=e.number("loss", 0.0),
            capacity=_added_capacities(e, count),
        )
        _check_event(e, event)
        e.finish()
        events.append(event)

    scenario = Scenario(
        name=top.string("name", default_name),
        description=top.string("description", ""),
        seed=top.integer("seed", defaults.seed),
        duration=top.number("duration", defaults.duration),
        quiet=top.number("quiet", max(defaults.quiet, cluster.settle_seconds)),
        cluster=cluster,
        network=network,
        disk=disk,
        workload=workload,
        checks=checks,
        rebalance=rebalance,
        repair=repair,
        events=tuple(sorted(events, key=lambda ev: ev.at)),
    )
    top.finish()
    _check_event_nodes(source, scenario)
    return scenario


def _optional(table: TableReader, key: str, read: Callable[[str], T]) -> T | None:
    """A key with no default: None when absent, else read (and checked) by ``read``."""
    return None if table.get(key, None) is None else read(key)


def _added_capacities(e: TableReader, count: int) -> tuple[int, ...]:
    if e.get("capacity", None) is None:
        return ()
    sizes = e.sizes("capacity", 0, count=count, each="added node", minimum=1)
    return sizes if isinstance(sizes, tuple) else (sizes,) * count


def _pair(e: TableReader, key: str) -> tuple[str, str]:
    value = e.get(key, ["", ""])
    if not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, str) for v in value):
        raise e.fail(key, f"expected two endpoints like ['gateway', 'node:2'], got {value!r}")
    return value[0], value[1]


def _check_event(e: TableReader, event: Event) -> None:
    """Per-action requirements, so that a typo never makes an event silently do nothing."""
    if event.probability > 1.0:
        raise e.fail("probability", f"must be <= 1, got {event.probability}")
    if event.action in ("fail_writes", "disk_full", "crash", *LINK_ACTIONS) and event.duration <= 0:
        raise e.fail("duration", f"{event.action} needs a duration > 0")
    if event.action in ("wipe", "corrupt") and target_node(event.target) is None:
        raise e.fail(
            "target", f"{event.action} needs a storage node 'node:N', got {event.target!r}"
        )
    if event.action == "crash" and not _TARGET.fullmatch(event.target):
        raise e.fail("target", f"expected 'discovery', 'gateway' or 'node:N', got {event.target!r}")
    if event.action in LINK_ACTIONS:
        a, b = event.between
        if not _TARGET.fullmatch(a) or not _PEER.fullmatch(b):
            raise e.fail(
                "between", f"expected two endpoints like ['gateway', 'node:2'], got {[a, b]!r}"
            )
    if event.action == "slow_link" and event.latency <= 0:
        raise e.fail("latency", "slow_link needs an extra latency > 0 (seconds)")
    if event.action == "lossy_link" and not 0 < event.loss <= 1:
        raise e.fail("loss", "lossy_link needs a loss probability in (0, 1]")


def _event_nodes(event: Event) -> list[tuple[str, int]]:
    nodes: list[tuple[str, int]] = []
    if event.action in ("fail_writes", "disk_full"):
        nodes.append(("node", event.node))
    for key, spec in (
        ("target", event.target),
        ("between", event.between[0]),
        ("between", event.between[1]),
    ):
        index = target_node(spec)
        if index is not None:
            nodes.append((key, index))
    return nodes


def _check_event_nodes(source: ConfigSource, scenario: Scenario) -> None:
    """An event may name a node that exists by its time (initial or added earlier)."""
    nodes = scenario.cluster.storage_nodes
    for i, event in enumerate(scenario.events):
        if event.action == "add_nodes":
            nodes += event.count
        for key, index in _event_nodes(event):
            if index >= nodes:
                raise source.error(
                    f"events[{i}]",
                    key,
                    f"node {index} does not exist at t={event.at} (nodes 0..{nodes - 1})",
                )
