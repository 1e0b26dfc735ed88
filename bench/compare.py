"""karma8 against nginx and SeaweedFS: large and small files over HTTP on one machine;
then karma8 alone: its gateway's memory and its simulator's speed.

    scripts/bench [--quick] [--rounds N] [--systems nginx,seaweedfs,stack,karma8]
                  [--workloads large,small,rss,sim] [--large-mib 256] [--small-seconds 10]
                  [--get-files 500] [--rss-sizes 64,1024] [--sim-runs 3]
                  [--write-docs docs/benchmarks.md | --no-write]

Method
------
Each store (see ``bench/peers.py``) is started fresh, once per run, in its own directory
under a temporary work directory on the real disk (``--tmp-dir``, default /var/tmp; never a
tmpfs, since storage must hit the disk), listening on 127.0.0.1. All of them stay up for the
whole run; while one is measured the others are idle. The client side is the same for all:
curl for large files, wrk for small ones. Client-side files (the large body) live on
/dev/shm, so the client never waits for its own disk.

Besides the stores, ``stack`` (the stack ceiling, ``bench/stack_ceiling.py``) is an in-memory
store served the way karma8's gateway is, in one process: for small files, the most karma8
could reach on its HTTP stack here with one event loop (it takes no part in the large-file
workloads).

Workloads, per round and, within a round, per workload, the stores in the order given
(nginx, SeaweedFS, stack, karma8 by default), so that slow drifts of the machine spread evenly:

- large PUT: ``curl -T`` of one random file of ``--large-mib`` MiB (Content-Length known,
  ``Expect: 100-continue`` off for everyone) to a fresh name per round; MB/s = bytes / 1e6 /
  curl's ``time_total``. Before the first round and after the last, the disk's own durable
  write rate: the same file written into the work directory with write-back started as it
  goes, then ``fdatasync``-ed (``bench/ceilings.py``).
- large GET: ``curl -o /dev/null`` of the file this round's PUT wrote (so its pages are
  probably still cached: a warm-cache read). Once per store, outside the timing, a download
  is hashed and compared with the source (SHA-256).
- small PUT: ``wrk -t2 -c16 -d{S}s``, 16 keep-alive connections, each request a PUT of
  4 KiB to a new path (per round, per wrk thread, a counter); ops/s = wrk's Requests/sec.
- small GET: the same wrk set-up, GETs round-robin over ``--get-files`` 4 KiB files PUT
  (with curl, 16 in parallel) before the first round.

Then, with every store stopped (so that none competes for the CPUs), the karma8-only
workloads, if karma8 is among ``--systems``:

- rss: ``bench/gateway_rss.py``: discovery and 6 storage nodes as separate processes, in
  the work directory; per file size (``--rss-sizes``, default 64 and 1024 MiB, ``--quick``
  16 and 256) a fresh gateway process, one streamed PUT and one GET of the file (checked by
  SHA-256), the gateway's VmHWM (peak RSS) before and after. Target: the peak grows by less
  than 64 MiB from the smallest size to the largest.
- sim: ``bench/sim_speed.py``: simulated PUTs per wall-second in the load phase of
  ``scenarios/add_nodes.toml``, in this process, median of ``--sim-runs`` runs (default 3,
  ``--quick`` 1). Goal: at least 500.

Before every measurement of the stores the benchmark calls sync(2), so that write-back of one
measurement's dirty pages (nginx and SeaweedFS do not fsync) does not land on the next.
Every response's status is checked: wrk counts statuses other than 200/201/204 (PUT) or
200 (GET) in a Lua ``response`` hook, plus its socket errors (connect, read, write,
timeout; the request timeout is 30 s); any of them is shown next to the number, and the
script exits with status 1. Medians over the rounds are reported, and every round's value.

The markdown is printed, and written into ``--write-docs`` (default docs/benchmarks.md)
between the lines ``<!-- compare:begin -->`` and ``<!-- compare:end -->``, if both exist.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ceilings import ceiling_lines, disk_write_rate
from common import ratio
from gateway_rss import DEFAULT_SIZES_MIB, RssResult, RssRow, measure_gateway_rss
from peers import SERVERS, Server, ServerError, first_line
from sim_speed import GOAL_PUTS_PER_SECOND, SimSpeed, measure_sim_speed

REPO = Path(__file__).resolve().parent.parent
BEGIN = "<!-- compare:begin -->"
END = "<!-- compare:end -->"
SMALL_SIZE = 4096
CONNECTIONS = 16
WRK_THREADS = 2
PUT_OK = (200, 201, 204)
PEER_GROUPS = ("large", "small")
KARMA8_GROUPS = ("rss", "sim")  # karma8 alone, after the stores are stopped
QUICK_RSS_SIZES_MIB = (16, 256)
SIM_SCENARIO = REPO / "scenarios" / "add_nodes.toml"


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
class Sample:
    """One measurement: a rate, or None if it failed; errors counts failed requests."""

    value: float | None
    errors: int = 0
    detail: str = ""
    p50_ms: float | None = None
    p99_ms: float | None = None


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


@dataclass
class Run:
    settings: Settings
    workdir: Path
    client_dir: Path
    large_file: Path
    large_sha256: str
    small_file: Path
    put_lua: Path
    get_lua: Path
    results: dict[str, dict[str, list[Sample]]] = field(default_factory=dict)
    verified: dict[str, str] = field(default_factory=dict)
    # The disk's durable write rate (MB/s) "before" and "after" the rounds; None: failed.
    disk: dict[str, float | None] = field(default_factory=dict)

    def add(self, workload: Workload, server: Server, sample: Sample) -> None:
        self.results.setdefault(workload.key, {}).setdefault(server.key, []).append(sample)


# -- wrk scripts ----------------------------------------------------------------------------

LUA_COMMON = """
-- Each wrk thread has its own Lua state; setup() runs in the main one and numbers them.
local threads = {}
function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function response(status, headers, body)
  if not ok[status] then
    bad = bad + 1
    last_bad = status
  end
