"""The ``karma8`` command: wiring of the worlds to the actors.

karma8 sim SCENARIO.toml [--seed N] [--json] [--check-determinism]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from karma8.sim.report import render_json, render_text
from karma8.sim.runner import run_scenario
from karma8.sim.scenario import ScenarioError, load_scenario

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="karma8", description="A distributed HTTP file store.")
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser("sim", help="run a scenario in the deterministic simulator")
    sim.add_argument("scenario", help="scenario file (TOML), see docs/scenarios.md")
    sim.add_argument("--seed", type=int, help="override the scenario's seed")
    sim.add_argument("--json", action="store_true", help="print one JSON object")
    sim.add_argument(
        "--check-determinism",
        action="store_true",
        help="run twice in this process and fail unless both traces are identical",
    )
    return parser


def _sim(args: argparse.Namespace) -> int:
    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        print(f"karma8 sim: {exc}", file=sys.stderr)
        return EXIT_USAGE
    seed = scenario.seed if args.seed is None else args.seed
    result = run_scenario(scenario, seed)
    deterministic = True
    if args.check_determinism:
        again = run_scenario(scenario, seed)
        deterministic = again.trace_sha256 == result.trace_sha256
        result.invariants["deterministic_replay"] = deterministic
        if not deterministic:
            result.violations["deterministic_replay"] = [
                f"second run traced {again.trace_sha256}, first {result.trace_sha256}"
            ]
    replay = f"karma8 sim {shlex.quote(args.scenario)} --seed {seed}"
    print(render_json(result) if args.json else render_text(result, replay=replay))
    return EXIT_OK if result.ok else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "sim":
        return _sim(args)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
