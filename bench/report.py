"""The markdown of ``bench/compare.py``: where and when it ran, a section per kind of
workload (tables of medians and of every round), and its place in docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from ceilings import ceiling_lines
from common import ratio
from gateway_rss import DEFAULT_SIZES_MIB, RssResult
from karma8_alone import SIM_SCENARIO, RssOutcome, SimOutcome
from loadgen import CONNECTIONS, SMALL_SIZE, WRK_THREADS, Sample
from peers import Server, first_line
from rounds import Run, fmt
from settings import QUICK_RSS_SIZES_MIB, REPO, Settings
from sim_speed import GOAL_PUTS_PER_SECOND

BEGIN = "<!-- compare:begin -->"
END = "<!-- compare:end -->"


# -- environment ----------------------------------------------------------------------------


def machine(workdir: Path) -> dict[str, str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    df = subprocess.run(
        ["df", "-T", str(workdir)], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    fs = df[1].split() if len(df) > 1 else ["?", "?"]
    return {
        "cpus": str(len(os.sched_getaffinity(0))),
        "cpu": cpu,
        "ram": f"{mem_kib / (1 << 20):.1f} GiB",
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "fs": f"{fs[1]} ({fs[0]})",
        "fs_type": fs[1],
        "curl": first_line(["curl", "--version"]).split(" (")[0],
        "wrk": first_line(["wrk", "-v"]).split(" [")[0],
    }


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- report ---------------------------------------------------------------------------------


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.rjust(w) if r else c.ljust(w)
                for c, w, r in zip(cells, widths, right, strict=True)
            )
            + " |"
        )

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if r else ("-" * (w + 2))
            for w, r in zip(widths, right, strict=True)
        )
        + "|"
    )
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def median(samples: list[Sample]) -> float | None:
    values = [s.value for s in samples if s.value is not None]
    return statistics.median(values) if values else None


def peer_section(run: Run, servers: list[Server]) -> list[str]:
    """The comparison with the other stores: summary, systems, every round, method."""
    s = run.settings
    labels = {srv.key: srv.label for srv in servers}
    keys = [srv.key for srv in servers]
    others = [k for k in keys if k != "karma8"] if "karma8" in keys else []

    header = ["workload", *[labels[k] for k in keys], *[f"karma8/{labels[k]}" for k in others]]
    rows = []
    measures = {srv.key: srv.groups for srv in servers}
    medians = {
        w.key: {k: median(run.results.get(w.key, {}).get(k, [])) for k in keys} for w in s.workloads
    }
    for w in s.workloads:
        per = run.results.get(w.key, {})
        meds = medians[w.key]
        cells = []
        for k in keys:
            if w.group not in measures[k]:
                cells.append("-")
                continue
            errors = sum(x.errors for x in per.get(k, []))
            cells.append(fmt(meds[k]) + (f" ({errors} errors)" if errors else ""))
        rows.append(
            [f"{w.label} ({w.unit})", *cells, *[ratio(meds["karma8"], meds[k]) for k in others]]
        )
    summary = md_table(header, rows, [False, *[True] * (len(header) - 1)])
    ceilings = ceiling_lines(medians, run.disk, os.cpu_count() or 1, s.workers)

    detail_rows = []
    for w in s.workloads:
        for k in keys:
            if w.group not in measures[k]:
                continue
            samples = run.results.get(w.key, {}).get(k, [])
            problems = "; ".join(f"r{i}: {x.detail}" for i, x in enumerate(samples, 1) if x.errors)
            p50 = [x.p50_ms for x in samples if x.p50_ms is not None]
            p99 = [x.p99_ms for x in samples if x.p99_ms is not None]
            latency = (
                f"{statistics.median(p50):.1f} / {statistics.median(p99):.1f}"
                if p50 and p99
                else ""
            )
            detail_rows.append(
                [
                    w.label,
                    labels[k],
                    fmt(median(samples)),
                    ", ".join(fmt(x.value) for x in samples),
                    latency,
                    problems or "0",
                ]
            )
    details = md_table(
        ["workload", "system", "median", "rounds", "p50 / p99 ms", "errors"],
        detail_rows,
        [False, False, True, False, True, False],
    )

    systems = md_table(
        ["system", "version", "durability", "large download check"],
        [
            [srv.label, srv.version, srv.durability, run.verified.get(srv.key, "-")]
            for srv in servers
        ],
        [False] * 4,
    )
    groups = {w.group for w in s.workloads}
    method = ["Method: `bench/compare.py` (its docstring)."]
    if "large" in groups:
        method.append(
            "Large: one `curl` per transfer, MB/s from curl's `time_total`, a new name per "
            "round, the GET right after the PUT (warm cache)."
        )
    if "small" in groups:
        method.append(
            "Small: `wrk` with a Lua script, PUTs to new paths, GETs round-robin over files "
            "written before the first round."
        )
    method.append(
        "sync(2) before every measurement. The stores run side by side for the whole run "
        "and are idle while another one is measured; client and servers share the CPUs."
    )
    return [
        *(
            [
                "Medians over the rounds; a ratio is karma8's median over the other store's "
                "(above 1: karma8 is faster).",
                "",
            ]
            if others
            else ["Medians over the rounds.", ""]
        ),
        summary,
        "",
        *([*ceilings, ""] if ceilings else []),
        systems,
        "",
        "Every round (in run order), and wrk's latency (median over the rounds):",
        "",
        details,
        "",
        " ".join(method),
    ]


def rss_section(rss: RssOutcome, quick: bool) -> list[str]:
    """Gateway memory: a row per file size and the growth of the peak against its target."""
    sizes = " and ".join(f"{m} MiB" for m in rss.sizes)
    intro = (
        "**Gateway memory** (karma8 alone, no other store running; `bench/gateway_rss.py`): "
        "discovery and 6 storage nodes as separate processes, a fresh gateway process per "
        "file size; peak is the gateway's VmHWM after one PUT and one GET of the file "
        f"(download checked by SHA-256). File sizes {sizes}"
    )
    if quick and rss.sizes == list(QUICK_RSS_SIZES_MIB):
        defaults = " and ".join(f"{m} MiB" for m in DEFAULT_SIZES_MIB)
        intro += f" (--quick: instead of {defaults})"
    lines = [intro + ".", ""]
    if rss.rows:
        lines.append(
            md_table(
                ["file size", "gateway RSS idle", "peak", "PUT MB/s", "GET MB/s"],
                [
                    [
                        f"{row.mib} MiB",
                        f"{row.idle_kib / 1024:.1f} MiB",
                        f"{row.peak_kib / 1024:.1f} MiB",
                        f"{row.put_mb_s:.0f}",
                        f"{row.get_mb_s:.0f}",
                    ]
                    for row in rss.rows
                ],
                [False, True, True, True, True],
            )
        )
        lines.append("")
    growth = RssResult(rss.rows).growth_line()
    if growth is not None and rss.error is None:
        lines.append(growth)
    if rss.error is not None:
        done = len(rss.rows)
        lines.append(f"FAILED after {done} of {len(rss.sizes)} sizes: {rss.error}")
    return lines


def sim_section(sim: SimOutcome) -> list[str]:
    """Simulator speed: the rate of each run, their median and the goal."""
    scenario = SIM_SCENARIO.relative_to(REPO)
    lines = [
        f"**Simulator speed** (karma8 alone, no other store running; `bench/sim_speed.py` on "
        f"`{scenario}`, in the benchmark's process): simulated PUTs per wall-second in the "
        "load phase.",
        "",
    ]
    speed = sim.speed
    if speed is None:
        return [*lines, f"FAILED: {sim.error}"]
    lines += [
        md_table(
            ["scenario", "runs", "PUTs per wall-second, each run", "median", "goal"],
            [
                [
                    speed.scenario,
                    str(speed.runs),
                    ", ".join(f"{r:,.0f}" for r in speed.rates),
                    f"{speed.median:,.0f}",
                    f"≥ {GOAL_PUTS_PER_SECOND}",
                ]
            ],
            [False, True, True, True, True],
        ),
        "",
        f"Each run: {speed.describe().removeprefix(f'scenario {speed.scenario}: ')}; "
        f"the first run took {speed.wall_seconds:.1f} s wall in all (load, quiet phase and "
        "final reads).",
    ]
    if not speed.deterministic:
        lines.append("FAILED: the runs' traces differ (the simulation is not deterministic).")
    return lines


def report(
    s: Settings,
    run: Run | None,
    servers: list[Server],
    rss: RssOutcome | None,
    sim: SimOutcome | None,
    info: dict[str, str],
    *,
    command: str,
    started: datetime,
    elapsed: float,
    load_before: str,
    load_after: str,
) -> str:
    """The markdown block: when and where, then a section per kind of workload run."""
    what = []
    if run is not None:
        what.append(f"{s.rounds} round{'s' if s.rounds != 1 else ''}")
        what.append(
            f"karma8 and the stack ceiling with {s.workers} gateway process"
            f"{'es' if s.workers != 1 else ''} on the port"
        )
        groups = {w.group for w in s.workloads}
        if "large" in groups:
            what.append(f"large file {s.large_bytes >> 20} MiB")
        if "small" in groups:
            what.append(
                f"small files {SMALL_SIZE} B with wrk -t{WRK_THREADS} -c{CONNECTIONS} for "
                f"{s.small_seconds} s per measurement, small GETs over {s.get_files} files"
            )
    if rss is not None:
        what.append(f"gateway RSS for {', '.join(f'{m} MiB' for m in rss.sizes)} files")
    if sim is not None:
        what.append(f"simulator speed, {sim.runs} run{'s' if sim.runs != 1 else ''}")
    minutes, seconds = divmod(round(elapsed), 60)
    tools = f"; {info['curl']}, {info['wrk']}" if run is not None else ""
    lines = [
        f"Measured {started:%Y-%m-%d %H:%M} UTC by `{command}`: {', '.join(what)}; "
        f"the run took {minutes} min {seconds} s.",
        "",
        f"Machine: {info['cpus']} CPUs ({info['cpu']}), {info['ram']} RAM, {info['kernel']}, "
        f"Python {info['python']}, stores on {info['fs']}{tools}. "
        f"Load average (1/5/15 min) before the run {load_before}, after {load_after}.",
    ]
    if run is not None:
        lines += ["", *peer_section(run, servers)]
    if rss is not None:
        lines += ["", *rss_section(rss, s.quick)]
    if sim is not None:
        lines += ["", *sim_section(sim)]
    return "\n".join(lines)


def replace_between_markers(text: str, block: str) -> str | None:
    """``text`` with everything between the BEGIN and END marker lines replaced by ``block``.

    The marker lines themselves stay. None if either marker is missing or END comes first.
    """
    begin = text.find(BEGIN)
    if begin < 0:
        return None
    end = text.find(END, begin + len(BEGIN))
    if end < 0:
        return None
    return text[: begin + len(BEGIN)] + "\n\n" + block.strip("\n") + "\n\n" + text[end:]


def write_docs(path: Path, block: str) -> bool:
    try:
        text = path.read_text()
    except FileNotFoundError:
        print(f"{path} does not exist; the results were not written", file=sys.stderr)
        return False
    new = replace_between_markers(text, block)
    if new is None:
        print(
            f"{path} has no lines {BEGIN} … {END}; the results above were not written "
            "(add the two marker lines where the table belongs)",
            file=sys.stderr,
        )
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, path)
    print(f"results written to {path}, between {BEGIN} and {END}")
    return True
