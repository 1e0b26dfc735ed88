"""The benchmark's own servers, run as ``scripts/bench`` runs them: a harness that fails to
start measures nothing (the stack ceiling's second process could not join its port, and
every full ``scripts/bench`` stopped at its warm-up, for a session)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx

from processes import GIVE_UP, wait_for

ROOT = Path(__file__).resolve().parent.parent


def test_the_stack_ceiling_serves_from_two_processes_on_one_port(tmp_path: Path) -> None:
    log = tmp_path / "stack.log"
    command = [sys.executable, str(ROOT / "bench" / "stack_ceiling.py"), "--port", "0"]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*command, "--workers", "2"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def both_serving() -> bool:
            assert proc.poll() is None, log.read_text()
            return log.read_text().count("serving http://") == 2

        wait_for(both_serving, "the stack ceiling's two processes serving")
        url = log.read_text().split()[1]
        # New connections each, so the kernel spreads them over both processes; a GET that
        # reaches the other process than its PUT reads the shared copy.
        for i in range(20):
            with httpx.Client(timeout=GIVE_UP) as client:
                assert client.put(f"{url}/f{i}", content=b"x" * i).status_code == 201
            with httpx.Client(timeout=GIVE_UP) as client:
                got = client.get(f"{url}/f{i}")
                assert (got.status_code, got.content) == (200, b"x" * i)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=GIVE_UP) == 0, log.read_text()
