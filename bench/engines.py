"""Engines side by side: large PUT and GET rates of raid0, raid1 (2 copies) and parity
(5+1, 5+2) namespaces, then GETs with one storage node killed.

    .venv/bin/python bench/engines.py [--mib 256] [--rounds 3] [--workdir /var/tmp/k8-engines]
                                      [--victim-holds raid1|parity1|parity2]

The embedded cluster (``karma8 serve``: discovery, gateway and 6 storage nodes in one
process) plus 4 storage nodes of their own, so that raid1's 10 parts find 10 distinct nodes
and one node can be killed. Per round, the engines in turn (interleaved, so that slow drifts
of the machine spread evenly): ``curl -T`` of one random file on /dev/shm to the engine's
namespace (the same name each round), then ``curl -o /dev/null`` of it; MB/s = bytes / 1e6
/ curl's ``time_total``. After the last round the separate node holding a data part of
the most redundant files is killed with SIGKILL and each file that has a part there is read
again, ``--rounds`` times (degraded GET), checked by SHA-256. Prints medians; the ratios in
docs/benchmarks.md come from them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

# The roles run as ``python -c ... serve``: another session's clean-up that stops
# ``karma8 serve`` processes by name (pkill -f) on this shared machine then leaves them be.
LAUNCH = (
    "import runpy, sys; sys.argv[0] = 'k8-bench';"
    " runpy.run_module('karma8.cli', run_name='__main__')"
)

ENGINES = {
    "raid0": [],
    "raid1": ["--engine", "raid1", "--copies", "2"],
    "parity1": ["--engine", "parity", "--parity", "1"],
    "parity2": ["--engine", "parity", "--parity", "2"],
}
CONFIG = """
gateway_port = 0
discovery_port = 0
retire_grace = 1.0
sweep_interval = 0.5
public_namespaces = ["default"]
"""


@contextmanager
def role(args: list[str], ready: str, log: Path) -> Iterator[tuple[int, str]]:
    """``karma8 ARGS`` (as :data:`LAUNCH`) until the block ends: (pid, ``ready``'s group)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            deadline = time.monotonic() + 60
            while not (match := re.search(ready, log.read_text())):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{args} did not start:\n{log.read_text()}")
                time.sleep(0.05)
            yield proc.pid, match.group(1)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def curl_seconds(*args: str) -> float:
    out = subprocess.run(
        ["curl", "-sS", "--fail-with-body", "-H", "Expect:", "-w", "\n%{time_total}", *args],
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise RuntimeError(f"curl {' '.join(args)}: {out.returncode} {out.stderr} {out.stdout}")
    return float(out.stdout.strip().splitlines()[-1])


def karma8(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "karma8.cli", *args], capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(f"karma8 {' '.join(args)}: {out.stderr}")
    return out.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/k8-engines"))
    parser.add_argument(
        "--victim-holds",
        choices=[e for e in ENGINES if e != "raid0"],
        help="kill a node holding a data part of this engine's file (if a separate one does)",
    )
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    body = Path("/dev/shm/k8-engines.bin")
    size = args.mib << 20
    with open(body, "wb") as f:
        f.write(os.urandom(size))
    digest = hashlib.sha256(body.read_bytes()).hexdigest()
    config = args.workdir / "karma8.toml"
    config.write_text(CONFIG)
    data = args.workdir / "data"
    at = ["--data", str(data)]
    puts: dict[str, list[float]] = {e: [] for e in ENGINES}
    gets: dict[str, list[float]] = {e: [] for e in ENGINES}
    try:
        with ExitStack() as stack:
            _, gateway = stack.enter_context(
                role(
                    ["serve", "--data", str(data), "--config", str(config)],
                    r"gateway (http://\S+)",
                    args.workdir / "cluster.log",
                )
            )
            own = [
                stack.enter_context(
                    role(
                        ["serve", "--role", "storage", "--data", str(data / f"own-{i}")],
                        r"storage node (node-[0-9a-f]+) up",
                        args.workdir / f"own-{i}.log",
                    )
                )
                for i in range(4)
            ]
            for engine, setting in ENGINES.items():
                if setting:
                    karma8("namespace", "create", engine, "--public", *setting, *at)
            for _ in range(args.rounds):
                for engine in ENGINES:
                    ns = "default" if engine == "raid0" else engine
                    url = f"{gateway}/{ns}/big"
                    try:
                        seconds = curl_seconds("-T", str(body), url)
                    except RuntimeError:
                        print(karma8("nodes", *at), file=sys.stderr)
                        print(karma8("status", *at), file=sys.stderr)
                        raise
                    puts[engine].append(size / 1e6 / seconds)
                    gets[engine].append(size / 1e6 / curl_seconds("-o", "/dev/null", url))
                    time.sleep(1.5)  # the previous version's parts are collected
            # The separate node holding a data part (the costly loss: parity parts are not
            # read) of the most redundant files, asked while all is up.
            placed = {
                engine: json.loads(karma8("stat", f"{engine}/big", "--json", *at))["parts"]
                for engine in ENGINES
                if engine != "raid0"  # it cannot be read with a node of its down
            }

            def data_parts_on(node: str) -> int:
                return sum(
                    any(p["node_id"] == node and p["index"] < 5 for p in parts)
                    or (engine == "raid1" and any(p["node_id"] == node for p in parts))
                    for engine, parts in placed.items()
                )

            first = args.victim_holds  # an engine whose data part the victim must hold, if any

            def rank(node: str) -> tuple[bool, int]:
                parts = placed.get(first, [])
                holds = any(p["node_id"] == node and p["index"] < 5 for p in parts)
                return holds, data_parts_on(node)

            pid, victim = max(own, key=lambda o: rank(o[1]))
            holders = [
                engine
                for engine, parts in placed.items()
                if any(p["node_id"] == victim for p in parts)
            ]
            os.kill(pid, signal.SIGKILL)
            rates: dict[str, list[float]] = {engine: [] for engine in holders}
            for _ in range(args.rounds):  # interleaved, as the healthy rounds
                for engine in holders:
                    got = args.workdir / "got.bin"
                    seconds = curl_seconds("-o", str(got), f"{gateway}/{engine}/big")
                    assert hashlib.sha256(got.read_bytes()).hexdigest() == digest, engine
                    got.unlink()
                    rates[engine].append(size / 1e6 / seconds)
            degraded = {engine: statistics.median(r) for engine, r in rates.items()}
    finally:
        body.unlink(missing_ok=True)
    put0 = statistics.median(puts["raid0"])
    overhead = {"raid0": 1.0, "raid1": 2.0, "parity1": 1.2, "parity2": 1.4}
    print(f"{args.mib} MiB, {args.rounds} rounds, medians (MB/s of file bytes)")
    print("engine    PUT     x raid0  target   GET     degraded GET (one node killed)")
    for engine in ENGINES:
        put, get = statistics.median(puts[engine]), statistics.median(gets[engine])
        target = 0.8 / overhead[engine]
        deg = degraded.get(engine)
        deg_text = "-" if deg is None else f"{deg:.0f} ({deg / get:.2f} x healthy)"
        print(f"{engine:8}  {put:6.0f}  {put / put0:6.2f}  {target:6.2f}   {get:6.0f}  {deg_text}")


if __name__ == "__main__":
    main()
