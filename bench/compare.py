"""karma8 against nginx and SeaweedFS: large and small files over HTTP on one machine;
then karma8 alone: its gateway's memory and its simulator's speed.

    scripts/bench [--quick] [--rounds N] [--systems nginx,seaweedfs,stack,karma8]
                  [--workloads large,small,rss,sim] [--large-mib 256] [--small-seconds 10]
                  [--get-files 500] [--rss-sizes 64,1024] [--sim-runs 3] [--workers N]
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
store served the way karma8's gateway is, by as many processes on its port as karma8's gateway
has (``--workers``, default karma8's: one per core): for small files, the most karma8 could
reach on its HTTP stack here with that many event loops (it takes no part in the large-file
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

Code: this module runs the whole; ``settings.py`` reads the command line, ``peers.py`` starts
the stores, ``loadgen.py`` drives curl and wrk, ``rounds.py`` runs the rounds against the
stores, ``karma8_alone.py`` the rss and sim workloads, ``report.py`` writes the markdown.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))
from karma8_alone import RssOutcome, SimOutcome, run_rss, run_sim
from loadgen import LUA_GET, LUA_PUT, SMALL_SIZE
from peers import SERVERS, Server, ServerError
from report import loadavg, machine, report, write_docs
from rounds import Run, client_dir_parent, make_random_file, prepare, probe_disk, run_rounds
from settings import Settings, parse_args, settings_from


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
        server = SERVERS[key](workdir, workers=s.workers)
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
