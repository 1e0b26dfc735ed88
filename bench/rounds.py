"""The rounds against the stores: the client-side files, the warm-up and prefill, every
measurement in run order, and the disk's own write rate before and after."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ceilings import disk_write_rate
from loadgen import SMALL_SIZE, Sample, curl, large_transfer, prefill, verify_download, wrk
from peers import Server, ServerError
from settings import Settings, Workload


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
