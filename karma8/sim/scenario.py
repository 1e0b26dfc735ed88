"""Scenario files: a TOML description of a cluster, a workload, faults and the checks.

The format is documented in docs/scenarios.md. Parsing is strict: an unknown key, a wrong type
or an out-of-range value is a :class:`ScenarioError` naming the key and, where it can be found,
the line, so a typo never silently turns a fault off.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)
_UNITS = {
    None: 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}


class ScenarioError(ValueError):
    """A scenario file that cannot be used, with what and where."""


@attrs.frozen(kw_only=True)
class ClusterSpec:
    storage_nodes: int = 6
    capacity: int = 1 << 30
    stripe_unit: int = 64 * 1024
    heartbeat_interval: float = 1.0
    node_timeout: float = 5.0
    upload_ttl: float = 60.0
    retire_grace: float = 5.0
    sweep_interval: float = 1.0


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
    max_fill_spread: float | None = None


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


ACTIONS = ("add_nodes", "fail_writes")


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
    events: tuple[Event, ...] = ()


def parse_size(value: object) -> int:
    """``65536``, ``"64 KiB"``, ``"1.5 GB"`` -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match:
            unit = match.group(2).lower() if match.group(2) else None
            return int(float(match.group(1)) * _UNITS[unit])
    raise ValueError(f"expected a size like 65536 or '64 KiB', got {value!r}")


class _Reader:
    """Pulls typed values out of one TOML table, remembering which keys were used."""

    def __init__(self, source: _Source, table: Mapping[str, Any], path: str) -> None:
        self._source = source
        self._table = table
        self._path = path
        self._used: set[str] = set()

    def _fail(self, key: str, message: str) -> ScenarioError:
        return self._source.error(self._path, key, message)

    def _get(self, key: str, default: Any) -> Any:
        self._used.add(key)
        return self._table.get(key, default)

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._fail(key, f"expected a number, got {value!r}")
        if value < minimum:
            raise self._fail(key, f"must be >= {minimum}, got {value}")
        return float(value)

    def integer(self, key: str, default: int, *, minimum: int = 0) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, f"expected an integer, got {value!r}")
        if value < minimum:
            raise self._fail(key, f"must be >= {minimum}, got {value}")
        return value

    def size(self, key: str, default: int, *, minimum: int = 0) -> int:
        try:
            value = parse_size(self._get(key, default))
        except ValueError as exc:
            raise self._fail(key, str(exc)) from None
        if value < minimum:
            raise self._fail(key, f"must be >= {minimum} bytes, got {value}")
        return value

    def string(self, key: str, default: str) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise self._fail(key, f"expected a string, got {value!r}")
        return value

    def number_range(self, key: str, default: tuple[float, float]) -> tuple[float, float]:
        value = self._get(key, list(default))
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        ):
            raise self._fail(key, f"expected [low, high] numbers, got {value!r}")
        lo, hi = float(value[0]), float(value[1])
        if not 0 <= lo <= hi:
            raise self._fail(key, f"expected 0 <= low <= high, got {value!r}")
        return lo, hi

    def size_range(self, key: str, default: tuple[int, int]) -> tuple[int, int]:
        value = self._get(key, list(default))
        if not isinstance(value, list) or len(value) != 2:
            raise self._fail(key, f"expected [smallest, largest] sizes, got {value!r}")
        try:
            lo, hi = parse_size(value[0]), parse_size(value[1])
        except ValueError as exc:
            raise self._fail(key, str(exc)) from None
        if lo > hi:
            raise self._fail(key, f"smallest is larger than largest: {value!r}")
        return lo, hi

    def table(self, key: str) -> _Reader:
        value = self._get(key, {})
        if not isinstance(value, dict):
            raise self._fail(key, "expected a table")
        return _Reader(self._source, value, f"{self._path}.{key}" if self._path else key)

    def finish(self) -> None:
        unknown = sorted(set(self._table) - self._used)
        if unknown:
            raise self._fail(unknown[0], f"unknown key (known: {', '.join(sorted(self._used))})")


