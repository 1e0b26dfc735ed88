"""One process serves a storage node: the same node id heard from a second place (a copy of
its directory started beside the original) is refused while the first still heartbeats."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from karma8.actors.discovery import Discovery, DiscoveryConfig
from karma8.core.errors import NodeConflict, error_from_code
from karma8.core.layout import StripeLayout
from karma8.core.model import NodeRegistration
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