end

function done(summary, latency, requests)
  local bad_total, last = 0, 0
  for _, t in ipairs(threads) do
    bad_total = bad_total + t:get("bad")
    if t:get("last_bad") ~= 0 then last = t:get("last_bad") end
  end
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d connect=%d read=%d write=%d timeout=%d" ..
    " bad_status=%d last_bad=%d p50_us=%d p99_us=%d\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout,
    bad_total, last, latency:percentile(50), latency:percentile(99)))
end
"""

LUA_PUT = (
    """
-- PUT of the same 4 KiB body to a new path per request: PREFIX-THREAD-COUNTER.
-- wrk ... -- PREFIX BODYFILE
function init(args)
  prefix = args[1]
  local f = assert(io.open(args[2], "rb"))
  body = f:read("*a")
  f:close()
  ok = {[200] = true, [201] = true, [204] = true}
  bad, last_bad, counter = 0, 0, 0
end

function request()
  counter = counter + 1
  return wrk.format("PUT", prefix .. "-" .. tid .. "-" .. counter, nil, body)
end
"""
    + LUA_COMMON
)

LUA_GET = (
    """
-- GET round-robin over PREFIX00000 .. PREFIX(N-1), each thread from its own offset.
-- wrk ... -- PREFIX N
function init(args)
  prefix = args[1]
  n = tonumber(args[2])
  ok = {[200] = true}
  bad, last_bad = 0, 0
  counter = ((tid - 1) * 7919) % n
end

function request()
  counter = (counter + 1) % n
  return wrk.format("GET", string.format("%s%05d", prefix, counter))
