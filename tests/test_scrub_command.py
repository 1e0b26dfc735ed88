"""``karma8 scrub``: every node that is up re-reads its parts now; a corrupt one is
quarantined and the command exits 1; a node discovery has for down is skipped, not a failure
(nodes are never removed, so it would fail every scrub from then on)."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import trio

from karma8.cli import main
from karma8.core.model import NodeState, NodeStatus
from karma8.net.clients import HttpDiscoveryClient

from drivers import NetDriver, net_driver


async def _scrub(net: NetDriver, *args: str) -> int:
    at = ["--discovery", net._discovery_url, "--secret", net._config.secret or ""]
    status: int = await trio.to_thread.run_sync(main, ["scrub", *args, *at])
    return status


async def test_scrub_skips_a_node_that_is_down_and_fails_on_a_corrupt_part(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with net_driver(tmp_path / "cluster") as net:
        await net.put("f", b"x" * 1_000_000)  # parts in files (over small_part_max)
        # One node as discovery has it once it is silent (no wait for node_timeout, which
        # a loaded machine must not reach for nodes that are alive).
        down = (await net.nodes())[0].node_id
        downs = {down}
        listed = HttpDiscoveryClient.list_nodes

        async def one_down(self: HttpDiscoveryClient) -> list[NodeStatus]:
            nodes = await listed(self)
            return [
                attrs.evolve(n, state=NodeState.UNAVAILABLE) if n.node_id in downs else n
                for n in nodes
            ]

        monkeypatch.setattr(HttpDiscoveryClient, "list_nodes", one_down)
        assert await _scrub(net, "--json") == 0
        results = {r["node_id"]: r for r in json.loads(capsys.readouterr().out)}
        assert results[down] == {"node_id": down, "skipped": "unavailable"}
        assert all("checked" in r for n, r in results.items() if n != down)
        part = next(p for p in (await net.stat("f")).parts if p.node.node_id != down)
        (path,) = (tmp_path / "cluster").glob(f"*/parts/*/*/{part.key}")
        data = bytearray(path.read_bytes())
        data[200] ^= 1  # inside the payload, past the part file's header
        path.write_bytes(bytes(data))
        assert await _scrub(net) == 1
        table = capsys.readouterr().out
        assert "skipped: the node is unavailable" in table
        assert part.key in table
        downs.update(n.node_id for n in await net.nodes())  # none up: nothing was scrubbed
        assert await _scrub(net) == 1
        assert "no node could be scrubbed: none is up" in capsys.readouterr().err
