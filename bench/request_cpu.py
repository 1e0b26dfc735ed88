"""CPU per request of a running karma8 cluster, process by process.

    python bench/request_cpu.py --gateway http://127.0.0.1:8080 --pid PID [--requests 200]

Sends ``--requests`` small PUTs (4 KiB, new names), then as many GETs of one of them, one at
a time over one keep-alive connection, and reads the user + system CPU time of the process
``--pid`` and of its children (gateway workers) from ``/proc`` before and after each batch.
Prints, per batch, the wall time per request and each process's CPU time per request: what
an internal hop costs shows as the difference between a gateway that calls discovery and the
nodes in-process and one that reaches them over HTTP (docs/benchmarks.md, "Gateway
workers"). Linux only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import httpx

SIZE = 4096
NAMESPACE = "default"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def with_children(pid: int) -> list[int]:
    """``pid`` and the processes whose parent it is."""
    found = [pid]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if parent == pid:
            found.append(int(entry))
    return found


def measure(label: str, pids: list[int], count: int, request: Callable[[int], None]) -> None:
    before = {pid: cpu_seconds(pid) for pid in pids}
    started = time.monotonic()
    for i in range(count):
        request(i)
    wall = time.monotonic() - started
    spent = {pid: cpu_seconds(pid) - before[pid] for pid in pids}
    per = ", ".join(f"pid {pid} {spent[pid] * 1000 / count:.2f} ms" for pid in pids)
    total = sum(spent.values()) * 1000 / count
    print(f"{label}: wall {wall * 1000 / count:.2f} ms/request; CPU {total:.2f} ms ({per})")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--gateway", required=True, help="the gateway's base URL")
    parser.add_argument("--pid", type=int, required=True, help="the karma8 serve process")
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args(argv)
    pids = with_children(args.pid)
    body = os.urandom(SIZE)
    run = f"{time.time_ns():x}"
    with httpx.Client(base_url=args.gateway, timeout=60) as client:

        def put(i: int) -> None:
            client.put(f"/{NAMESPACE}/request-cpu/{run}/{i}", content=body).raise_for_status()

        def get(_: int) -> None:
            client.get(f"/{NAMESPACE}/request-cpu/{run}/0").raise_for_status()

        measure("small PUT", pids, args.requests, put)
        measure("small GET", pids, args.requests, get)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
