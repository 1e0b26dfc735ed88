"""All or nothing on real processes: kill -9 a storage node mid-PUT, abort a client mid-body,
send a short body. Each time the PUT fails cleanly, the name still serves its previous
version, and once the sweeper has run no part file of the failed upload is left on any disk."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from processes import GIVE_UP, Service, wait_for
from storehelpers import packed_parts

pytestmark = pytest.mark.slow  # scripts/check --fast leaves it out

SECRET = "fault-test-secret"
# Timers short enough for the sweeper to clean up within seconds, long enough that a loaded
# machine's slow heartbeat or upload is not taken for a dead node or an abandoned upload.
FAST = """
heartbeat_interval = 0.2
node_timeout = 10.0
retire_grace = 0.2
sweep_interval = 0.2
upload_ttl = 6.0
stripe_unit = "1 MiB"
# A small PUT whose commit dies with discovery leaves parts that no lease (lost with the
# process) or row names: orphans, which the nodes collect after orphan_grace (10 min by
# default, a margin against a discovery started on the wrong database).
orphan_check_interval = 0.5
orphan_grace = 2.0
public_namespaces = ["default"]
"""


def grows(files: dict[str, bytes], by: int) -> Callable[[], bool]:
    """True once ``files`` holds ``by`` more entries than now."""
    now = len(files)
    return lambda: len(files) >= now + by


def _at_port(args: list[str], url: str) -> list[str]:
    """``args`` with ``--port 0`` replaced by the port of ``url``."""
    at = args.index("--port")
    return [*args[: at + 1], url.rsplit(":", 1)[1], *args[at + 2 :]]


class Cluster:
    """Discovery, 5 storage nodes and a gateway, one process each (so one can be killed)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        config = root / "fast.toml"
        config.write_text(FAST)
        common = ["--secret", SECRET, "--config", str(config)]
        self._started: list[Service] = []
        try:
            self._start(root, common)
        except BaseException:
            for service in reversed(self._started):  # none left running by a failed start
                service.stop()
            raise
        self.restarts = 0

    def _start(self, root: Path, common: list[str]) -> None:
        # Port 0 first, then the port each got: a restarted discovery or gateway is found
        # where it was (a port picked free beforehand may be taken before the bind).
        discovery_args = [
            *("serve", "--role", "discovery", "--port", "0"),
            *("--data", str(root / "meta"), *common),
        ]
        self.discovery = self._run(discovery_args, r"discovery up: (http://\S+)", "discovery")
        self.discovery_url = self.discovery.match.group(1)
        self.discovery_args = _at_port(discovery_args, self.discovery_url)
        self.node_args = [
            [
                "serve",
                "--role",
                "storage",
                "--data",
                str(root / f"node-{i}"),
                "--discovery",
                self.discovery_url,
                *common,
            ]
            for i in range(5)
        ]
        self.nodes = [
            self._run(args, r"storage node \S+ up", f"node-{i}")
            for i, args in enumerate(self.node_args)
        ]
        gateway_args = [
            *("serve", "--role", "gw", "--port", "0"),
            *("--discovery", self.discovery_url, *common),
        ]
        self.gateway = self._run(gateway_args, r"gateway up: (http://\S+)", "gw")
        self.url = self.gateway.match.group(1)
        self.gateway_args = _at_port(gateway_args, self.url)

    def _run(self, args: list[str], ready: str, name: str) -> Service:
        service = Service(args, ready, self.root / f"{name}.log", cwd=self.root)
        self._started.append(service)
        return service

    def kill(self, role: str) -> None:
        """kill -9 one role: "gateway", "discovery" or "node-N"."""
        self._service(role).stop(signal.SIGKILL)

    def restart(self, role: str) -> None:
        """Start a killed role again on the same data and port."""
        self.restarts += 1
        log = self.root / f"{role}-restart-{self.restarts}.log"
        if role == "gateway":
            self.gateway = Service(
                self.gateway_args, r"gateway up: (http://\S+)", log, cwd=self.root
            )
        elif role == "discovery":
            self.discovery = Service(
                self.discovery_args, r"discovery up: (http://\S+)", log, cwd=self.root
            )
        else:
            index = int(role.removeprefix("node-"))
            self.nodes[index] = Service(
                self.node_args[index], r"storage node \S+ up", log, cwd=self.root
            )

    def _service(self, role: str) -> Service:
        if role == "gateway":
            return self.gateway
        if role == "discovery":
            return self.discovery
        return self.nodes[int(role.removeprefix("node-"))]

    def part_files(self) -> list[str]:
        """Every part (a file, or a needle live in a volume) and temporary file on every
        node's disk."""
        found = []
        for i in range(5):
            for sub in ("parts", "tmp"):
                base = self.root / f"node-{i}" / sub
                found += [str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file()]
            found += [f"node-{i}/volumes:{key}" for key in packed_parts(self.root / f"node-{i}")]
        return sorted(found)

    def wait_until_only(self, expected: int) -> list[str]:
        """The part files once there are ``expected`` of them (the sweeper's work is done)."""
        try:
            wait_for(lambda: len(self.part_files()) == expected, f"{expected} part files")
        except AssertionError:
            found = self.part_files()
            raise AssertionError(f"{len(found)} part files, not {expected}: {found}") from None
        return self.part_files()

    def stop(self) -> None:
        for service in [self.gateway, *self.nodes, self.discovery]:
            service.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()