end
"""
    + LUA_COMMON
)


# -- measurements ---------------------------------------------------------------------------


def curl(args: list[str], timeout: float = 900.0) -> tuple[int, str, str]:
    """Run curl with the common options; (exit status, stdout, stderr)."""
    done = subprocess.run(
        ["curl", "-sS", "--fail", "--max-time", str(int(timeout)), *args],
        capture_output=True,
        text=True,
        timeout=timeout + 30,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr.strip()


def large_transfer(server: Server, name: str, put_file: Path | None, size: int) -> Sample:
    """A PUT of ``put_file`` to ``name``, or (put_file None) a GET of it; MB/s."""
    if put_file is not None:
        args = ["-H", "Expect:", "-T", str(put_file)]
        expected: tuple[int, ...] = PUT_OK
        size_var = "size_upload"
    else:
        args, expected, size_var = [], (200,), "size_download"
    code, out, err = curl(
        [
            *args,
            server.url(name),
            "-o",
            "/dev/null",
            "-w",
            f"%{{http_code}} %{{time_total}} %{{{size_var}}}",
        ]
    )
    parts = out.split()
    if code != 0 or len(parts) != 3:
        return Sample(None, 1, f"curl exit {code}: {err or out}")
    status, seconds, moved = int(parts[0]), float(parts[1]), int(parts[2])
    if status not in expected or moved != size:
        return Sample(None, 1, f"HTTP {status}, {moved} of {size} bytes")
    return Sample(size / 1e6 / seconds)


def verify_download(server: Server, name: str, sha256: str) -> str:
    """Download ``name`` and compare its SHA-256 with the source's; a short verdict."""
    digest = hashlib.sha256()
    with subprocess.Popen(
        ["curl", "-sS", "--fail", server.url(name)], stdout=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(1 << 20):
            digest.update(chunk)
    if proc.returncode != 0:
        return f"download failed (curl exit {proc.returncode})"
    if digest.hexdigest() != sha256:
        return f"MISMATCH: sha256 {digest.hexdigest()[:16]}… != {sha256[:16]}…"
    return "byte-identical (sha256)"


RESULT_RE = re.compile(r"^RESULT (.*)$", re.MULTILINE)
RPS_RE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)


def wrk(server: Server, script: Path, seconds: int, script_args: list[str]) -> Sample:
    """wrk with CONNECTIONS connections for ``seconds``; Requests/sec, errors and latency."""
    args = [
        "wrk",
        f"-t{WRK_THREADS}",
        f"-c{CONNECTIONS}",
        f"-d{seconds}s",
        "--timeout",
        "30s",
        "-s",
        str(script),
        server.base_url,
        "--",
        *script_args,
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 120, check=False)
    rps = RPS_RE.search(done.stdout)
    result = RESULT_RE.search(done.stdout)
    if done.returncode != 0 or rps is None or result is None:
        return Sample(
            None, 1, f"wrk exit {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}"
        )
    fields = {k: int(v) for k, v in (item.split("=") for item in result.group(1).split())}
    sockets = {k: fields[k] for k in ("connect", "read", "write", "timeout") if fields[k]}
    errors = sum(sockets.values()) + fields["bad_status"]
    detail = ", ".join(
        (
            [f"{fields['bad_status']} bad status (last {fields['last_bad']})"]
            if fields["bad_status"]
            else []
        )
        + [f"{n} socket {k}" for k, n in sockets.items()]
    )
    return Sample(
        float(rps.group(1)), errors, detail, fields["p50_us"] / 1000, fields["p99_us"] / 1000
    )


