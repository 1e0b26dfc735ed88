"""What a run of ``bench/compare.py`` measures: its workloads, and its settings as read
from the command line (``scripts/bench --help``)."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from gateway_rss import DEFAULT_SIZES_MIB
from peers import SERVERS

from karma8.net.netconfig import usable_cores

REPO = Path(__file__).resolve().parent.parent
PEER_GROUPS = ("large", "small")
KARMA8_GROUPS = ("rss", "sim")  # karma8 alone, after the stores are stopped
QUICK_RSS_SIZES_MIB = (16, 256)


@dataclass(frozen=True)
class Workload:
    key: str
    group: str  # as in --workloads
    label: str
    unit: str


WORKLOADS = [
    Workload("large_put", "large", "large PUT", "MB/s"),
    Workload("large_get", "large", "large GET", "MB/s"),
    Workload("small_put", "small", "small PUT", "ops/s"),
    Workload("small_get", "small", "small GET", "ops/s"),
]


@dataclass
class Settings:
    rounds: int
    large_bytes: int
    small_seconds: int
    get_files: int
    systems: list[str]
    workloads: list[Workload]  # against the peers; may be empty
    quick: bool = False
    rss_sizes: list[int] = field(default_factory=list)  # MiB; empty: no rss workload
    sim_runs: int = 0  # 0: no sim workload
    workers: int = field(default_factory=usable_cores)  # karma8's gateway_workers, and the
    # stack ceiling's processes


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=os.environ.get("BENCH_PROG", "compare.py"),
        description="Benchmark karma8 against nginx (WebDAV) and SeaweedFS on this machine, "
        "beside the ceilings of the disk and of karma8's HTTP stack (an in-memory store on "
        "it), then karma8's gateway memory (rss) and simulator speed (sim) alone.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="2 rounds, 4 s per small-file measurement, 200 GET files, gateway RSS for 16 and "
        "256 MiB files, 1 simulator run",
    )
    p.add_argument("--rounds", type=int, help="rounds (default 5; --quick: 2)")
    p.add_argument(
        "--systems",
        default=",".join(SERVERS),
        help=f"comma-separated subset of {','.join(SERVERS)} (run in this order)",
    )
    p.add_argument(
        "--workloads",
        default=",".join(PEER_GROUPS + KARMA8_GROUPS),
        help="comma-separated subset of large,small (the stores side by side) and rss,sim "
        "(karma8 alone, after the stores are stopped; only if karma8 is among --systems); "
        "default: all",
    )
    p.add_argument("--large-mib", type=int, default=256, help="large file size (default 256)")
    p.add_argument(
        "--small-seconds", type=int, help="seconds per wrk measurement (default 10; --quick: 4)"
    )
    p.add_argument(
        "--get-files",
        type=int,
        help="small files written for the GET workload (default 500; --quick: 200)",
    )
    p.add_argument(
        "--rss-sizes",
        help="file sizes in MiB for the rss workload, smallest first "
        f"(default {','.join(map(str, DEFAULT_SIZES_MIB))}; "
        f"--quick: {','.join(map(str, QUICK_RSS_SIZES_MIB))})",
    )
    p.add_argument(
        "--sim-runs", type=int, help="simulator runs for the sim workload (default 3; --quick: 1)"
    )
    p.add_argument(
        "--tmp-dir",
        type=Path,
        default=Path("/var/tmp"),
        help="where the stores' work directory is made; must be a real disk (default /var/tmp)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=usable_cores(),
        help="processes serving karma8's gateway port (its gateway_workers) and the stack"
        " ceiling's (default: karma8's, one per core)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument(
        "--write-docs",
        type=Path,
        default=REPO / "docs" / "benchmarks.md",
        metavar="PATH",
        help="markdown file with the compare markers (default docs/benchmarks.md)",
    )
    p.add_argument("--no-write", action="store_true", help="only print the results")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    systems = [x.strip() for x in args.systems.split(",") if x.strip()]
    groups = {x.strip() for x in args.workloads.split(",") if x.strip()}
    unknown = [x for x in systems if x not in SERVERS] + sorted(
        groups - {*PEER_GROUPS, *KARMA8_GROUPS}
    )
    if unknown or not systems or not groups:
        sys.exit(f"unknown or empty --systems/--workloads: {unknown}")
    alone = groups & set(KARMA8_GROUPS)
    if alone and "karma8" not in systems:
        if not groups & set(PEER_GROUPS):
            sys.exit(f"--workloads {','.join(sorted(alone))} measure karma8: add it to --systems")
        alone = set()  # the default workloads with --systems of the other stores only
    try:
        rss_sizes = [
            int(x)
            for x in (
                args.rss_sizes
                or ",".join(map(str, QUICK_RSS_SIZES_MIB if args.quick else DEFAULT_SIZES_MIB))
            ).split(",")
            if x.strip()
        ]
    except ValueError:
        sys.exit(f"--rss-sizes: comma-separated whole MiB, not {args.rss_sizes!r}")
    if "rss" in alone and (not rss_sizes or min(rss_sizes) < 1):
        sys.exit(f"--rss-sizes: at least one size of 1 MiB or more, not {args.rss_sizes!r}")
    sim_runs = args.sim_runs if args.sim_runs is not None else (1 if args.quick else 3)
    if "sim" in alone and sim_runs < 1:
        sys.exit("--sim-runs: at least 1")
    rounds = args.rounds or (2 if args.quick else 5)
    taking_part = [k for k in systems if groups & set(SERVERS[k].groups)]
    if groups & set(PEER_GROUPS) and not taking_part:
        sys.exit(
            f"no system of --systems {','.join(systems)} takes part in"
            f" --workloads {','.join(sorted(groups & set(PEER_GROUPS)))}"
        )
    return Settings(
        rounds=rounds,
        large_bytes=args.large_mib << 20,
        small_seconds=args.small_seconds or (4 if args.quick else 10),
        get_files=args.get_files or (200 if args.quick else 500),
        systems=[k for k in SERVERS if k in taking_part],  # in SERVERS' order
        workloads=[w for w in WORKLOADS if w.group in groups],
        quick=args.quick,
        rss_sizes=rss_sizes if "rss" in alone else [],
        sim_runs=sim_runs if "sim" in alone else 0,
        workers=args.workers,
    )
