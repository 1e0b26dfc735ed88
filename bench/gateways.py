"""Small PUT/s and GET/s through one gateway and through two (issue #22), with the metadata
on SQLite and on PostgreSQL, every role a separate process on 127.0.0.1.

    .venv/bin/python bench/gateways.py [--seconds 5] [--rounds 3] [--get-files 300]
                                       [--stores sqlite,postgres] [--tmp-dir /var/tmp]

Per store a cluster: one discovery (SQLite in its data directory, or ``metadata_url`` on a
throwaway PostgreSQL 15 started by ``tests/pgcluster.py`` with its defaults: fsync on,
synchronous commits), 6 storage nodes and 2 gateways (``--role gw``, one process each), and
nginx in front of both gateways with the shipped ``docs/lb/karma8-nginx.conf``
(``tests/processes.py``). Both clusters stay up for the whole run. Setups:

- ``1 gw``: wrk -t2 -c16 against the first gateway (the second idles);
- ``2 gw direct``: two wrk -t1 -c8 at once, one per gateway; the rates summed;
- ``2 gw nginx``: wrk -t2 -c16 against nginx (one worker process), which spreads the
  connections over both gateways over its keep-alive pool.

Workloads: PUT of 4 KiB to a new name per request (bench/loadgen.py's Lua), GET round-robin
over ``--get-files`` 4 KiB files PUT with curl before the first round. Every round runs every
workload on every (store, setup) in turn (A B C D E F A B C D E F ...), after a sync(2), so
that drifts of the machine spread evenly; medians over the rounds are printed, with every
round's value, the ratio to ``1 gw`` of the same store, wrk's latency, errors (any status
other than 2xx, any socket error: exit status 1), and the CPU each part of the cluster used
during the measurement (/proc/PID/stat of the process and its children, in cores: 1.00 is a
whole core), and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import httpx
from common import ratio
from loadgen import LUA_GET, LUA_PUT, SMALL_SIZE, Sample, prefill_urls, wrk_url

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pgcluster import BIN, PgCluster
from processes import NGINX, Nginx, Service, service, wait_for

SECRET = "gateways-bench-secret"
CONFIG = 'public_namespaces = ["default"]\n'
NODES = 6
SETUPS = ("1 gw", "2 gw direct", "2 gw nginx")
PARTS = ("gateways", "discovery", "storage", "postgres", "nginx")
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(root: int) -> float:
    """User + system CPU seconds of ``root`` and its live descendants."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / TICKS
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += times.get(pid, 0.0)
        todo.extend(child for child, parent in parents.items() if parent == pid)
    return total


@dataclass
class Cluster:
    """One store's cluster: its processes' pids by part, and where to send requests."""

    store: str
    gateways: list[str]
    nginx: str
    pids: dict[str, list[int]]

    def cpu(self) -> dict[str, float]:
        return {part: sum(cpu_seconds(p) for p in pids) for part, pids in self.pids.items()}


def start_cluster(stack: ExitStack, root: Path, store: str, metadata_url: str | None) -> Cluster:
    root.mkdir()
    config = root / "karma8.toml"
    config.write_text(CONFIG + (f'metadata_url = "{metadata_url}"\n' if metadata_url else ""))
    common = ["--secret", SECRET, "--config", str(config)]

    def start(args: list[str], ready: str, name: str) -> Service:
        return stack.enter_context(service(args, ready, root / f"{name}.log", cwd=root))

    discovery = start(
        ["serve", "--role", "discovery", "--port", "0", "--data", str(root / "meta"), *common],
        r"discovery up: (http://\S+)",
        "discovery",
    )
    url = discovery.match.group(1)
    storage = [
        start(
            [
                *("serve", "--role", "storage", "--data", str(root / f"node-{i}")),
                *("--discovery", url, *common),
            ],
            r"storage node \S+ up",
            f"node-{i}",
        )
        for i in range(NODES)
    ]

    def all_available() -> bool:
        nodes = httpx.get(f"{url}/v1/nodes", headers={"X-Karma8-Secret": SECRET}).json()
        available: int = sum(n["state"] == "available" for n in nodes["nodes"])
        return available == NODES

    wait_for(all_available, f"{NODES} nodes available")
    gateways = [
        start(
            ["serve", "--role", "gw", "--port", "0", "--discovery", url, *common],
            r"gateway up: (http://\S+)",
            f"gw-{i}",
        )
        for i in range(2)
    ]
    gateway_urls = [g.match.group(1) for g in gateways]
    nginx = Nginx(root / "nginx", gateways=gateway_urls)
    stack.callback(nginx.stop)
    pids = {
        "gateways": [g.proc.pid for g in gateways],
        "discovery": [discovery.proc.pid],
        "storage": [s.proc.pid for s in storage],
        "nginx": [nginx.proc.pid],
        "postgres": [],
    }
    return Cluster(store, gateway_urls, nginx.url, pids)


@dataclass
class Result:
    """One (workload, store, setup): every round's sample and CPU use (cores, by part)."""

    samples: list[Sample] = field(default_factory=list)
    cores: list[dict[str, float]] = field(default_factory=list)

    def median(self) -> float | None:
        values = [s.value for s in self.samples if s.value is not None]
        return statistics.median(values) if values else None


