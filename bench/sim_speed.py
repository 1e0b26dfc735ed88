"""Simulator speed: simulated PUTs per wall-second during the load phase of a scenario.

.venv/bin/python bench/sim_speed.py [scenarios/add_nodes.toml] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics

from karma8.sim.runner import run_scenario
from karma8.sim.scenario import load_scenario


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", nargs="?", default="scenarios/add_nodes.toml")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    scenario = load_scenario(args.scenario)
    rates, results = [], []
    for _ in range(args.runs):
        result = run_scenario(scenario)
        results.append(result)
        rates.append(result.stats["puts_per_wall_second"])
    s = results[0].stats
    print(
        f"scenario {scenario.name}: {s['ops']['put']} PUTs of {scenario.workload.file_size[0]}"
        f"..{scenario.workload.file_size[1]} bytes, {s['ops']['get']} GETs in"
        f" {s['load_seconds']:.0f} simulated s"
    )
    print(
        f"PUTs per wall-second (load phase), {args.runs} runs: "
        + ", ".join(f"{r:.0f}" for r in rates)
        + f"; median {statistics.median(rates):.0f}"
    )
    print(f"whole run incl. quiet phase and final reads: {s['wall_seconds']:.1f} s wall")
    assert len({r.trace_sha256 for r in results}) == 1, "runs differ: not deterministic"


if __name__ == "__main__":
    main()
