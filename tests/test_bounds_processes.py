"""Hostile clients against real processes (discovery, 6 nodes, a gateway, one process each):
stalled uploads, slow headers and a Content-Length liar must not stop the gateway serving
others, and the idle limit cleans the stalled uploads up (no pending version, nothing
reserved, no part file left)."""

from __future__ import annotations

import socket
import sqlite3
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from processes import GIVE_UP, Service, wait_for
from storehelpers import packed_parts

pytestmark = pytest.mark.slow  # scripts/check --fast leaves it out

SECRET = "bounds-test-secret"
STALLED = 200
SLOW_HEADERS = 200
LIARS = 2
MAX_UPLOADS = STALLED + LIARS + 8  # room for the probes
FULL_AT = 2  # max_uploads of a second gateway
# Short limits so that the test is quick, long enough that a loaded machine opens every
# socket and probes before they run out (the verdicts do not depend on it: see below).
CONFIG = f"""
heartbeat_interval = 0.2
sweep_interval = 0.2
retire_grace = 0.2
capacity = "100 MiB"
stripe_unit = "64 KiB"
reserve_step = "1 MiB"
idle_timeout = 20.0
header_timeout = 20.0
max_uploads = {MAX_UPLOADS}
public_namespaces = ["default"]
"""


class Cluster:
    def __init__(self, root: Path, stack: ExitStack) -> None:
        self.root = root
        self.sockets: list[socket.socket] = []
        stack.callback(self._close_sockets)
        self.http = stack.enter_context(httpx.Client(timeout=GIVE_UP))
        config = root / "bounds.toml"
        config.write_text(CONFIG)
        common = ["--secret", SECRET, "--config", str(config)]
        discovery = stack.enter_context(
            _service(
                [
                    "serve",
                    "--role",
                    "discovery",
                    "--port",
                    "0",
                    "--data",
                    str(root / "meta"),
                    *common,
                ],
                r"discovery up: (http://\S+)",
                root,
                "discovery",
            )
        )
        self.discovery_url = discovery.match.group(1)
        for i in range(6):
            args = ["serve", "--role", "storage", "--data", str(root / f"node-{i}")]
            args += ["--discovery", self.discovery_url, *common]
            stack.enter_context(_service(args, r"storage node \S+ up", root, f"node-{i}"))
        args = ["serve", "--role", "gw", "--port", "0", "--discovery", self.discovery_url]
        gateway = stack.enter_context(
            _service(args + common, r"gateway up: (http://(\S+):(\d+))", root, "gw")
        )
        self.url = gateway.match.group(1)
        self.address = (gateway.match.group(2), int(gateway.match.group(3)))
        small = root / "small.toml"
        small.write_text(f"max_uploads = {FULL_AT}\n")
        args += ["--secret", SECRET, "--config", str(small)]
        self.small = stack.enter_context(
            _service(args, r"gateway up: (http://(\S+):(\d+))", root, "gw-small")
        )

    def connect_small(self, head: bytes) -> socket.socket:
        sock = socket.create_connection((self.small.match.group(2), int(self.small.match.group(3))))
        self.sockets.append(sock)
        sock.settimeout(GIVE_UP)
        sock.sendall(head)
        return sock

    def reserved(self) -> int:
        url = f"{self.discovery_url}/v1/nodes"
        nodes = self.http.get(url, headers={"X-Karma8-Secret": SECRET})
        return sum(int(n["reserved_bytes"]) for n in nodes.json()["nodes"])

    def part_files(self) -> list[str]:
        """Every part on the nodes' disks: files, and needles live in volumes."""
        files = [str(p) for p in self.root.glob("node-*/parts/**/*") if p.is_file()]
        nodes = sorted(self.root.glob("node-*"))
        return files + [f"{node}:{key}" for node in nodes for key in packed_parts(node)]

    def _close_sockets(self) -> None:
        for sock in self.sockets:
            sock.close()

    def connect(self, head: bytes) -> socket.socket:
        sock = socket.create_connection(self.address)
        self.sockets.append(sock)
        sock.settimeout(GIVE_UP)
        sock.sendall(head)
        return sock


def _service(args: list[str], ready: str, root: Path, name: str) -> _Managed:
    return _Managed(args, ready, root / f"{name}.log", cwd=root)


