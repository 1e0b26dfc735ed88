"""Each storage node's fill over simulated time, sampled without disturbing the run.

The :class:`FillSampler` adds no task and no scheduling point. It rides on the world's
:class:`~karma8.sim.pump.Pump`: each time the pump wakes (every simulated hop, chunk and fsync
goes through it, and every heartbeat makes a hop), it calls :meth:`FillSampler.observe`
before it wakes anyone. Time only jumps when every task is blocked, so the disks then hold
what they held at every sample time passed since the previous wake-up: the sampler records
those samples and returns. It only reads (disk sizes, whether a node's endpoint is up), so
the trace of a run, and with it its ``trace_sha256``, is the same with or without it.

Samples fall on a regular grid, ``k * interval`` virtual seconds, from the first grid point
after the cluster started; :meth:`FillSampler.finish` adds one last sample at the end of the
run, which matches the report's final table. When the grid passes :data:`MAX_SAMPLES`, every
other sample is dropped and the interval doubles, so a long run costs at most that many
samples per node.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from karma8.core import rebalance

if TYPE_CHECKING:  # annotations only: `karma8 --help` and the admin commands skip the sim
    from karma8.sim.monitor import FaultTimeline, FaultWindow

DEFAULT_INTERVAL = 0.25  # virtual seconds between samples
MAX_SAMPLES = 2000  # regular samples kept per run (each holds every node) before thinning
JSON_POINTS = 200  # samples in the ``fill_series`` of ``karma8 sim --json``


@attrs.frozen(kw_only=True)
class NodeFill:
    """One storage node at one sample."""

    node_id: str
    used_bytes: int  # bytes of committed parts on its simulated disk
    capacity_bytes: int
    up: bool  # False while the node is crashed

    @property
    def fill(self) -> float:
        """``used_bytes / capacity_bytes``, in [0, 1]."""
        return self.used_bytes / self.capacity_bytes


@attrs.frozen(kw_only=True)
class FillSample:
    at: float  # virtual seconds
    nodes: tuple[NodeFill, ...]  # every node that has joined by ``at``, in join order
    spread_pp: float  # max - min fill among ``nodes``, in percentage points


@attrs.frozen(kw_only=True)
class NodeJoin:
    node_id: str
    index: int  # the node's number in scenario events (``node = N``, ``"node:N"``)
    at: float


@attrs.frozen(kw_only=True)
class FillSeries:
    """The fill of every storage node over a run, with the faults and joins that shaped it."""

    interval: float  # virtual seconds between regular samples (the last one may be closer)
    samples: tuple[FillSample, ...]
    joins: tuple[NodeJoin, ...]  # every node, in join order (the initial ones at t ≈ 0)
    faults: tuple[FaultWindow, ...]  # as applied during the run, see monitor.FaultTimeline

    @property
    def node_ids(self) -> list[str]:
        return [join.node_id for join in self.joins]

    def track(self, node_id: str) -> tuple[list[float], list[float], list[bool]]:
        """(times, fills, up) of one node, from its first sample on."""
        times: list[float] = []
        fills: list[float] = []
        up: list[bool] = []
        for sample in self.samples:
            for node in sample.nodes:
                if node.node_id == node_id:
                    times.append(sample.at)
                    fills.append(node.fill)
                    up.append(node.up)
                    break
        return times, fills, up

    def downsampled(self, max_points: int) -> FillSeries:
        """At most ``max_points`` samples: every ``step``-th one, and always the last."""
        count = len(self.samples)
        if count <= max_points or max_points < 2:
            return self
        step = math.ceil((count - 1) / (max_points - 1))
        kept = self.samples[:-1:step] + self.samples[-1:]
        return attrs.evolve(self, interval=self.interval * step, samples=kept)


class FillSampler:
    """Samples every node's fill on a regular virtual-time grid; see the module docstring.

    ``nodes`` returns ``(node id, used bytes, capacity, up)`` for every joined node, in join
    order; ``joins`` returns ``(node id, join time)`` likewise.
    """

    def __init__(
        self,
        *,
        nodes: Callable[[], Sequence[tuple[str, int, int, bool]]],
        joins: Callable[[], Sequence[tuple[str, float]]],
        timeline: FaultTimeline,
        start: float,
        interval: float = DEFAULT_INTERVAL,
        max_samples: int = MAX_SAMPLES,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"the sample interval must be > 0 s, got {interval}")
        if max_samples < 2:
            raise ValueError(f"max_samples must be >= 2, got {max_samples}")
        self._nodes = nodes
        self._joins = joins
        self._timeline = timeline
        self.interval = interval
        self._max = max_samples
        self._next = math.ceil(start / interval)  # grid index of the next sample
        self._samples: list[tuple[int, FillSample]] = []

    def observe(self, now: float) -> None:
        """Record every grid sample due by ``now`` (the pump calls this as it wakes)."""
        if now < self._next * self.interval:
            return
        while self._next * self.interval <= now:
            self._samples.append((self._next, self._sample(self._next * self.interval)))
            self._next += 1
            if len(self._samples) > self._max:
                self._thin()

    def _sample(self, at: float) -> FillSample:
        nodes = tuple(
            NodeFill(node_id=node_id, used_bytes=used, capacity_bytes=capacity, up=up)
            for node_id, used, capacity, up in self._nodes()
        )
        spread = rebalance.spread_pp(
            [
                rebalance.NodeFill(
                    node_id=n.node_id, capacity=n.capacity_bytes, live=n.used_bytes, free=0
                )
                for n in nodes
            ]
        )
        return FillSample(at=round(at, 6), nodes=nodes, spread_pp=round(spread, 4))

    def _thin(self) -> None:
        """Keep the samples on a grid twice as coarse."""
        self._samples = [(k // 2, s) for k, s in self._samples if k % 2 == 0]
        self.interval *= 2
        self._next = math.ceil(self._next / 2)

    def finish(self, now: float) -> FillSeries:
        """The series up to ``now`` (the end of the run), ending with a sample at ``now``."""
        self.observe(now)
        samples = [sample for _, sample in self._samples]
        if not samples or samples[-1].at < round(now, 6):
            samples.append(self._sample(now))
        return FillSeries(
            interval=self.interval,
            samples=tuple(samples),
            joins=tuple(
                NodeJoin(node_id=node_id, index=index, at=round(at, 6))
                for index, (node_id, at) in enumerate(self._joins())
            ),
            faults=tuple(self._timeline.windows),
        )


# -- JSON ----------------------------------------------------------------------------------


def to_json(series: FillSeries, *, max_points: int = JSON_POINTS) -> dict[str, Any]:
    """Column form, at most ``max_points`` samples; a node's ``used_bytes`` is ``null`` at
    samples before it joined, and ``down`` lists the spans of samples it was down."""
    series = series.downsampled(max_points)
    nodes = []
    for join in series.joins:
        used: list[int | None] = []
        down: list[list[float]] = []  # [first, last] sample time of each run of down samples
        capacity: int | None = None
        was_down = False
        for sample in series.samples:
            node = next((n for n in sample.nodes if n.node_id == join.node_id), None)
            used.append(None if node is None else node.used_bytes)
            if node is not None:
                capacity = node.capacity_bytes
            is_down = node is not None and not node.up
            if is_down and was_down:
                down[-1][1] = sample.at
            elif is_down:
                down.append([sample.at, sample.at])
            was_down = is_down
        nodes.append(
            {
                "id": join.node_id,
                "index": join.index,
                "joined_at": join.at,
                "capacity_bytes": capacity,
                "used_bytes": used,
                "down": down,
            }
        )
    return {
        "interval": series.interval,
        "t": [sample.at for sample in series.samples],
        "spread_pp": [sample.spread_pp for sample in series.samples],
        "nodes": nodes,
        "faults": [
            {"kind": w.kind, "start": w.start, "until": w.until, "actors": sorted(w.actors)}
            for w in series.faults
        ],
    }


def json_text(value: Any, *, level: int = 0, indent: int = 2) -> str:
    """``json.dumps(value, indent=indent)``, but a list of numbers (or nulls, or booleans)
    stays on one line: a series is a few lines, not one line per number."""
    pad = " " * (indent * (level + 1))
    end = " " * (indent * level)
    if isinstance(value, dict) and value:
        items = [
            f"{pad}{json.dumps(key)}: {json_text(item, level=level + 1, indent=indent)}"
            for key, item in value.items()
        ]
        return "{\n" + ",\n".join(items) + f"\n{end}}}"
    if isinstance(value, list) and value:
        if all(item is None or isinstance(item, int | float) for item in value):
            return json.dumps(value)
        items = [f"{pad}{json_text(item, level=level + 1, indent=indent)}" for item in value]
        return "[\n" + ",\n".join(items) + f"\n{end}]"
    return json.dumps(value)
