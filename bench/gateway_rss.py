"""Gateway memory: peak RSS of a gateway process after a 64 MiB vs a 1 GiB upload + download.

Discovery and 6 storage nodes run as separate processes; each file size gets a fresh gateway
process so that its VmHWM (peak RSS) belongs to that transfer alone. The body is generated
and hashed on the fly, so the benchmark itself never holds a file in memory.

    .venv/bin/python bench/gateway_rss.py [--sizes 64,1024] [--workdir /tmp/karma8-bench]

``measure_gateway_rss`` is the same measurement for other scripts (bench/compare.py).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import karma8_process, peak_rss_kib, separate_cluster

CHUNK = 1 << 20
DEFAULT_SIZES_MIB = (64, 1024)
TARGET_GROWTH_MIB = 64


@dataclass(frozen=True)
class RssRow:
    """One file size: the gateway's RSS before and after its transfer, and the rates."""

    mib: int
    idle_kib: int  # VmHWM right after start-up
    peak_kib: int  # VmHWM after the PUT and the GET
    put_mb_s: float
    get_mb_s: float


@dataclass(frozen=True)
class RssResult:
    rows: list[RssRow]

    @property
    def growth_mib(self) -> float | None:
        """Peak RSS of the last size minus that of the first, in MiB (None: one size only)."""
        if len(self.rows) < 2:
            return None
        return (self.rows[-1].peak_kib - self.rows[0].peak_kib) / 1024

    def growth_line(self) -> str | None:
        growth = self.growth_mib
        if growth is None:
            return None
        return (
            f"peak RSS growth from {self.rows[0].mib} MiB to {self.rows[-1].mib} MiB:"
            f" {growth:.1f} MiB (target < {TARGET_GROWTH_MIB} MiB)"
        )


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


def transfer(gateway: str, pid: int, mib: int) -> RssRow:
    """PUT ``mib`` MiB through the gateway, GET it back and check it; the row for that size."""
    size = mib << 20
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
    if got.digest() != sent.digest():
        raise RuntimeError(f"{mib} MiB: downloaded bytes differ from the uploaded ones")
    peak = peak_rss_kib(pid)
    return RssRow(mib, idle, peak, size / (t1 - t0) / 1e6, size / (t2 - t1) / 1e6)


def measure_gateway_rss(
    sizes_mib: Sequence[int],
    workdir: Path,
    on_row: Callable[[RssRow], None] | None = None,
) -> RssResult:
    """Start discovery and 6 nodes in ``workdir`` (emptied first), then per size a fresh
    gateway; ``on_row`` sees each row as soon as it is measured. Raises on any failure
    (a process that does not start, an HTTP error, a download that differs)."""
    shutil.rmtree(workdir, ignore_errors=True)
    rows: list[RssRow] = []
    with separate_cluster(workdir) as discovery:
        for mib in sizes_mib:
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
                workdir / f"gateway-{mib}.log",
            ) as (pid, gateway):
                row = transfer(gateway, pid, mib)
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return RssResult(rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--sizes", default=",".join(map(str, DEFAULT_SIZES_MIB)), help="file sizes in MiB"
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/karma8-bench-rss"))
    args = parser.parse_args()
    result = measure_gateway_rss([int(s) for s in args.sizes.split(",")], args.workdir)
    print("| file | gateway RSS idle | gateway peak RSS | PUT MB/s | GET MB/s |")
    print("|---:|---:|---:|---:|---:|")
    for row in result.rows:
        print(
            f"| {row.mib} MiB | {row.idle_kib / 1024:.1f} MiB | {row.peak_kib / 1024:.1f} MiB |"
            f" {row.put_mb_s:.0f} | {row.get_mb_s:.0f} |"
        )
    growth = result.growth_line()
    if growth is not None:
        print(f"\n{growth}")


if __name__ == "__main__":
    main()
