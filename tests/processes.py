"""Running karma8 roles as real processes in tests, and nginx in front of gateways."""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from storehelpers import packed_parts

# The nginx config docs/lb ships, and Debian's nginx (None where it is not installed).
SHIPPED_NGINX_CONF = Path(__file__).resolve().parents[1] / "docs" / "lb" / "karma8-nginx.conf"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
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


def need_nginx() -> None:
    """Skip a test without nginx, or fail it under CI, where every test must run."""
    if NGINX is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is missing: scripts/bootstrap --test-tools installs it")
        pytest.skip("nginx is not installed (scripts/bootstrap --test-tools installs it)")


def nginx_config(root: Path, *, port: int, gateways: list[str]) -> Path:
    """The shipped file with the test's gateways and address, inside the process-level
    settings a private nginx needs: its pid, logs and temporary files under ``root``."""
    shipped = SHIPPED_NGINX_CONF.read_text()
    servers = "\n".join(
        f"    server {g.removeprefix('http://')} max_fails=2 fail_timeout=5s;" for g in gateways
    )
    text, count = re.subn(r"(?m)^    server 10\.0\.0\.\d+:8080 .*;\n", "", shipped)
    assert count == 2, "the shipped upstream lists two example gateways"
    text = text.replace("upstream karma8_gateways {\n", f"upstream karma8_gateways {{\n{servers}\n")
    text = text.replace("    listen 80;", f"    listen 127.0.0.1:{port};")
    text = text.replace("/var/log/nginx/karma8.log", str(root / "access.log"))
    temp = "\n".join(f"{kind}_temp_path {root / kind};" for kind in _nginx_temp_kinds())
    user = f"user {getpass.getuser()};\n" if os.geteuid() == 0 else ""
    conf = root / "nginx.conf"
    conf.write_text(
        f"{user}daemon off;\nworker_processes 1;\npid {root / 'nginx.pid'};\n"
        f"error_log {root / 'error.log'} info;\nevents {{ worker_connections 256; }}\n"
        f"http {{\n{temp}\n{text}\n}}\n"
    )
    return conf


def _nginx_temp_kinds() -> list[str]:
    """The temporary directories this nginx was built with (``client_body``, ``proxy``, and
    those of the modules it has): each is moved into the test's directory, so that nothing
    is written where the package keeps its own (which a user other than root cannot)."""
    assert NGINX is not None
    built = subprocess.run([NGINX, "-V"], capture_output=True, text=True).stderr
    kinds = re.findall(r"--http-([a-z-]+)-temp-path=", built)
    return [kind.replace("-", "_") for kind in kinds] or ["client_body", "proxy"]


class Nginx:
    """nginx (Debian's binary) in front of ``gateways`` with the shipped config, as this user,
    everything under ``root``; ``url`` once it answers."""

    def __init__(self, root: Path, *, gateways: list[str]) -> None:
        assert NGINX is not None
        root.mkdir()
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf = nginx_config(root, port=self.port, gateways=gateways)
        check = subprocess.run(
            [NGINX, "-t", "-p", str(root), "-c", str(conf), "-e", str(root / "error.log")],
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(root), "-c", str(conf), "-e", str(root / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def up() -> bool:
            assert self.proc.poll() is None, (root / "error.log").read_text()
            try:
                return httpx.get(f"{self.url}/healthz", timeout=5).status_code < 500
            except httpx.HTTPError:
                return False

        wait_for(up, "nginx answers")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def errors(self) -> str:
        return (self.root / "error.log").read_text()


def start_nodes(
    stack: ExitStack, root: Path, discovery: str, common: list[str], *, count: int = 5
) -> None:
    """``count`` storage nodes, ``node-I`` under ``root``, each its own process, on the
    discovery URL list ``discovery``; stopped when ``stack`` closes."""
    for i in range(count):
        stack.enter_context(
            service(
                [
                    *("serve", "--role", "storage", "--data", str(root / f"node-{i}")),
                    *("--discovery", discovery, *common),
                ],
                r"storage node \S+ up",
                root / f"node-{i}.log",
                cwd=root,
            )
        )


def start_gateways(
    stack: ExitStack, root: Path, discovery: str, common: list[str], *, count: int = 2
) -> list[Service]:
    """``count`` gateway processes on the discovery URL list ``discovery``."""
    return [
        stack.enter_context(
            service(
                ["serve", "--role", "gw", "--port", "0", "--discovery", discovery, *common],
                r"gateway up: (http://\S+)",
                root / f"gw-{i}.log",
                cwd=root,
            )
        )
        for i in range(count)
    ]


def part_files(root: Path, *, nodes: int = 5) -> int:
    """Parts (files, and needles live in volumes) and temporaries on the disks of the nodes
    :func:`start_nodes` started."""
    count = 0
    for i in range(nodes):
        node = root / f"node-{i}"
        count += sum(1 for sub in ("parts", "tmp") for p in (node / sub).rglob("*") if p.is_file())
        count += len(packed_parts(node))
    return count


def stored(client: httpx.Client, url: str, data: bytes) -> bool:
    """A PUT acknowledged (201); False for any other answer or none."""
    try:
        return client.put(url, content=data).status_code == 201
    except httpx.HTTPError:
        return False
