"""``karma8 sim``: run a scenario file or a swarm of generated scenarios and print the
report (text or JSON); exit 0 if every invariant held, 1 if one failed, 2 for bad usage, 3 if
the simulation itself crashed (with the command that replays it)."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import traceback

from karma8.core.exits import EXIT_CRASHED, EXIT_FAILED, EXIT_OK, EXIT_USAGE
from karma8.core.tomlconf import ConfigError
from karma8.sim.report import render_json, render_text
from karma8.sim.runner import SimResult, run_scenario
from karma8.sim.scenario import Scenario, load_scenario


def _swarm(args: argparse.Namespace) -> int:
    from karma8.sim.swarm import SwarmCrashed, run_swarm

    first = 1 if args.seed is None else args.seed

    def progress(seed: int, result: SimResult) -> None:
        if not args.json:
            s = result.stats
            print(
                f"seed {seed:>6}  {'ok    ' if result.ok else 'FAILED'}"
                f"  {s['ops']['put']:>5} puts  {sum(s['failures'].values()):>5} failed ops"
                f"  {s['wall_seconds']:.2f} s",
                flush=True,
            )

    try:
        outcome = run_swarm(args.swarm, first_seed=first, progress=progress)
    except SwarmCrashed as crash:  # a crash is a failure too, and must say how to replay it
        traceback.print_exception(crash.__cause__ or crash)
        replay = f"karma8 sim --swarm 1 --seed {crash.seed}"
        print(
            f"karma8 sim: the simulation crashed at seed {crash.seed}; replay: {replay}",
            file=sys.stderr,
        )
        return EXIT_CRASHED
    if outcome.failed is None:
        if args.json:
            print(json.dumps({"ok": True, "seeds": outcome.runs, "first_seed": first}))
        else:
            print(f"swarm: {outcome.runs} seeds from {first}, all invariants held")
        return EXIT_OK
    result = outcome.failed
    replay = f"karma8 sim --swarm 1 --seed {result.seed}"
    print(render_json(result) if args.json else render_text(result, replay=replay))
    print(f"swarm: seed {result.seed} failed; replay with: {replay}", file=sys.stderr)
    return EXIT_FAILED


def run_sim(args: argparse.Namespace) -> int:
    """``karma8 sim``: one scenario (and its report), or a swarm of generated ones."""
    # The actors log what a real service would (a node turned suspect, ...); in a simulation
    # those are simulated events, told by the report and its invariants, not on stderr.
    actors = logging.getLogger("karma8")
    if not any(isinstance(h, logging.NullHandler) for h in actors.handlers):
        actors.addHandler(logging.NullHandler())
    if args.swarm is not None:
        if args.swarm < 1:
            print(f"karma8 sim: --swarm takes at least 1 seed, got {args.swarm}", file=sys.stderr)
            return EXIT_USAGE
        if args.scenario is not None:
            print("karma8 sim: --swarm makes its own scenarios; drop the file", file=sys.stderr)
            return EXIT_USAGE
        if args.plot is not None:
            print("karma8 sim: --plot draws one scenario; not with --swarm", file=sys.stderr)
            return EXIT_USAGE
        return _swarm(args)
    if not args.sample_interval >= 0.001:  # the pump's tick: nothing changes in between
        print("karma8 sim: --sample-interval must be >= 0.001 (seconds)", file=sys.stderr)
        return EXIT_USAGE
    if args.plot is not None:
        from karma8.sim.plot import PlotError, check_path  # matplotlib itself comes later

        try:
            check_path(args.plot)
        except PlotError as exc:
            print(f"karma8 sim: --plot {exc}", file=sys.stderr)
            return EXIT_USAGE
    if args.scenario is None:
        print("karma8 sim: a scenario file (or --swarm N) is needed", file=sys.stderr)
        return EXIT_USAGE
    try:
        scenario = load_scenario(args.scenario)
    except ConfigError as exc:
        print(f"karma8 sim: {exc}", file=sys.stderr)
        return EXIT_USAGE
    seed = scenario.seed if args.seed is None else args.seed
    replay = f"karma8 sim {shlex.quote(args.scenario)} --seed {seed}"
    try:
        result = run_scenario(scenario, seed, fill_interval=args.sample_interval)
        again = (
            run_scenario(scenario, seed, fill_interval=args.sample_interval)
            if args.check_determinism
            else None
        )
    except Exception:  # a bug in karma8 or the simulator, not a failed invariant
        traceback.print_exc()
        print(f"karma8 sim: the simulation crashed; replay: {replay}", file=sys.stderr)
        return EXIT_CRASHED
    if again is not None:
        deterministic = again.trace_sha256 == result.trace_sha256
        result.invariants["deterministic_replay"] = deterministic
        if not deterministic:
            result.violations["deterministic_replay"] = [
                f"second run traced {again.trace_sha256}, first {result.trace_sha256}"
            ]
    plot_error = _plot(args.plot, result, scenario) if args.plot is not None else None
    print(render_json(result) if args.json else render_text(result, replay=replay))
    if plot_error is not None:
        print(f"karma8 sim: --plot {plot_error}", file=sys.stderr)
        return EXIT_USAGE
    if args.plot is not None:
        print(f"karma8 sim: fill plot written to {args.plot}", file=sys.stderr)
    return EXIT_OK if result.ok else EXIT_FAILED


def _plot(path: str, result: SimResult, scenario: Scenario) -> str | None:
    """Draw ``--plot``'s file, before the report is printed (so that a reader leaving early
    cannot stop it); the error, if it cannot be drawn."""
    from karma8.sim.plot import PlotError, plot_fill

    try:
        plot_fill(result, path, bound_pp=scenario.checks.max_fill_spread_pp)
    except PlotError as exc:
        return str(exc)
    return None
