"""The karma8-only workloads of ``bench/compare.py``, run after the stores are stopped:
the gateway's memory (``bench/gateway_rss.py``) and the simulator's speed
(``bench/sim_speed.py``). A failure is recorded for the report, not raised."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from gateway_rss import RssRow, measure_gateway_rss
from settings import QUICK_RSS_SIZES_MIB, REPO, Settings
from sim_speed import SimSpeed, measure_sim_speed

SIM_SCENARIO = REPO / "scenarios" / "add_nodes.toml"


@dataclass
class RssOutcome:
    """The rss workload: the rows measured (all of them, or those before a failure)."""

    sizes: list[int]
    rows: list[RssRow] = field(default_factory=list)
    error: str | None = None


@dataclass
class SimOutcome:
    runs: int
    speed: SimSpeed | None = None
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None or (self.speed is not None and not self.speed.deterministic)


def short_error(exc: Exception, limit: int = 400) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_rss(s: Settings, workdir: Path) -> RssOutcome:
    """The rss workload, in ``workdir``/gateway-rss; a failure is recorded, not raised."""
    outcome = RssOutcome(s.rss_sizes)
    quick = " (--quick)" if s.quick and s.rss_sizes == list(QUICK_RSS_SIZES_MIB) else ""
    print(
        f"gateway RSS: sizes {', '.join(f'{m} MiB' for m in s.rss_sizes)}{quick}",
        flush=True,
    )

    def on_row(row: RssRow) -> None:
        outcome.rows.append(row)
        print(
            f"gateway RSS  {row.mib:>5} MiB  idle {row.idle_kib / 1024:.1f} MiB,"
            f" peak {row.peak_kib / 1024:.1f} MiB, PUT {row.put_mb_s:.0f} MB/s,"
            f" GET {row.get_mb_s:.0f} MB/s",
            flush=True,
        )

    try:
        measure_gateway_rss(s.rss_sizes, workdir / "gateway-rss", on_row)
    except Exception as exc:  # reported in the table; the other workloads still run
        outcome.error = short_error(exc)
        print(f"gateway RSS failed: {exc}", file=sys.stderr, flush=True)
    return outcome


def run_sim(s: Settings) -> SimOutcome:
    """The sim workload; a failure is recorded, not raised."""
    outcome = SimOutcome(s.sim_runs)
    print(
        f"simulator speed: {SIM_SCENARIO.relative_to(REPO)},"
        f" {s.sim_runs} run{'s' if s.sim_runs != 1 else ''}",
        flush=True,
    )

    def on_run(i: int, rate: float) -> None:
        print(f"simulator    run {i}/{s.sim_runs}  {rate:,.0f} PUTs per wall-second", flush=True)

    try:
        outcome.speed = measure_sim_speed(SIM_SCENARIO, s.sim_runs, on_run)
    except Exception as exc:  # reported in the table
        outcome.error = short_error(exc)
        print(f"simulator speed failed: {exc}", file=sys.stderr, flush=True)
    return outcome
