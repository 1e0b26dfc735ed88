"""Running karma8 roles as real processes in tests."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# A guard against a hang while waiting for the cluster to do something by itself; far above
# what it takes, so that no verdict depends on the machine's speed.
GIVE_UP = 120.0


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Wait until ``condition()`` holds, checking every 50 ms; fail after :data:`GIVE_UP`."""
    deadline = time.monotonic() + GIVE_UP
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Service:
    """A ``karma8`` process whose output goes to ``log``; ready once ``ready`` matches it.

    ``cwd`` is required: karma8 looks for ``./karma8-data`` in its working directory, so a
    test that inherited the checkout's would depend on what was left there.
    """

    def __init__(self, args: list[str], ready: str, log: Path, *, cwd: Path) -> None:
        self.log = log
        self._file = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "karma8.cli", *args],
            stdout=self._file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + 120  # a guard against a hang, not a speed limit
        while time.monotonic() < deadline:
            text = log.read_text()
            match = re.search(ready, text)
            if match:
                self.match = match
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"service did not start: {args}\n{log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._file.close()
        return self.proc.returncode


@contextmanager
def service(args: list[str], ready: str, log: Path, *, cwd: Path) -> Iterator[Service]:
    s = Service(args, ready, log, cwd=cwd)
    try:
        yield s
    finally:
        s.stop()
