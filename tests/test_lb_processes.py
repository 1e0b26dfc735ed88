"""Two gateways behind nginx, with the config that docs/lb/karma8-nginx.conf ships: PUTs and
GETs through nginx; one gateway killed with kill -9 while clients read and write; reads go on,
writes retried by their client succeed, and every acknowledged file reads back byte-identical.
Every role finds discovery from a list whose first URL is dead, so each fails over to the live
one (docs/operations.md, "A cluster across machines").

nginx is Debian's binary, run as this user with everything (config, pid, logs, temporary files)
in the test's directory; scripts/bootstrap --test-tools installs it."""

from __future__ import annotations

import os
import re
import signal
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from processes import (
    GIVE_UP,
    SHIPPED_NGINX_CONF,
    Nginx,
    Service,
    free_port,
    need_nginx,
    service,
    start_gateways,
    start_nodes,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[1]
SECRET = "lb-test-secret"
CONFIG = """
heartbeat_interval = 0.2
node_timeout = 10.0
retire_grace = 0.2
sweep_interval = 0.2
stripe_unit = "64 KiB"
public_namespaces = ["default"]
"""


@pytest.fixture
def balanced(tmp_path: Path) -> Iterator[tuple[Nginx, list[Service]]]:
    need_nginx()
    config = tmp_path / "k.toml"
    config.write_text(CONFIG)
    common = ["--secret", SECRET, "--config", str(config)]
    with ExitStack() as stack:
        discovery = stack.enter_context(
            service(
                ["serve", "--role", "discovery", "--port", "0", "--data", str(tmp_path), *common],
                r"discovery up: (http://\S+)",
                tmp_path / "discovery.log",
                cwd=tmp_path,
            )
        )
        # A dead instance first: every process must fail over to the live one.
        urls = f"http://127.0.0.1:{free_port()},{discovery.match.group(1)}"
        start_nodes(stack, tmp_path, urls, common)
        gateways = start_gateways(stack, tmp_path, urls, common)
        nginx = Nginx(tmp_path / "nginx", gateways=[g.match.group(1) for g in gateways])
        stack.callback(nginx.stop)
        yield nginx, gateways


def put_until_stored(client: httpx.Client, url: str, data: bytes) -> int:
    """PUT until a 201, as a client that retries does; returns the attempts it took."""
    for attempt in range(1, 6):
        try:
            if client.put(url, content=data).status_code == 201:
                return attempt
        except httpx.HTTPError:
            pass
    raise AssertionError(f"PUT {url} failed 5 times")


def test_the_operations_page_shows_the_shipped_config() -> None:
    """Every directive of the nginx block in docs/operations.md is in the shipped file."""
    page = (ROOT / "docs" / "operations.md").read_text()
    block = page.split("```nginx\n", 1)[1].split("```", 1)[0]
    shipped = " ".join(SHIPPED_NGINX_CONF.read_text().split())
    directives = [d.strip() for d in re.split(r"[;{}]", block) if d.strip()]
    missing = [d for d in directives if " ".join(d.split()) not in shipped]
    assert missing == []


@pytest.mark.slow
def test_nginx_in_front_of_two_gateways_survives_the_kill_of_one(
    balanced: tuple[Nginx, list[Service]],
) -> None:
    nginx, gateways = balanced
    base = f"{nginx.url}/default"
    stored: dict[str, bytes] = {}
    with httpx.Client(timeout=GIVE_UP) as client:
        # Through nginx: the request id passes both ways, bodies stream both ways (a chunked
        # 3 MiB body, no Content-Length), nothing is spooled to nginx's disk.
        data = os.urandom(3 << 20)
        response = client.put(
            f"{base}/big",
            content=iter([data[i : i + 65536] for i in range(0, len(data), 65536)]),
            headers={"X-Request-Id": "lb-trace-1"},
        )
        assert response.status_code == 201, response.text
        assert response.headers["X-Request-Id"] == "lb-trace-1"
        stored["big"] = data
        # Without one, the gateway gets nginx's id, and says it back.
        response = client.get(f"{base}/big")
        assert response.content == data
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-Id"])
        for i in range(10):
            stored[f"f{i}"] = os.urandom(i * 25_013)
            assert client.put(f"{base}/f{i}", content=stored[f"f{i}"]).status_code == 201

    stop = threading.Event()
    killed = threading.Event()
    after_kill: list[tuple[str, int]] = []  # (name, status) of GETs begun after the kill
    put_attempts: list[int] = []
    acknowledged = dict(stored)
    lock = threading.Lock()

    def reader() -> None:
        with httpx.Client(timeout=GIVE_UP) as client:
            while not stop.is_set():
                for name, data in list(acknowledged.items()):
                    begun_after = killed.is_set()
                    try:
                        response = client.get(f"{base}/{name}")
                        status = response.status_code if response.content == data else -1
                    except httpx.HTTPError:
                        status = 0
                    if begun_after:
                        with lock:
                            after_kill.append((name, status))

    def writer() -> None:
        i = 0
        with httpx.Client(timeout=GIVE_UP) as client:
            while not stop.is_set():
                name, data = f"w{i:04d}", os.urandom(i * 7919 % 300_000)
                put_attempts.append(put_until_stored(client, f"{base}/{name}", data))
                with lock:
                    acknowledged[name] = data
                i += 1

    threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(put_attempts) >= 5, "5 PUTs through nginx")
        gateways[0].stop(signal.SIGKILL)
        killed.set()
        written = len(put_attempts)
        wait_for(lambda: len(put_attempts) >= written + 10, "10 more PUTs after the kill")
        wait_for(lambda: len(after_kill) >= 2 * len(stored), "GETs after the kill")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    # Every GET begun after the kill was answered whole: nginx took them to the live gateway.
    assert [entry for entry in after_kill if entry[1] != 200] == []
    with httpx.Client(timeout=GIVE_UP) as client:
        for name, data in acknowledged.items():
            response = client.get(f"{base}/{name}")
            assert response.status_code == 200, (name, response.text)
            assert response.content == data, name
    errors = nginx.errors()
    assert "buffered to a temporary file" not in errors
    # nginx saw the dead gateway and moved on (its error log names the refused connection).
    assert "Connection refused" in errors or "upstream prematurely closed" in errors