def body(
    size: int, pause_at: int, paused: threading.Event, resume: threading.Event
) -> Iterator[bytes]:
    """``size`` random bytes; after ``pause_at`` of them, sets ``paused`` and waits for
    ``resume`` before sending the rest."""
    sent = 0
    chunk = os.urandom(1 << 20)
    while sent < size:
        piece = chunk[: min(len(chunk), size - sent)]
        yield piece
        sent += len(piece)
        if sent == pause_at:
            paused.set()
            assert resume.wait(GIVE_UP)


def test_kill_9_of_a_storage_node_mid_put_fails_it_cleanly(cluster: Cluster) -> None:
    with httpx.Client(timeout=GIVE_UP) as client:
        old = os.urandom(300_000)
        assert client.put(f"{cluster.url}/default/f", content=old).status_code == 201

        # The upload stops after 20 MiB (rows have reached all five nodes); one of its nodes
        # is killed; then the rest of the body follows.
        paused, resume = threading.Event(), threading.Event()

        def killer() -> None:
            try:
                if paused.wait(GIVE_UP):
                    cluster.nodes[2].proc.send_signal(signal.SIGKILL)
                    cluster.nodes[2].proc.wait()
            finally:
                resume.set()

        thread = threading.Thread(target=killer)
        thread.start()
        try:
            response = client.put(
                f"{cluster.url}/default/f", content=body(80 << 20, 20 << 20, paused, resume)
            )
        finally:
            thread.join()
        assert paused.is_set()
        assert response.status_code in (502, 503), response.text
        assert response.json()["error"]["code"] in ("storage_failure", "unavailable")
        # The name still serves the previous version... once the killed node is back.
        cluster.nodes[2].stop()
        cluster.nodes[2] = Service(
            cluster.node_args[2],
            r"storage node \S+ up",
            cluster.root / "node-2-again.log",
            cwd=cluster.root,
        )
        assert client.get(f"{cluster.url}/default/f").content == old
    # Only the 5 parts of the old version remain, on disk, anywhere.
    assert len(cluster.wait_until_only(5)) == 5, cluster.part_files()


def test_client_abort_mid_body_leaves_nothing(cluster: Cluster) -> None:
    host, port = cluster.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"PUT /default/aborted HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for _ in range(12):  # 12 MiB in chunked encoding: a few stripe rows reach the nodes
            sock.sendall(b"100000\r\n" + os.urandom(1 << 20) + b"\r\n")
        wait_for(lambda: cluster.part_files() != [], "part writes begun on the nodes")
    with httpx.Client(timeout=GIVE_UP) as client:
        assert client.get(f"{cluster.url}/default/aborted").status_code == 404
    assert cluster.wait_until_only(0) == []


def test_short_body_leaves_nothing_and_keeps_the_old_version(cluster: Cluster) -> None:
    with httpx.Client(timeout=GIVE_UP) as client:
        assert client.put(f"{cluster.url}/default/s", content=b"old").status_code == 201
    host, port = cluster.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"PUT /default/s HTTP/1.1\r\nHost: x\r\nContent-Length: 20000000\r\n\r\n"
            + os.urandom(7 << 20)
        )
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(GIVE_UP)
        reply = sock.recv(4096)
        assert reply == b"" or reply.startswith(b"HTTP/1.1 400")
    with httpx.Client(timeout=GIVE_UP) as client:
        assert client.get(f"{cluster.url}/default/s").content == b"old"
    assert len(cluster.wait_until_only(5)) == 5


def test_kill_9_of_each_role_during_a_stream_of_puts_loses_no_acknowledged_file(
    cluster: Cluster,
) -> None:
    acknowledged: dict[str, bytes] = {}
    failed: dict[str, bytes] = {}
    stop = threading.Event()

    def writer() -> None:
        i = 0
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                data = os.urandom(i * 7919 % 400_000)
                name = f"stream/{i:05d}"
                try:
                    ok = client.put(f"{cluster.url}/default/{name}", content=data).status_code
                except httpx.HTTPError:
                    ok = 0
                (acknowledged if ok == 201 else failed)[name] = data
                i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        # Each kill lands while PUTs flow, and at least one PUT meets the dead role; the next
        # kill waits until PUTs succeed again.
        for role in ("node-3", "discovery", "gateway", "node-0"):
            wait_for(grows(acknowledged, 5), f"5 more PUTs before {role} dies")
            more_failed = grows(failed, 1)
            cluster.kill(role)
            wait_for(more_failed, f"a PUT that meets the dead {role}")
            cluster.restart(role)
        wait_for(grows(acknowledged, 5), "PUTs after the last restart")
    finally:
        stop.set()
        thread.join()
    with httpx.Client(timeout=30) as client:
        for name, data in acknowledged.items():
            response = client.get(f"{cluster.url}/default/{name}")
            assert response.status_code == 200, (name, response.text)
            assert response.content == data, name
        committed = len(acknowledged)
        for name, data in failed.items():
            # A PUT cut off by a kill may or may not have committed, but never partially.
            response = client.get(f"{cluster.url}/default/{name}")
            assert response.status_code in (200, 404), (name, response.text)
            if response.status_code == 200:
                assert response.content == data, name
                committed += 1
    # Orphans of the interrupted uploads are swept: 5 part files per committed file remain.
    files = cluster.wait_until_only(5 * committed)
    assert len(files) == 5 * committed, (len(files), committed)
    # Node identities persisted across the kill.
    ids = {(cluster.root / f"node-{i}" / "node_id").read_text() for i in range(5)}
    assert len(ids) == 5
