"""Gateway memory: peak RSS of a gateway process after a 64 MiB vs a 1 GiB upload + download.

Discovery and 6 storage nodes run as separate processes; each file size gets a fresh gateway
process so that its VmHWM (peak RSS) belongs to that transfer alone. The body is generated
and hashed on the fly, so the benchmark itself never holds a file in memory.

    .venv/bin/python bench/gateway_rss.py [--sizes 64,1024] [--workdir /tmp/karma8-bench]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import karma8_process, peak_rss_kib, separate_cluster

CHUNK = 1 << 20


def body(size: int, digest: hashlib._Hash) -> Iterator[bytes]:
    block = bytes(range(256)) * (CHUNK // 256)
    sent = 0
    counter = 0
    while sent < size:
        piece = (counter.to_bytes(8, "big") + block)[: min(CHUNK, size - sent)]
        digest.update(piece)
        sent += len(piece)
        counter += 1
        yield piece


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="64,1024", help="file sizes in MiB")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/karma8-bench-rss"))
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    rows = []
    with separate_cluster(args.workdir) as discovery:
        for mib in (int(s) for s in args.sizes.split(",")):
            size = mib << 20
            with karma8_process(
                [
                    "serve",
                    "--role",
                    "gw",
                    "--port",
                    "0",
                    "--discovery",
                    discovery,
                    "--secret",
                    "bench-secret",
                ],
                r"gateway up: (http://\S+)",
                args.workdir / f"gateway-{mib}.log",
            ) as (pid, gateway):
                idle = peak_rss_kib(pid)
                sent = hashlib.sha256()
                with httpx.Client(timeout=300) as client:
                    t0 = time.perf_counter()
                    put = client.put(f"{gateway}/default/bench-{mib}", content=body(size, sent))
                    put.raise_for_status()
                    t1 = time.perf_counter()
                    got = hashlib.sha256()
                    with client.stream("GET", f"{gateway}/default/bench-{mib}") as response:
                        response.raise_for_status()
                        for chunk in response.iter_raw(CHUNK):
                            got.update(chunk)
                    t2 = time.perf_counter()
                assert got.digest() == sent.digest(), "downloaded bytes differ"
                peak = peak_rss_kib(pid)
                rows.append((mib, idle, peak, size / (t1 - t0) / 1e6, size / (t2 - t1) / 1e6))
    print("| file | gateway RSS idle | gateway peak RSS | PUT MB/s | GET MB/s |")
    print("|---:|---:|---:|---:|---:|")
    for mib, idle, peak, put_rate, get_rate in rows:
        print(
            f"| {mib} MiB | {idle / 1024:.1f} MiB | {peak / 1024:.1f} MiB |"
            f" {put_rate:.0f} | {get_rate:.0f} |"
        )
    if len(rows) >= 2:
        growth = (rows[-1][2] - rows[0][2]) / 1024
        print(
            f"\npeak RSS growth from {rows[0][0]} MiB to {rows[-1][0]} MiB: {growth:.1f} MiB"
            f" (target < 64 MiB)"
        )


if __name__ == "__main__":
    main()
