"""One node answers at an address: a node whose disk was wiped, restarted on the same port,
comes back under a new id; the old id's record must not send readers there for its parts."""

from __future__ import annotations

import shutil
from pathlib import Path

import attrs
import pytest
import trio

from karma8.core.errors import Unavailable
from karma8.core.model import NodeState

from drivers import GIVE_UP, eventually, net_config, net_driver

NODE_TIMEOUT = 2.0  # the wiped node's restart waits this long: short, but no node of a loaded
# machine misses 20 heartbeats in a row


def test_a_wiped_node_restarted_on_its_port_is_never_read_for_the_old_ids_parts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = attrs.evolve(net_config(local_calls=False), node_timeout=NODE_TIMEOUT)

    async def main() -> None:
        with trio.fail_after(GIVE_UP):
            await check()

    async def check() -> None:
        async with net_driver(tmp_path, config=config) as d:
            for i in range(2):
                await d.put(f"early/{i}", b"x" * 5000)  # the first nodes are not empty now
            old = await d.add_node()  # empty: the next PUT places a part there
            data = bytes(range(256)) * 40
            await d.put("f", data)
            assert old in {p.node.node_id for p in (await d.stat("f")).parts}
            url = {n.node_id: n.url for n in await d.nodes()}[old]
            await d.kill_node(old)

            async def old_is_unavailable() -> bool:
                states = {n.node_id: n.state for n in await d.nodes()}
                return states[old] is NodeState.UNAVAILABLE

            await eventually(old_is_unavailable)
            await trio.sleep(NODE_TIMEOUT)  # also past what discovery heard (it sweeps)
            shutil.rmtree(d.node_dir(old))  # the disk is wiped; same directory, same port
            new = await d.add_node(port=int(url.rsplit(":", 1)[1]), again=old)
            assert new != old
            nodes = {n.node_id: n for n in await d.nodes()}
            assert nodes[new].url == url
            assert (nodes[old].url, nodes[old].state) == ("", NodeState.UNAVAILABLE)
            # The read fails as the old node's unavailability (503; the gateway's log names
            # the node), not with the new node's answer (502: not on this node).
            with pytest.raises(Unavailable):
                await d.get("f")
            assert "failed with 503" in caplog.text
            assert f"node {old} is unavailable: another node answers" in caplog.text
            await d.put("g", data)  # the new node works
            assert await d.get("g") == data

    trio.run(main)