def measure(
    cluster: Cluster, setup: str, script: Path, seconds: int, args: list[list[str]]
) -> Sample:
    """One measurement of ``setup``; ``args[i]`` are wrk ``i``'s script arguments."""
    if setup == "1 gw":
        return wrk_url(cluster.gateways[0], script, seconds, args[0])
    if setup == "2 gw nginx":
        return wrk_url(cluster.nginx, script, seconds, args[0])
    samples: list[Sample] = [Sample(None), Sample(None)]

    def one(i: int) -> None:
        samples[i] = wrk_url(
            cluster.gateways[i], script, seconds, args[i], threads=1, connections=8
        )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(s.value is None for s in samples):
        return Sample(None, sum(s.errors for s in samples), "; ".join(s.detail for s in samples))
    return Sample(
        sum(s.value or 0.0 for s in samples),
        sum(s.errors for s in samples),
        "; ".join(s.detail for s in samples if s.detail),
        statistics.mean(s.p50_ms or 0.0 for s in samples),
        max(s.p99_ms or 0.0 for s in samples),
    )


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def report(results: dict[tuple[str, str, str], Result], stores: list[str]) -> int:
    """Print the tables; the number of failed requests."""
    errors = 0
    print("\n| workload | store | setup | median ops/s | / 1 gw | rounds | p50 / p99 ms | errors |")
    print("|---|---|---|---:|---:|---|---:|---|")
    for workload in ("PUT", "GET"):
        for store in stores:
            base = results[workload, store, "1 gw"].median()
            for setup in SETUPS:
                r = results[workload, store, setup]
                med = r.median()
                rounds = ", ".join(fmt(s.value) for s in r.samples)
                p50 = statistics.median(s.p50_ms or 0.0 for s in r.samples)
                p99 = statistics.median(s.p99_ms or 0.0 for s in r.samples)
                errs = sum(s.errors for s in r.samples)
                errors += errs
                detail = "; ".join(s.detail for s in r.samples if s.detail)
                errs_cell = f"{errs} {detail}".strip()
                print(
                    f"| 4 KiB {workload} | {store} | {setup} | {fmt(med)} | {ratio(med, base)}"
                    f" | {rounds} | {p50:.1f} / {p99:.1f} | {errs_cell} |"
                )
    print("\nCPU used during the measurement, in cores (median over the rounds; 2 cores here):\n")
    print("| workload | store | setup | " + " | ".join(PARTS) + " | all of them |")
    print("|---|---|---|" + "---:|" * (len(PARTS) + 1))
    for workload in ("PUT", "GET"):
        for store in stores:
            for setup in SETUPS:
                cores = results[workload, store, setup].cores
                parts = [statistics.median(c[p] for c in cores) for p in PARTS]
                total = statistics.median(sum(c.values()) for c in cores)
                cells = " | ".join(f"{v:.2f}" for v in parts)
                print(f"| {workload} | {store} | {setup} | {cells} | {total:.2f} |")
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="per measurement (default 5)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--get-files", type=int, default=300)
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--tmp-dir", default="/var/tmp", help="on a real disk, not a tmpfs")
    args = parser.parse_args()
    # SIGTERM unwinds as Ctrl-C does: every process stopped, every directory removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    stores = args.stores.split(",")
    if not set(stores) <= {"sqlite", "postgres"}:
        parser.error("--stores: sqlite, postgres")
    if shutil.which("wrk") is None or NGINX is None:
        sys.exit("needs wrk and nginx (scripts/bootstrap --test-tools, scripts/bench install them)")
    if "postgres" in stores and not (BIN / "initdb").exists():
        sys.exit(f"needs PostgreSQL: no {BIN / 'initdb'}")
    started = time.monotonic()
    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, load average before",
          loadavg(), flush=True)  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="karma8-gateways-", dir=args.tmp_dir))
    results: dict[tuple[str, str, str], Result] = {}
    errors = 0
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        clusters: list[Cluster] = []
        for store in stores:
            url = None
            if store == "postgres":
                pg = PgCluster(durable=True)
                stack.callback(pg.stop)
                url = pg.new_database()
                postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
            cluster = start_cluster(stack, work / store, store, url)
            if store == "postgres":
                cluster.pids["postgres"] = [postmaster]
            clusters.append(cluster)
        body = work / "body"
        body.write_bytes(os.urandom(SMALL_SIZE))
        put_lua, get_lua = work / "put.lua", work / "get.lua"
        put_lua.write_text(LUA_PUT)
        get_lua.write_text(LUA_GET)
        for cluster in clusters:
            prefill_urls(
                partial("{}/default/{}".format, cluster.gateways[0]),
                cluster.store,
                body,
                args.get_files,
                work / "prefill.curl",
            )
        print(f"clusters up, {args.get_files} files each, after {time.monotonic() - started:.0f} s")
        for round_no in range(1, args.rounds + 1):
            for workload in ("PUT", "GET"):
                for cluster in clusters:
                    for setup in SETUPS:
                        tag = re.sub(r"\W+", "-", setup)
                        wrk_args = [
                            [f"/default/r{round_no}-{tag}-w{i}", str(body)]
                            if workload == "PUT"
                            else ["/default/get-", str(args.get_files)]
                            for i in range(2)
                        ]
                        script = put_lua if workload == "PUT" else get_lua
                        os.sync()
                        before, t0 = cluster.cpu(), time.monotonic()
                        sample = measure(cluster, setup, script, args.seconds, wrk_args)
                        after, elapsed = cluster.cpu(), time.monotonic() - t0
                        r = results.setdefault((workload, cluster.store, setup), Result())
                        r.samples.append(sample)
                        r.cores.append({p: (after[p] - before[p]) / elapsed for p in PARTS})
                        print(
                            f"round {round_no} {workload} {cluster.store:<8} {setup:<12}"
                            f" {fmt(sample.value):>7} ops/s  errors {sample.errors}"
                            f" {sample.detail}  load {loadavg()}",
                            flush=True,
                        )
        errors = report(results, stores)
    print(f"\nload average after {loadavg()}; the run took {time.monotonic() - started:.0f} s")
    print(f"command: .venv/bin/python bench/gateways.py {' '.join(sys.argv[1:])}".rstrip())
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