def prefill(server: Server, body: Path, count: int, config: Path) -> None:
    """PUT ``count`` small files get-00000… with curl, 16 in parallel; raise on any failure."""
    with open(config, "w") as f:
        for i in range(count):
            f.write(
                f'upload-file = "{body}"\nurl = "{server.url(f"get-{i:05d}")}"\n'
                'output = "/dev/null"\n'
            )
    code, out, err = curl(
        [
            "--parallel",
            "--parallel-max",
            str(CONNECTIONS),
            "--no-progress-meter",
            "-H",
            "Expect:",
            "-K",
            str(config),
            "-w",
            "%{http_code}\n",
        ]
    )
    statuses = out.split()
    bad = [s for s in statuses if int(s) not in PUT_OK]
    if code != 0 or len(statuses) != count or bad:
        raise ServerError(
            f"{server.label}: prefill of {count} files failed (curl exit {code},"
            f" {len(statuses)} answers, {len(bad)} bad: {bad[:5]}) {err[-300:]}"
        )
    back = subprocess.run(
        ["curl", "-sS", "--fail", server.url("get-00000")],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if back.returncode != 0 or back.stdout != body.read_bytes():
        raise ServerError(f"{server.label}: get-00000 does not read back as written")


# -- the run --------------------------------------------------------------------------------


def measure(run: Run, workload: Workload, server: Server, round_no: int) -> Sample:
    s = run.settings
    large_name = f"large-r{round_no}"
    if workload.key == "large_put":
        return large_transfer(server, large_name, run.large_file, s.large_bytes)
    if workload.key == "large_get":
        sample = large_transfer(server, large_name, None, s.large_bytes)
        if server.key not in run.verified:
            run.verified[server.key] = verify_download(server, large_name, run.large_sha256)
        return sample
    if workload.key == "small_put":
        return wrk(
            server,
            run.put_lua,
            s.small_seconds,
            [server.path(f"r{round_no}/small"), str(run.small_file)],
        )
    if workload.key == "small_get":
        return wrk(server, run.get_lua, s.small_seconds, [server.path("get-"), str(s.get_files)])
    raise ValueError(workload.key)


def fmt(value: float | None) -> str:
    if value is None:
        return "failed"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def run_rounds(run: Run, servers: list[Server]) -> None:
    s = run.settings
    for round_no in range(1, s.rounds + 1):
        for workload in s.workloads:
            for server in servers:
                if workload.group not in server.groups:
                    continue
                server.check_alive()
                os.sync()
                sample = measure(run, workload, server, round_no)
                run.add(workload, server, sample)
                note = f"  [{sample.errors} errors: {sample.detail}]" if sample.errors else ""
                latency = (
                    f"  p50 {sample.p50_ms:.1f} ms, p99 {sample.p99_ms:.1f} ms"
                    if sample.p50_ms is not None and sample.p99_ms is not None
                    else ""
                )
                print(
                    f"round {round_no}/{s.rounds}  {workload.label:<10} {server.label:<13}"
                    f" {fmt(sample.value):>9} {workload.unit}{latency}{note}",
                    flush=True,
                )


def probe_disk(run: Run, when: str) -> None:
    """The disk's durable write rate for the large file (``bench/ceilings.py``), if the
    large workloads run; a failure is reported and leaves no rate."""
    if not any(w.key == "large_put" for w in run.settings.workloads):
        return
    os.sync()
    try:
        rate: float | None = disk_write_rate(run.large_file, run.workdir / f"disk-{when}.bin")
    except OSError as exc:
        print(f"disk write {when} the rounds failed: {exc}", file=sys.stderr)
        rate = None
    run.disk[when] = rate
    print(f"disk write {when} the rounds: {fmt(rate)} MB/s (durable)", flush=True)


def prepare(run: Run, servers: list[Server]) -> None:
    """Warm-up (one small PUT and GET each) and, for small GETs, the files to read."""
    for server in servers:
        code, _, err = curl(
            ["-H", "Expect:", "-T", str(run.small_file), server.url("warm-up"), "-o", "/dev/null"]
        )
        code2, _, err2 = curl([server.url("warm-up"), "-o", "/dev/null"])
        if code or code2:
            raise ServerError(f"{server.label}: warm-up PUT/GET failed: {err} {err2}")
    if any(w.key == "small_get" for w in run.settings.workloads):
        for server in servers:
            started = time.monotonic()
            prefill(
                server,
                run.small_file,
                run.settings.get_files,
                run.client_dir / f"prefill-{server.key}.curlrc",
            )
            print(
                f"prefill {server.label}: {run.settings.get_files} files of {SMALL_SIZE} B"
                f" in {time.monotonic() - started:.1f} s",
                flush=True,
            )


# -- karma8 alone ---------------------------------------------------------------------------


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
    ceilings = ceiling_lines(medians, run.disk, os.cpu_count() or 1)

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


# -- main -----------------------------------------------------------------------------------


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
    )


def make_random_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; their SHA-256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            digest.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def client_dir_parent(need: int) -> Path | None:
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > need + (64 << 20):
        return shm
    return None


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@dataclass
class Cleanup:
    """What to undo, whatever happens: stores to stop, directories to remove."""

    paths: list[Path] = field(default_factory=list)
    servers: list[Server] = field(default_factory=list)

    def stop_servers(self) -> None:
        while self.servers:
            server = self.servers.pop()
            try:
                server.stop()
            except Exception as exc:  # keep stopping the others
                print(f"stopping {server.label}: {exc}", file=sys.stderr)

    def remove_paths(self, keep: bool) -> None:
        while self.paths:
            path = self.paths.pop()
            if keep:
                print(f"kept {path}")
            else:
                shutil.rmtree(path, ignore_errors=True)


def make_workdir(args: argparse.Namespace, cleanup: Cleanup) -> Path:
    """The run's work directory under ``--tmp-dir``, which must be on a real disk."""
    args.tmp_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="karma8-compare-", dir=args.tmp_dir))
    cleanup.paths.append(workdir)
    fs_type = machine(workdir)["fs_type"]
    if fs_type in ("tmpfs", "ramfs"):
        raise ServerError(f"{args.tmp_dir} is on {fs_type}; pass --tmp-dir on a real disk")
    print(f"work directory {workdir}")
    return workdir


