"""One process serves a storage node: the same node id heard from a second place (a copy of
its directory started beside the original) is refused while the first still heartbeats."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from karma8.actors.discovery import Discovery, DiscoveryConfig
from karma8.core.errors import NodeConflict, error_from_code
from karma8.core.layout import StripeLayout
from karma8.core.model import NodeRegistration, NodeState
from karma8.metadata.sqlite import SqliteMetadataStore
from karma8.net.codec import STATUS_BY_CODE
from karma8.net.serve import node_place
from karma8.net.serving import RandomIds
from karma8.sim.world import InlineRunner


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t


def discovery(clock: Clock) -> Discovery:
    return Discovery(
        store=SqliteMetadataStore(":memory:"),
        blocking=InlineRunner(),
        clock=clock,
        ids=RandomIds(),
        config=DiscoveryConfig(layout=StripeLayout(parts=5, unit=4096), node_timeout=10.0),
    )


def node(place: str | None, url: str = "http://127.0.0.1:1") -> NodeRegistration:
    return NodeRegistration(node_id="n1", url=url, capacity_bytes=1 << 20, place=place)


async def test_a_second_place_is_refused_while_the_first_heartbeats() -> None:
    clock = Clock()
    d = discovery(clock)
    await d.register_node(node("host:1:10"))
    clock.t += 9.0
    await d.heartbeat(node("host:1:10"), deleted=[])
    with pytest.raises(NodeConflict, match="another place") as refused:
        await d.register_node(node("host:1:99", url="http://127.0.0.1:2"))
    assert "a copy of its directory" in refused.value.message
    clock.t += 5.0  # the first heard 5 s ago: still refused, on heartbeats too
    with pytest.raises(NodeConflict):
        await d.heartbeat(node("host:1:99", url="http://127.0.0.1:2"), deleted=[])
    (status,) = [n for n in await d.list_nodes() if n.node_id == "n1"]
    assert status.url == "http://127.0.0.1:1"  # the address never flipped to the copy's


async def test_the_same_place_on_another_port_is_the_node_restarted() -> None:
    clock = Clock()
    d = discovery(clock)
    await d.register_node(node("host:1:10"))
    clock.t += 1.0
    await d.register_node(node("host:1:10", url="http://127.0.0.1:7"))
    (status,) = await d.list_nodes()
    assert status.url == "http://127.0.0.1:7"


async def test_a_place_silent_for_node_timeout_gives_way_then_holds_in_turn() -> None:
    clock = Clock()
    d = discovery(clock)
    await d.register_node(node("host:1:10"))
    clock.t += 10.0  # the first is gone (a restore from a backup, a replaced host)
    await d.register_node(node("host:2:20", url="http://127.0.0.1:2"))
    with pytest.raises(NodeConflict):
        await d.heartbeat(node("host:1:10"), deleted=[])


async def test_nodes_that_name_no_place_are_not_compared() -> None:
    clock = Clock()
    d = discovery(clock)
    await d.register_node(node(None))
    await d.register_node(node("host:1:10", url="http://127.0.0.1:2"))
    await d.register_node(node(None, url="http://127.0.0.1:3"))


def at(node_id: str, url: str) -> NodeRegistration:
    return NodeRegistration(node_id=node_id, url=url, capacity_bytes=1 << 20, place=None)


async def test_an_address_another_node_heartbeats_from_is_refused() -> None:
    clock = Clock()
    d = discovery(clock)
    await d.register_node(at("old", "http://127.0.0.1:1"))
    clock.t += 9.0
    await d.heartbeat(at("old", "http://127.0.0.1:1"), deleted=[])
    with pytest.raises(
        NodeConflict, match=re.escape("node old is served at http://127.0.0.1:1, heard 0.0 s ago")
    ):
        await d.register_node(at("new", "http://127.0.0.1:1"))
    clock.t += 5.0
    with pytest.raises(NodeConflict, match="cannot take its address"):
        await d.heartbeat(at("new", "http://127.0.0.1:1"), deleted=[])
    assert {n.node_id: n.url for n in await d.list_nodes()} == {"old": "http://127.0.0.1:1"}


async def test_an_address_silent_for_node_timeout_is_taken_off_its_nodes_record() -> None:
    clock = Clock()
    d = discovery(clock)
    await d.register_node(at("old", "http://127.0.0.1:1"))
    clock.t += 10.0  # its disk was wiped: the node comes back on that port under a new id
    await d.register_node(at("new", "http://127.0.0.1:1"))
    nodes = {n.node_id: (n.url, n.state) for n in await d.list_nodes()}
    assert nodes == {
        "old": ("", NodeState.UNAVAILABLE),
        "new": ("http://127.0.0.1:1", NodeState.AVAILABLE),
    }
    with pytest.raises(NodeConflict):  # the old one, on that address again: the new one's
        await d.heartbeat(at("old", "http://127.0.0.1:1"), deleted=[])
    clock.t += 1.0  # from an address of its own it is back
    await d.heartbeat(at("old", "http://127.0.0.1:2"), deleted=[])
    nodes = {n.node_id: (n.url, n.state) for n in await d.list_nodes()}
    assert nodes["old"] == ("http://127.0.0.1:2", NodeState.AVAILABLE)


async def test_a_node_heard_at_another_address_frees_the_one_it_had() -> None:
    clock = Clock()
    d = discovery(clock)
    await d.register_node(at("a", "http://127.0.0.1:1"))
    clock.t += 1.0
    await d.register_node(at("a", "http://127.0.0.1:2"))  # restarted on another port
    await d.register_node(at("b", "http://127.0.0.1:1"))  # which took a's old one
    nodes = {n.node_id: n.url for n in await d.list_nodes()}
    assert nodes == {"a": "http://127.0.0.1:2", "b": "http://127.0.0.1:1"}


async def test_a_node_back_at_another_address_leaves_the_one_another_took_since() -> None:
    clock = Clock()
    d = discovery(clock)
    await d.register_node(at("a", "http://127.0.0.1:1"))
    clock.t += 11.0  # past node_timeout: a is silent; b takes its address
    await d.register_node(at("b", "http://127.0.0.1:1"))
    clock.t += 1.0
    await d.register_node(at("a", "http://127.0.0.1:2"))  # a is back elsewhere
    with pytest.raises(NodeConflict):  # b still answers at :1
        await d.register_node(at("c", "http://127.0.0.1:1"))
    nodes = {n.node_id: n.url for n in await d.list_nodes()}
    assert nodes == {"a": "http://127.0.0.1:2", "b": "http://127.0.0.1:1"}


async def test_a_restarted_discovery_refuses_no_address_it_has_not_heard() -> None:
    # The embedded cluster restarted: each node may bind a port another had before.
    clock = Clock()
    d = discovery(clock)
    await d.register_node(at("a", "http://127.0.0.1:1"))
    await d.register_node(at("b", "http://127.0.0.1:2"))
    clock.t += 3.0
    again = Discovery(
        store=d._store, blocking=InlineRunner(), clock=clock, ids=RandomIds(), config=d.config
    )
    await again.register_node(at("a", "http://127.0.0.1:2"))
    await again.register_node(at("b", "http://127.0.0.1:3"))
    nodes = {n.node_id: (n.url, n.state) for n in await again.list_nodes()}
    assert nodes == {
        "a": ("http://127.0.0.1:2", NodeState.AVAILABLE),
        "b": ("http://127.0.0.1:3", NodeState.AVAILABLE),
    }


def test_the_conflict_crosses_the_wire_as_409() -> None:
    assert STATUS_BY_CODE["node_conflict"] == 409
    assert isinstance(error_from_code("node_conflict", "m"), NodeConflict)


def test_a_copy_of_a_node_directory_is_another_place(tmp_path: Path) -> None:
    original = tmp_path / "node0"
    original.mkdir()
    (original / "node_id").write_text("node-abc\n")
    copy = tmp_path / "node0dup"
    shutil.copytree(original, copy)
    assert node_place(original) == node_place(original)
    assert node_place(copy) != node_place(original)
