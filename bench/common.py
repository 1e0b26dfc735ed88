"""Helpers for the benchmarks: start karma8 roles as real processes, read their peak RSS,
write ratios."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def ratio(a: float | None, b: float | None) -> str:
    """``a / b`` as ``1.23x`` (three decimals below 0.1), or ``-`` without a value."""
    if a is None or b is None or b == 0:
        return "-"
    r = a / b
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.3f}x"


def peak_rss_kib(pid: int) -> int:
    """VmHWM: the process's peak resident set size since it started, in KiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", text)
    assert match, text
    return int(match.group(1))


@contextmanager
def karma8_process(args: list[str], ready: str, log: Path) -> Iterator[tuple[int, str]]:
    """Run ``karma8 ARGS`` until the block ends; yields (pid, the first group of ``ready``)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "karma8.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                match = re.search(ready, log.read_text())
                if match:
                    break
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


@contextmanager
def separate_cluster(
    workdir: Path, *, nodes: int = 6, secret: str = "bench-secret"
) -> Iterator[str]:
    """Discovery and ``nodes`` storage nodes as separate processes; yields the discovery URL."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "discovery.toml"  # anonymous requests, as to the peers
    config.write_text('public_namespaces = ["default"]\n')
    with karma8_process(
        [
            "serve",
            "--role",
            "discovery",
            "--port",
            "0",
            "--data",
            str(workdir / "meta"),
            "--secret",
            secret,
            "--config",
            str(config),
        ],
        r"discovery up: (http://\S+)",
        workdir / "discovery.log",
    ) as (_, discovery):
        stack = []
        try:
            for i in range(nodes):
                cm = karma8_process(
                    [
                        "serve",
                        "--role",
                        "storage",
                        "--data",
                        str(workdir / f"node-{i}"),
                        "--discovery",
                        discovery,
                        "--secret",
                        secret,
                    ],
                    r"storage node (\S+) up",
                    workdir / f"node-{i}.log",
                )
                cm.__enter__()
                stack.append(cm)
            yield discovery
        finally:
            for cm in reversed(stack):
                cm.__exit__(None, None, None)
