"""Prometheus metrics of a karma8 process (``GET /metrics`` on every role, text format).

One registry per process: the roles a process runs (all of them, in the embedded cluster)
share it and tell their series apart by the ``role`` label, so each role's ``/metrics``
shows the whole process. Requests are counted as they end; what is a state rather than an
event (uploads in flight, each node's fill, pending versions, the rebalancer's and the
actors' counts) is read when scraped, from *sources* the serving roles register
(:meth:`Metrics.source`) and drop when they stop.

The actors know nothing of Prometheus: they keep plain counts, which sources read.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# No ``*_created`` series beside every counter: they double the text and nobody graphs them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated upstream
# Request latency buckets, seconds: a 4 KiB request takes about a millisecond, a 256 MiB one
# about a second on a fast disk, and a stalled client up to the idle timeout.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# What a source yields: (name, kind, help, labels, value) per sample; kind "gauge" or
# "counter" (a count that only grows, kept by an actor).
Sample = tuple[str, str, str, dict[str, str], float]
Source = Callable[[], Awaitable[Iterable[Sample]]]


class _Snapshot(Collector):
    """Hands the registry the samples the last refresh gathered from the sources."""

    def __init__(self) -> None:
        self.samples: list[Sample] = []

    def collect(self) -> Iterator[Metric]:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for name, kind, text, labels, value in self.samples:
            family = families.get(name)
            if family is None:
                maker = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                family = families[name] = maker(name, text, labels=sorted(labels))
            family.add_metric([labels[k] for k in sorted(labels)], value)
        yield from families.values()


class Metrics:
    """The process's registry: request metrics, and the sources read at each scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "karma8_http_requests",
            "Requests answered (status '-': the client left before an answer)",
            ["role", "route", "method", "status"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "karma8_http_request_duration_seconds",
            "Time from a request's head to the end of its answer",
            ["role", "route", "method"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.sent = Counter(
            "karma8_http_sent_bytes",
            "Response body bytes sent",
            ["role", "route"],
            registry=self.registry,
        )
        self.received = Counter(
            "karma8_http_received_bytes",
            "Request body bytes received",
            ["role", "route"],
            registry=self.registry,
        )
        self._sources: dict[int, Source] = {}
        self._snapshot = _Snapshot()
        self.registry.register(self._snapshot)

    def observe(
        self,
        *,
        role: str,
        route: str,
        method: str,
        status: int | None,
        sent: int,
        received: int,
        started: float,
    ) -> None:
        """A request that ended (``started``: its ``time.perf_counter()``)."""
        shown = "-" if status is None else str(status)
        self.requests.labels(role, route, method, shown).inc()
        self.seconds.labels(role, route, method).observe(time.perf_counter() - started)
        if sent:
            self.sent.labels(role, route).inc(sent)
        if received:
            self.received.labels(role, route).inc(received)

    @contextlib.contextmanager
    def source(self, read: Source) -> Iterator[None]:
        """Read ``read`` at every scrape while the context lasts."""
        key = id(read)
        self._sources[key] = read
        try:
            yield
        finally:
            self._sources.pop(key, None)

    async def render(self) -> bytes:
        """The text format, after reading every source (a failing source is left out)."""
        samples: list[Sample] = []
        for read in list(self._sources.values()):
            try:
                samples.extend(await read())
            except Exception:  # a source that cannot answer now (discovery unreachable...)
                continue
        self._snapshot.samples = samples
        return generate_latest(self.registry)


METRICS = Metrics()
