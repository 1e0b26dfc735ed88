"""The cluster at a glance: discovery's ``GET /v1/status``, ``karma8 status`` and the status
page, the page loaded in a real headless browser (Debian's chromium, which scripts/bootstrap
installs) and checked for what it shows."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from drivers import NetDriver, net_driver

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# A browser that talks only to the page: no background requests, which this machine's
# closed network refuses, no sandbox (the tests may run as root).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
GIVE_UP = 60  # seconds; a guard against a hang, not a wait


@pytest.fixture
async def net(tmp_path: Path) -> AsyncIterator[NetDriver]:
    async with net_driver(tmp_path / "cluster") as driver:
        yield driver


def secret(net: NetDriver) -> str:
    assert net._config.secret is not None
    return net._config.secret


async def test_the_status_route_counts_files_nodes_and_uploads(net: NetDriver) -> None:
    for i in range(3):
        await net.put(f"s/{i}", b"x" * (1000 * (i + 1)))
    await net.put("s/0", b"y" * 10)  # a new version: still 3 files
    response = await net._internal.get(f"{net._discovery_url}/v1/status")
    assert response.status_code == 200
    status = response.json()
    assert status["totals"] == {
        "files": 3,
        "bytes": 10 + 2000 + 3000,
        "pending_uploads": 0,
        "degraded_files": 0,
    }
    assert len(status["nodes"]) == 6
    assert {n["name"] for n in status["namespaces"]} == {"default"}
    assert status["rebalance"]["state"] in ("balanced", "idle", "rebalancing")
    # Internal, like every discovery route but the page: the secret is needed.
    refused = await net._http.get(f"{net._discovery_url}/v1/status")
    assert refused.status_code == 403


async def test_karma8_status_prints_the_cluster(net: NetDriver, tmp_path: Path) -> None:
    await net.put("one", b"1")
    args = ["--discovery", net._discovery_url, "--secret", secret(net)]
    out = await trio.run_process(
        [sys.executable, "-m", "karma8.cli", "status", *args, "--json"],
        capture_stdout=True,
        cwd=tmp_path,
    )
    assert json.loads(out.stdout)["totals"]["files"] == 1
    screen = await trio.run_process(
        [sys.executable, "-m", "karma8.cli", "status", *args],
        capture_stdout=True,
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "40"},
    )
    text = screen.stdout.decode()
    assert "6 nodes (6 available)" in text
    assert "1 files, 1 B; 0 uploads pending" in text
    assert text.count("available ") >= 6
    # Into a pipe: whole lines, not wrapped at the terminal's width and padded.
    assert "B to move\n" in text
    assert not [line for line in text.splitlines() if line != line.rstrip()]


async def test_karma8_status_watch_into_a_pipe_prints_each_screen(
    net: NetDriver, tmp_path: Path
) -> None:
    """Not a terminal: no redrawing in place (which would print nothing until interrupted),
    every screen after the last, as it is fetched; and a reader that leaves ends it."""
    args = ["--discovery", net._discovery_url, "--secret", secret(net), "--watch", "0.1"]
    seen = b""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "karma8.cli", "status", *args], stdout=subprocess.PIPE, cwd=tmp_path
    )
    assert process.stdout is not None
    try:
        with trio.fail_after(GIVE_UP):
            while seen.count(b"6 nodes (6 available)") < 2:
                chunk = await process.stdout.receive_some()
                assert chunk, f"the watch ended early: {seen!r}"
                seen += chunk
            await process.stdout.aclose()  # the reader leaves (`| head`): it ends, 141
            assert await process.wait() == 141
    finally:
        process.kill()
        await process.wait()
        await process.stdout.aclose()


async def browse(url: str, profile: Path) -> str:
    """The page's DOM as the browser built it."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: scripts/bootstrap installs it (Debian's package)")
        pytest.skip("chromium is not installed (scripts/bootstrap installs it as root)")
    with trio.fail_after(GIVE_UP):
        done = await trio.run_process(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
            capture_stdout=True,
            capture_stderr=True,
        )
    return str(done.stdout.decode())


async def test_the_status_page_in_a_browser(net: NetDriver, tmp_path: Path) -> None:
    await net.put("a", b"a" * 5000)
    logging.getLogger("karma8.test").warning("a test warning <b>not markup</b>")
    host = net._discovery_url.removeprefix("http://")
    dom = await browse(f"http://karma8:{secret(net)}@{host}/status", tmp_path / "profile")
    assert '<meta http-equiv="refresh" content="5">' in dom
    assert dom.count('<tr id="node-') == 6
    nodes = (await net._internal.get(f"{net._discovery_url}/v1/nodes")).json()["nodes"]
    for node in nodes:
        assert f'id="node-{node["node_id"]}"' in dom
    assert "1 files, 4.9 KiB" in dom
    assert "<td>default</td><td>public</td><td>enabled</td>" in dom
    assert 'class="fill"' in dom
    # Logged text is shown as text, never as markup.
    assert "a test warning &lt;b&gt;not markup&lt;/b&gt;" in dom
    # Without the secret: the browser gets a 401 and no page.
    refused = await browse(f"http://{host}/status", tmp_path / "profile-2")
    assert "node-table" not in refused
    answer = await net._http.get(f"http://{host}/status")
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == 'Basic realm="karma8"'
    wrong = await net._http.get(f"http://{host}/status", auth=("karma8", "wrong"))
    assert wrong.status_code == 401