def benchmark(
    args: argparse.Namespace, s: Settings, workdir: Path, cleanup: Cleanup
) -> tuple[Run, list[Server]]:
    """Start the stores, prepare, run every round; the stores still run when it returns."""
    parent = client_dir_parent(s.large_bytes)
    client_dir = Path(tempfile.mkdtemp(prefix="karma8-compare-", dir=parent or workdir))
    cleanup.paths.append(client_dir)
    print(f"client files in {client_dir}")

    large_file = client_dir / "large.bin"
    small_file = client_dir / "small.bin"
    needs_large = any(w.group == "large" for w in s.workloads)
    sha = make_random_file(large_file, s.large_bytes) if needs_large else ""
    make_random_file(small_file, SMALL_SIZE)
    run = Run(
        s,
        workdir,
        client_dir,
        large_file,
        sha,
        small_file,
        client_dir / "put.lua",
        client_dir / "get.lua",
    )
    run.put_lua.write_text(LUA_PUT)
    run.get_lua.write_text(LUA_GET)

    servers: list[Server] = []
    for key in s.systems:
        server = SERVERS[key](workdir)
        cleanup.servers.append(server)
        t0 = time.monotonic()
        server.start()
        servers.append(server)
        print(
            f"{server.label} {server.version} up on {server.base_url}"
            f" in {time.monotonic() - t0:.1f} s",
            flush=True,
        )
    prepare(run, servers)
    probe_disk(run, "before")
    run_rounds(run, servers)
    probe_disk(run, "after")
    return run, servers


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    s = settings_from(args)
    if s.workloads:
        tools = ["curl", "wrk", *(["nginx"] if "nginx" in s.systems else [])]
        missing = [t for t in tools if shutil.which(t) is None]
        if missing:
            sys.exit(f"missing tools: {', '.join(missing)} (scripts/bench installs them)")
    launcher = os.environ.get("BENCH_COMMAND", f"{sys.executable} {sys.argv[0]}")
    command = " ".join([launcher, *map(shlex.quote, argv)])
    # Both end the run through the cleanup below (also when started in the background,
    # where the shell makes SIGINT ignored).
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started_at = datetime.now(UTC)
    started = time.monotonic()
    load_before = loadavg()

    cleanup = Cleanup()
    run: Run | None = None
    servers: list[Server] = []
    rss: RssOutcome | None = None
    sim: SimOutcome | None = None
    try:
        workdir = make_workdir(args, cleanup)
        if s.workloads:
            try:
                run, servers = benchmark(args, s, workdir, cleanup)
            finally:
                cleanup.stop_servers()
        # karma8 alone, with every store stopped.
        if s.rss_sizes:
            rss = run_rss(s, workdir)
        if s.sim_runs:
            sim = run_sim(s)
        block = report(
            s,
            run,
            servers,
            rss,
            sim,
            machine(workdir),
            command=command,
            started=started_at,
            elapsed=time.monotonic() - started,
            load_before=load_before,
            load_after=loadavg(),
        )
        print("\n" + block + "\n", flush=True)
        if not args.no_write:
            write_docs(args.write_docs, block)
    except KeyboardInterrupt:
        print("\ninterrupted; the stores are stopped", file=sys.stderr)
        return 130
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if cleanup.paths and not args.keep:
            print("removing the work directories…", flush=True)
        cleanup.remove_paths(args.keep)

    failures = []
    if run is not None:
        bad_downloads = [
            srv.label
            for srv in servers
            if not run.verified.get(srv.key, "byte-identical").startswith("byte-identical")
        ]
        errors = sum(x.errors for per in run.results.values() for xs in per.values() for x in xs)
        if errors or bad_downloads:
            failures.append(
                f"{errors} failed requests or transfers; bad downloads: {bad_downloads}"
            )
    if rss is not None and rss.error is not None:
        failures.append(f"gateway RSS: {rss.error}")
    if sim is not None and sim.failed:
        failures.append(f"simulator speed: {sim.error or 'runs not deterministic'}")
    if failures:
        print("FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
