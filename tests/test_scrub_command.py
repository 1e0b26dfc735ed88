"""``karma8 scrub``: every available node re-reads its parts now; a corrupt one is quarantined
and the command exits 1; a node discovery has for dead is skipped, not a failure (nodes are
never removed, so it would fail every scrub from then on)."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import trio

from karma8.cli import main
from karma8.core.model import NodeState

from drivers import NetDriver, eventually, net_config, net_driver


async def _scrub(net: NetDriver, *args: str) -> int:
    at = ["--discovery", net._discovery_url, "--secret", net._config.secret or ""]
    status: int = await trio.to_thread.run_sync(main, ["scrub", *args, *at])
    return status


async def test_scrub_skips_a_dead_node_and_fails_on_a_corrupt_part(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = attrs.evolve(net_config(), node_timeout=5.0)  # live nodes beat every 0.1 s
    async with net_driver(tmp_path / "cluster", config=config) as net:
        await net.put("f", b"x" * 1_000_000)  # parts in files (over small_part_max)
        dead = await net.add_node()
        await net.kill_node(dead)

        async def down() -> bool:
            return {n.node_id: n.state for n in await net.nodes()}[dead] is NodeState.UNAVAILABLE

        await eventually(down, what="the killed node taken for down")
        assert await _scrub(net, "--json") == 0
        results = {r["node_id"]: r for r in json.loads(capsys.readouterr().out)}
        assert results[dead] == {"node_id": dead, "skipped": "unavailable"}
        assert sum(r.get("checked", 0) for r in results.values()) >= 5
        part = (await net.stat("f")).parts[2]
        (path,) = (tmp_path / "cluster").glob(f"*/parts/*/*/{part.key}")
        data = bytearray(path.read_bytes())
        data[200] ^= 1  # inside the payload, past the part file's header
        path.write_bytes(bytes(data))
        assert await _scrub(net) == 1
        table = capsys.readouterr().out
        assert "skipped: the node is unavailable" in table
        assert part.key in table
