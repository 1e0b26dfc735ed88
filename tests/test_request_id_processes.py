"""One failed PUT followed by its request id through the logs of every process it touched
(discovery, a gateway, 6 storage nodes; one process each, JSON log lines): the client's
``X-Request-Id`` comes back to it, and the gateway's, discovery's and the nodes' lines about
that PUT carry the same id (docs/operations.md, "Logs")."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from processes import GIVE_UP, service, wait_for

pytestmark = pytest.mark.slow

SECRET = "request-id-test-secret"
CONFIG = """
heartbeat_interval = 0.2
stripe_unit = "64 KiB"
max_file_size = "1 MiB"
public_namespaces = ["default"]
"""
TRACE = "trace-put-0001"
LOGGING = ["-v", "--log-format", "json"]


def lines(log: Path) -> list[dict[str, Any]]:
    """The log's JSON lines (each must be one: nothing else is written there)."""
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[str]:
    config = tmp_path / "k.toml"
    config.write_text(CONFIG)
    common = ["--secret", SECRET, "--config", str(config), *LOGGING]
    with ExitStack() as stack:
        discovery = stack.enter_context(
            service(
                [
                    "serve",
                    "--role",
                    "discovery",
                    "--port",
                    "0",
                    "--data",
                    str(tmp_path / "meta"),
                    *common,
                ],
                r"discovery up: (http://\S+)",
                tmp_path / "discovery.log",
                cwd=tmp_path,
            )
        )
        url = discovery.match.group(1)
        for i in range(6):
            stack.enter_context(
                service(
                    [
                        "serve",
                        "--role",
                        "storage",
                        "--data",
                        str(tmp_path / f"node-{i}"),
                        "--discovery",
                        url,
                        *common,
                    ],
                    r"storage node \S+ up",
                    tmp_path / f"node-{i}.log",
                    cwd=tmp_path,
                )
            )
        gateway = stack.enter_context(
            service(
                ["serve", "--role", "gw", "--port", "0", "--discovery", url, *common],
                r"gateway up: (http://\S+)",
                tmp_path / "gw.log",
                cwd=tmp_path,
            )
        )
        yield gateway.match.group(1)


def test_a_failed_put_is_followed_by_its_id_through_every_role(
    cluster: str, tmp_path: Path
) -> None:
    def body() -> Iterator[bytes]:  # chunked, and past max_file_size once the nodes have parts
        for _ in range(32):
            yield b"x" * (64 << 10)

    with httpx.Client(timeout=GIVE_UP) as http:
        answer = http.put(
            f"{cluster}/default/too-big", content=body(), headers={"X-Request-Id": TRACE}
        )
        assert answer.status_code == 413
        assert answer.headers["X-Request-Id"] == TRACE
        assert answer.json()["error"]["request_id"] == TRACE
        # An id a log line could be forged with is replaced, not echoed.
        forged = http.get(f"{cluster}/default/none", headers={"X-Request-Id": "a\tb c"})
        assert forged.status_code == 404
        assert forged.headers["X-Request-Id"] not in ("a\tb c", TRACE)

    def traced(name: str) -> list[dict[str, Any]]:
        return [line for line in lines(tmp_path / f"{name}.log") if line["request_id"] == TRACE]

    # The gateway's access line for the PUT: its status.
    wait_for(lambda: any(line.get("http", {}).get("status") == 413 for line in traced("gw")), "gw")
    # Discovery: the upload began and was aborted, under the PUT's id.
    wait_for(
        lambda: (
            {line["http"]["method"] for line in traced("discovery") if "http" in line} >= {"POST"}
        ),
        "discovery's lines",
    )
    paths = [line["http"]["path"] for line in traced("discovery") if "http" in line]
    assert any(p.endswith("/abort") for p in paths), paths
    # The 5 nodes that held its parts: the part writes and their clean-up.
    wait_for(lambda: sum(bool(traced(f"node-{i}")) for i in range(6)) >= 5, "the nodes' lines")
    for i in range(6):
        for line in traced(f"node-{i}"):
            assert line["role"] == "storage"
            assert "/v1/parts/" in line["message"]
    # No other request was given this id.
    assert all(line["role"] == "gw" for line in traced("gw"))
