"""Rebalancing in net mode: discovery's ``/v1/rebalance`` routes, ``karma8 rebalance`` and the
footer of ``karma8 nodes``, on the embedded cluster (real sockets on 127.0.0.1).

Each test fills 6 small nodes, adds 2 empty ones and leaves the rebalancer off by itself
(``enabled = false``), so that nothing moves until a test asks: the plan a dry run shows is
the cluster's, not a race with a rebalancing already under way.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from karma8.actors.rebalancer import RebalancerConfig
from karma8.cli import main
from karma8.core.model import NodeState
from karma8.net.netconfig import NetConfig

from drivers import GIVE_UP, NetDriver, eventually, net_config, net_driver
from processes import wait_for

CAPACITY = 512 * 1024
FILES = 60
FILE_SIZE = 6000  # parts of 1200 bytes: a quarter of a point of a node, so the fill can even out


def small_cluster() -> NetConfig:
    return attrs.evolve(
        net_config(),
        capacity=CAPACITY,
        rebalance=RebalancerConfig(enabled=False, interval=0.2, bandwidth=0),
    )


@asynccontextmanager
async def imbalanced(tmp_path: Path) -> AsyncIterator[tuple[NetDriver, dict[str, bytes]]]:
    """6 nodes at ~11% of their capacity, and 2 empty nodes just joined."""
    rng = random.Random(18)
    files = {f"f{i}": rng.randbytes(FILE_SIZE) for i in range(FILES)}
    async with net_driver(tmp_path, config=small_cluster()) as net:
        for name, data in files.items():
            await net.put(name, data)
        for _ in range(2):
            await net.add_node(CAPACITY)

        async def all_eight_available() -> bool:
            nodes = await net.nodes()
            return sum(n.state is NodeState.AVAILABLE for n in nodes) == 8

        await eventually(all_eight_available)
        yield net, files


async def rebalance(net: NetDriver, method: str = "GET", **params: str) -> httpx.Response:
    return await net._internal.request(method, f"{net._discovery_url}/v1/rebalance", params=params)


async def test_status_and_dry_run_move_nothing_then_a_start_evens_the_fill(
    tmp_path: Path,
) -> None:
    async with imbalanced(tmp_path) as (net, files):
        before = {n.node_id: n.parts for n in await net.nodes()}
        status = await rebalance(net)
        assert status.status_code == 200
        body = status.json()
        assert body["state"] == "idle"  # far off, but it does not start by itself
        assert body["remaining_bytes"] > 0
        assert body["spread_pp"] > 5
        assert (body["moved_parts"], body["moving_parts"], body["active"]) == (0, 0, False)
        assert body["settings"] == {
            "enabled": False,
            "interval": 0.2,
            "start_pp": 1.0,
            "tolerance_pp": 0.25,
            "bandwidth": 0.0,
            "concurrency": 4,
        }

        dry = await rebalance(net, "POST", dry_run="1")
        assert dry.status_code == 200
        plan = dry.json()
        assert plan["dry_run"] is True
        assert plan["moves"] > 0
        assert plan["move_bytes"] >= plan["moves"] * (FILE_SIZE // 5)
        assert plan["remaining_bytes"] == body["remaining_bytes"]
        assert plan["spread_after_pp"] < plan["spread_pp"]
        assert len(plan["nodes"]) == 8
        total = sum(n["live_bytes"] for n in plan["nodes"])
        assert total == FILES * FILE_SIZE
        assert sum(n["after_bytes"] for n in plan["nodes"]) == total
        empty = [n for n in plan["nodes"] if n["live_bytes"] == 0]
        assert len(empty) == 2
        for node in plan["nodes"]:
            assert node["capacity_bytes"] == CAPACITY
            assert node["fill_percent"] == pytest.approx(100 * node["live_bytes"] / CAPACITY, 1e-3)
            assert abs(node["target_bytes"] - total / 8) <= 1
        for node in empty:
            assert 0 < node["after_bytes"] <= node["target_bytes"]
            assert node["fill_after_percent"] > 0
        assert plan["status"]["state"] == "idle"

        # A dry run moves nothing, and a typo of it starts nothing.
        typo = await rebalance(net, "POST", dryrun="1")
        assert typo.status_code == 400
        assert typo.json()["error"] == {
            "code": "invalid_request",
            "message": "unknown query parameter 'dryrun' (known: dry_run)",
            "request_id": typo.headers["X-Request-Id"],
        }
        assert {n.node_id: n.parts for n in await net.nodes()} == before
        assert (await rebalance(net)).json()["moved_parts"] == 0

        start = await rebalance(net, "POST")
        assert start.status_code == 202
        assert start.json()["state"] == "rebalancing"

        async def done() -> bool:
            now = (await rebalance(net)).json()
            return bool(now["moved_parts"] > 0 and now["state"] != "rebalancing")

        await eventually(done)
        after = (await rebalance(net)).json()
        assert after["moved_bytes"] >= plan["move_bytes"]
        assert after["spread_pp"] < 1.0  # parts are 0.23 points of a node
        assert after["remaining_bytes"] < body["remaining_bytes"] / 10
        by_id = {n.node_id: n for n in await net.nodes()}
        for node in empty:
            assert by_id[node["node_id"]].parts > 0
        for name, data in files.items():
            assert await net.get(name) == data


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("POST", {"dry_run": "maybe"}, "dry_run must be 1 or 0 (or true/false), got 'maybe'"),
        ("POST", {"dry_run": "1", "force": "1"}, "unknown query parameter 'force'"),
        ("GET", {"dry_run": "1"}, "unknown query parameter 'dry_run' (it takes none)"),
    ],
)
async def test_bad_queries_are_400_and_the_routes_need_the_secret(
    tmp_path: Path, method: str, params: dict[str, str], message: str
) -> None:
    async with net_driver(tmp_path, config=small_cluster()) as net:
        bad = await rebalance(net, method, **params)
        assert bad.status_code == 400
        assert bad.json()["error"]["code"] == "invalid_request"
        assert message in bad.json()["error"]["message"]
        async with httpx.AsyncClient() as anonymous:
            for verb in ("GET", "POST"):
                refused = await anonymous.request(verb, f"{net._discovery_url}/v1/rebalance")
                assert refused.status_code == 403
                assert refused.json()["error"]["code"] == "forbidden"
        empty = (await rebalance(net, "POST", dry_run="true")).json()
        assert (empty["moves"], empty["move_bytes"], empty["remaining_bytes"]) == (0, 0, 0)
        assert empty["status"]["state"] == "balanced"


# -- the commands -------------------------------------------------------------------------


@contextmanager
def cluster_in_a_thread(tmp_path: Path) -> Iterator[list[str]]:
    """:func:`imbalanced` run by trio in another thread while the test calls ``main()``;
    yields the flags that point a command at it."""
    ready = threading.Event()
    shared: dict[str, Any] = {}

    async def serve() -> None:
        async with imbalanced(tmp_path) as (net, _):
            shared["flags"] = ["--discovery", net._discovery_url, "--secret", net._config.secret]
            shared["token"] = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as scope:
                shared["stop"] = scope.cancel
                ready.set()
                await trio.sleep_forever()

    def run() -> None:
        try:
            trio.run(serve)
        except BaseException as exc:
            shared["error"] = exc
            ready.set()

    thread = threading.Thread(target=run, name="cluster")
    thread.start()
    try:
        assert ready.wait(GIVE_UP), "the cluster did not start"
        if "error" in shared:
            raise shared["error"]
        yield shared["flags"]
    finally:
        if "stop" in shared:
            trio.from_thread.run_sync(shared["stop"], trio_token=shared["token"])
        thread.join(GIVE_UP)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[str]]:
    with cluster_in_a_thread(tmp_path) as flags:
        yield flags


def test_rebalance_dry_run_prints_each_node_now_and_after_the_round(
    cluster: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["rebalance", "--dry-run", *cluster]) == 0
    out, err = capsys.readouterr()
    assert err.startswith(f"karma8: cluster {cluster[1]} (from --discovery; secret from --secret)")
    lines = out.splitlines()
    assert lines[0] == "dry run: nothing moved"
    assert lines[1].split() == ["NODE", "CAPACITY", "LIVE", "TARGET", "FILL", "AFTER"]
    rows = [line.split() for line in lines[2:10]]
    assert all(row[0].startswith("node-") and row[1:3] == ["512.0", "KiB"] for row in rows)
    assert sum(row[3:5] == ["0", "B"] and row[-2] == "0.00%" for row in rows) == 2
    assert lines[10].startswith("next round: ")
    assert " moves, " in lines[10]
    assert lines[11].startswith("remaining ")
    assert lines[12].startswith("fill spread ")
    assert lines[12].endswith("(idle; rebalancing on its own is off)")
    assert (
        lines[13]
        == "moved 0 B (0 parts), moving now 0 B (0 parts), remaining "
        + (lines[11].removeprefix("remaining ").split(" (")[0])
    )
    assert lines[14] == "rate - (throttle unthrottled), ETA -"

    assert main(["rebalance", "--dry-run", "--json", *cluster]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["dry_run"] is True
    assert plan["moves"] > 0
    assert len(plan["nodes"]) == 8


def test_nodes_ends_with_the_rebalancing_and_rebalance_starts_it(
    cluster: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["nodes", *cluster]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[9].startswith("usable capacity ")
    assert lines[10].startswith("fill spread ")
    assert lines[10].endswith(" pp (idle; rebalancing on its own is off)")
    assert lines[11].startswith("moved 0 B (0 parts), moving now 0 B (0 parts), remaining ")

    assert main(["rebalance", *cluster]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "rebalancing started: discovery runs a pass now, whatever the threshold"
    assert out[1].endswith("(rebalancing)")

    def nodes_json() -> dict[str, Any]:
        assert main(["nodes", "--json", *cluster]) == 0
        parsed: dict[str, Any] = json.loads(capsys.readouterr().out)
        return parsed

    def finished() -> bool:
        report = nodes_json()["rebalance"]
        return bool(report["moved_parts"] > 0 and report["state"] != "rebalancing")

    wait_for(finished, "the rebalancing finished")
    listed = nodes_json()
    assert len(listed["nodes"]) == 8
    assert all("fill_percent" in n for n in listed["nodes"])
    assert listed["rebalance"]["moved_bytes"] > 0
    assert main(["nodes", *cluster]) == 0
    footer = capsys.readouterr().out.splitlines()[10:]
    assert footer[0].startswith("fill spread 0.")
    assert footer[1].startswith("moved ")
    assert not footer[1].startswith("moved 0 B")


def test_rebalance_into_a_closed_pipe_stops_quietly(cluster: list[str], tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "karma8.cli", "rebalance", "--dry-run", *cluster],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 141
    assert done.stderr.splitlines() == [
        f"karma8: cluster {cluster[1]} (from --discovery; secret from --secret)"
    ]


def test_rebalance_says_when_discovery_cannot_be_reached(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import socket

    with socket.socket() as sock:  # bound, not listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        for command in (["rebalance"], ["rebalance", "--dry-run"], ["nodes"]):
            assert main([*command, "--discovery", url, "--secret", "x"]) == 1
            err = capsys.readouterr().err.splitlines()
            assert err[0] == f"karma8: cluster {url} (from --discovery; secret from --secret)"
            assert err[1].startswith(f"karma8 {command[0]}: cannot reach discovery at {url}: ")
            assert len(err) == 2


async def test_a_rebalancer_that_fails_unexpectedly_starts_again_and_discovery_stays(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    from karma8.net.discovery_role import keep_running

    runs = 0

    class Broken:
        config = RebalancerConfig(interval=5.0)

        async def run(self) -> None:
            nonlocal runs
            runs += 1
            raise ValueError("an answer it cannot read")

    with trio.move_on_after(12.0):
        await keep_running(Broken(), "the rebalancer")  # type: ignore[arg-type]
    assert runs == 3  # at 0, 5 and 10 s
    assert caplog.text.count("the rebalancer failed; it starts again in 5 s") == 3
