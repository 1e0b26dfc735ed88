"""Simulator speed: simulated PUTs per wall-second during the load phase of a scenario.

.venv/bin/python bench/sim_speed.py [scenarios/add_nodes.toml] [--runs 3]

``measure_sim_speed`` is the same measurement for other scripts (bench/compare.py).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from karma8.sim.runner import run_scenario
from karma8.sim.scenario import load_scenario

DEFAULT_SCENARIO = "scenarios/add_nodes.toml"
GOAL_PUTS_PER_SECOND = 500


@dataclass(frozen=True)
class SimSpeed:
    """The rates of ``runs`` runs of one scenario, and what the (first) run did."""

    scenario: str
    rates: list[float]  # simulated PUTs per wall-second in the load phase, one per run
    puts: int
    gets: int
    file_size: tuple[int, int]  # bytes, min and max
    load_seconds: float  # simulated
    wall_seconds: float  # the whole first run: load, quiet phase and final reads
    deterministic: bool  # every run had the same trace

    @property
    def runs(self) -> int:
        return len(self.rates)

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    def describe(self) -> str:
        return (
            f"scenario {self.scenario}: {self.puts} PUTs of {self.file_size[0]}"
            f"..{self.file_size[1]} bytes, {self.gets} GETs in"
            f" {self.load_seconds:.0f} simulated s"
        )


def measure_sim_speed(
    scenario_path: str | Path = DEFAULT_SCENARIO,
    runs: int = 3,
    on_run: Callable[[int, float], None] | None = None,
) -> SimSpeed:
    """Run the scenario ``runs`` times in this process; ``on_run`` sees (run number, rate)."""
    if runs < 1:
        raise ValueError(f"runs must be at least 1, not {runs}")
    scenario = load_scenario(scenario_path)
    rates: list[float] = []
    traces: set[str] = set()
    first = None
    for i in range(1, runs + 1):
        result = run_scenario(scenario)
        if first is None:
            first = result
        traces.add(result.trace_sha256)
        rate = float(result.stats["puts_per_wall_second"])
        rates.append(rate)
        if on_run is not None:
            on_run(i, rate)
    assert first is not None
    s = first.stats
    return SimSpeed(
        scenario=scenario.name,
        rates=rates,
        puts=int(s["ops"]["put"]),
        gets=int(s["ops"]["get"]),
        file_size=scenario.workload.file_size,
        load_seconds=float(s["load_seconds"]),
        wall_seconds=float(s["wall_seconds"]),
        deterministic=len(traces) == 1,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", nargs="?", default=DEFAULT_SCENARIO)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    speed = measure_sim_speed(args.scenario, args.runs)
    print(speed.describe())
    print(
        f"PUTs per wall-second (load phase), {speed.runs} runs: "
        + ", ".join(f"{r:.0f}" for r in speed.rates)
        + f"; median {speed.median:.0f}"
    )
    print(f"whole run incl. quiet phase and final reads: {speed.wall_seconds:.1f} s wall")
    assert speed.deterministic, "runs differ: not deterministic"


if __name__ == "__main__":
    main()
