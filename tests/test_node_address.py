"""One node answers at an address: a node whose disk was wiped, restarted on the same port,
comes back under a new id; the old id's record must not send readers there for its parts."""

from __future__ import annotations

import os
import random
import shutil
import socket
from pathlib import Path

import attrs
import pytest
import trio

from karma8.core.errors import Unavailable
from karma8.core.model import NodeState

from drivers import GIVE_UP, eventually, net_config, net_driver

NODE_TIMEOUT = 2.0  # the wiped node's restart waits this long. A live node a stall takes for
# unavailable changes nothing checked here: the GET reads it all the same


def unused_port_below_ephemeral() -> int:
    """A free port of 127.0.0.1 below the kernel's ephemeral range, which outgoing
    connections (and binds to port 0) draw from: nothing else takes it between a node's stop
    and its restart on it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(20000, low), 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below the ephemeral range")


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
            # A port no outgoing connection takes meanwhile (below the ephemeral range).
            old = await d.add_node(port=unused_port_below_ephemeral())  # empty: the next PUT
            data = bytes(range(256)) * 40
            await d.put("f", data)
            assert old in {p.node.node_id for p in (await d.stat("f")).parts}
            url = {n.node_id: n.url for n in await d.nodes()}[old]
            await d.kill_node(old)

            async def old_is_unavailable() -> bool:
                states = {n.node_id: n.state for n in await d.nodes()}
                return states[old] is NodeState.UNAVAILABLE

            await eventually(old_is_unavailable)  # so not heard there for node_timeout
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

    trio.run(main)


def files_open_under(directory: Path) -> list[str]:
    """Files this process holds open under ``directory``."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{directory}/"):
            held.append(target)
    return held


def test_a_node_stopped_in_process_holds_none_of_its_files_open(tmp_path: Path) -> None:
    async def main() -> None:
        with trio.fail_after(GIVE_UP):
            async with net_driver(tmp_path, config=net_config(local_calls=False)) as d:
                for i in range(2):
                    await d.put(f"early/{i}", b"x" * 5000)
                node = await d.add_node()  # empty: the next PUT places a part there
                await d.put("f", b"y" * 5000)  # a small part: packed, a volume opened
                assert node in {p.node.node_id for p in (await d.stat("f")).parts}
                directory = d.node_dir(node)
                assert files_open_under(directory)
                await d.kill_node(node)

                async def closed() -> bool:
                    return not files_open_under(directory)

                await eventually(closed)

    trio.run(main)