class _Managed(Service):
    def __enter__(self) -> _Managed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _count_pending(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT count(*) FROM versions WHERE state = 'pending'").fetchone()[0])


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with ExitStack() as stack:
        yield Cluster(tmp_path, stack)


def stalled_upload(cluster: Cluster, i: int) -> socket.socket:
    """A chunked PUT that sends its headers and 4 KiB, then nothing."""
    head = f"PUT /default/stalled-{i} HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n"
    return cluster.connect(head.encode() + b"1000\r\n" + b"s" * 4096 + b"\r\n")


def liar(cluster: Cluster, i: int) -> socket.socket:
    """A PUT that announces 400 MiB (80 MiB a part: it fits 100 MiB nodes), sends 1 byte."""
    head = f"PUT /default/liar-{i} HTTP/1.1\r\nHost: g\r\nContent-Length: {400 << 20}\r\n\r\nx"
    return cluster.connect(head.encode())


def uploads_in_flight(gateway: httpx.Client) -> float:
    """The gateway's uploads in flight, from its metrics."""
    for line in gateway.get("/metrics").text.splitlines():
        if line.startswith("karma8_gateway_uploads_in_flight "):
            return float(line.split()[1])
    raise AssertionError("no karma8_gateway_uploads_in_flight in /metrics")


def pending(cluster: Cluster) -> int:
    with sqlite3.connect(cluster.root / "meta" / "discovery.sqlite3") as db:
        return _count_pending(db)


def test_stalled_clients_cannot_stop_the_gateway(cluster: Cluster) -> None:
    client = cluster.http
    client.base_url = httpx.URL(cluster.url)
    existing = bytes(range(256)) * 1000
    assert client.put("/default/existing", content=existing).status_code == 201

    liars = [liar(cluster, i) for i in range(LIARS)]
    stalled = [stalled_upload(cluster, i) for i in range(STALLED)]
    wait_for(lambda: pending(cluster) == STALLED + LIARS, "every stalled upload has begun")
    # A liar reserves at most reserve_step (1 MiB) of its 400 MiB, not 80 MiB on 5 nodes.
    assert cluster.reserved() <= LIARS * (1 << 20) + 4096
    slow = [cluster.connect(b"GET /default/existing HTTP/1.1\r\nHo") for _ in range(SLOW_HEADERS)]

    # With all of them open, others are served: a GET, and PUTs that need room on 5 nodes
    # (2 x 80 MiB promised up front would have left no 5 nodes with room for 30 MiB).
    got = client.get("/default/existing")
    assert got.status_code == 200
    assert got.content == existing
    assert client.put("/default/small", content=b"hello").status_code == 201
    assert client.put("/default/big", content=b"b" * (30 << 20)).status_code == 201
    assert client.get("/default/small").content == b"hello"

    # The idle limit aborts every stalled upload: no pending version, nothing reserved, the
    # connections closed by the gateway (a 400 first), and so are the slow headers'.
    wait_for(lambda: pending(cluster) == 0, "the stalled uploads are aborted")
    wait_for(lambda: cluster.reserved() == 0, "their reservations are released")
    for sock in [*liars, *stalled]:
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        assert b"invalid_request" in answer
        sock.close()
    for sock in slow:
        assert sock.recv(65536) == b""  # closed at header_timeout, nothing answered
        sock.close()
    stored = {"existing", "small", "big"}
    listing = client.get("/default/").json()["files"]
    assert {f["name"] for f in listing} == stored
    wait_for(lambda: len(cluster.part_files()) == 5 * len(stored), "only live parts on disk")
    assert client.put("/default/after", content=b"a").status_code == 201


def test_beyond_max_uploads_the_answer_is_503_at_once(cluster: Cluster) -> None:
    # Longer than small_file_max, so each held upload begins (a pending version) at once.
    head = b"PUT /default/held HTTP/1.1\r\nHost: g\r\nContent-Length: 2000000\r\n\r\nx"
    held = [cluster.connect_small(head) for _ in range(FULL_AT)]
    wait_for(lambda: pending(cluster) == FULL_AT, "the small gateway is full")
    small = cluster.http
    small.base_url = httpx.URL(cluster.small.match.group(1))
    # The body (64 MiB, more than the sockets' buffers) is not read: the answer comes first.
    busy = small.put("/default/refused", content=b"r" * (64 << 20))
    assert busy.status_code == 503
    assert busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["code"] == "unavailable"
    for sock in held:
        sock.close()  # a client gone: its upload is cleaned up at once
    wait_for(lambda: pending(cluster) == 0, "the held uploads are aborted")
    # Aborted first, then their parts deleted; only then do they leave the gateway's count.
    wait_for(lambda: uploads_in_flight(small) == 0, "the held uploads have ended")
    assert small.put("/default/now", content=b"n").status_code == 201