class _Source:
    def __init__(self, origin: str, text: str) -> None:
        self.origin = origin
        self.lines = text.splitlines()

    def error(self, table: str, key: str, message: str) -> ScenarioError:
        where = f"{table}.{key}" if table else key
        line = self._line_of(table, key)
        at = f"{self.origin}:{line}" if line else self.origin
        return ScenarioError(f"{at}: {where}: {message}")

    def _line_of(self, table: str, key: str) -> int | None:
        # Tables of the array [[events]] are addressed as events[i].
        base = re.sub(r"\[\d+\]$", "", table)
        index = int(m.group(1)) if (m := re.search(r"\[(\d+)\]$", table)) else 0
        current, seen = "", -1
        for number, raw in enumerate(self.lines, start=1):
            line = raw.strip()
            header = re.fullmatch(r"\[\[?\s*([^\]]+?)\s*\]\]?", line)
            if header:
                current = header.group(1)
                if current == base:
                    seen += 1
                continue
            if current == base and seen in (index, -1) and re.match(rf"{re.escape(key)}\s*=", line):
                return number
        return None


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_scenario(text, origin=str(path), default_name=path.stem)


def parse_scenario(
    text: str, *, origin: str = "<scenario>", default_name: str = "scenario"
) -> Scenario:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{origin}: not valid TOML: {exc}") from None
    source = _Source(origin, text)
    top = _Reader(source, data, "")
    defaults = Scenario(name=default_name)

    c = top.table("cluster")
    cd = defaults.cluster
    cluster = ClusterSpec(
        storage_nodes=c.integer("storage_nodes", cd.storage_nodes, minimum=6),
        capacity=c.size("capacity", cd.capacity, minimum=1),
        stripe_unit=c.size("stripe_unit", cd.stripe_unit, minimum=1),
        heartbeat_interval=c.number("heartbeat_interval", cd.heartbeat_interval, minimum=0.001),
        node_timeout=c.number("node_timeout", cd.node_timeout, minimum=0.001),
        upload_ttl=c.number("upload_ttl", cd.upload_ttl, minimum=0.001),
        retire_grace=c.number("retire_grace", cd.retire_grace),
        sweep_interval=c.number("sweep_interval", cd.sweep_interval, minimum=0.001),
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
    spread = k._get("max_fill_spread", None)
    checks = ChecksSpec(
        max_fill_spread=None if spread is None else k.number("max_fill_spread", 0.0)
    )
    k.finish()

    raw_events = top._get("events", [])
    if not isinstance(raw_events, list):
        raise source.error("", "events", "expected an array of tables ([[events]])")
    events = []
    for i, raw in enumerate(raw_events):
        if not isinstance(raw, dict):
            raise source.error("", "events", f"event {i} is not a table")
        e = _Reader(source, raw, f"events[{i}]")
        action = e.string("action", "")
        if action not in ACTIONS:
            raise e._fail("action", f"unknown action {action!r} (known: {', '.join(ACTIONS)})")
        event = Event(
            at=e.number("at", 0.0),
            action=action,
            count=e.integer("count", 1, minimum=1),
            node=e.integer("node", 0),
            duration=e.number("duration", 0.0),
            probability=e.number("probability", 1.0),
            at_byte=e.integer("at_byte", 0),
        )
        if event.probability > 1.0:
            raise e._fail("probability", f"must be <= 1, got {event.probability}")
        e.finish()
        events.append(event)

    scenario = Scenario(
        name=top.string("name", default_name),
        description=top.string("description", ""),
        seed=top.integer("seed", defaults.seed),
        duration=top.number("duration", defaults.duration),
        quiet=top.number("quiet", defaults.quiet),
        cluster=cluster,
        network=network,
        disk=disk,
        workload=workload,
        checks=checks,
        events=tuple(sorted(events, key=lambda ev: ev.at)),
    )
    top.finish()
    _check_event_nodes(source, scenario)
    return scenario


def _check_event_nodes(source: _Source, scenario: Scenario) -> None:
    """An event may name a node that exists by its time (initial or added earlier)."""
    nodes = scenario.cluster.storage_nodes
    for i, event in enumerate(scenario.events):
        if event.action == "add_nodes":
            nodes += event.count
        elif event.node >= nodes:
            raise source.error(
                f"events[{i}]",
                "node",
                f"node {event.node} does not exist at t={event.at} (nodes 0..{nodes - 1})",
            )
