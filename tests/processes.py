"""Running karma8 roles as real processes in tests."""

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


class Service:
    def __init__(self, args: list[str], ready: str, log: Path) -> None:
        self.log = log
        self._file = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "karma8.cli", *args],
            stdout=self._file,
            stderr=subprocess.STDOUT,
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
def service(args: list[str], ready: str, log: Path) -> Iterator[Service]:
    s = Service(args, ready, log)
    try:
        yield s
    finally:
        s.stop()
