"""Discovery tells the log when a node goes silent (unavailable) and when it is back: with
only reads going on, nothing else would ever mention a dead node."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import trio
import trio.testing

from karma8.actors.discovery import Discovery, DiscoveryConfig
from karma8.core.layout import StripeLayout
from karma8.core.model import MISSING_ON_ITS_NODE, NodeRegistration, NodeState, PartReceipt
from karma8.metadata.sqlite import SqliteMetadataStore
from karma8.sim.world import InlineRunner, SimClock, SimIds


def new_discovery(store: SqliteMetadataStore, config: DiscoveryConfig) -> Discovery:
    """A discovery on ``store`` whose calls run inline, on the simulator's clock."""
    return Discovery(
        store=store,
        blocking=InlineRunner(),
        clock=SimClock(),
        ids=SimIds(random.Random(1)),
        config=config,
    )


async def test_a_silent_node_and_its_return_are_each_one_warning(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = SqliteMetadataStore(tmp_path / "d.sqlite3")
    discovery = new_discovery(store, DiscoveryConfig(node_timeout=5.0))
    nodes = [
        NodeRegistration(node_id=f"n{i}", url=f"http://n{i}", capacity_bytes=9) for i in (0, 1)
    ]
    try:
        caplog.set_level(logging.WARNING, logger="karma8")
        for node in nodes:
            await discovery.heartbeat(node, deleted=[])
        await trio.sleep(3.0)
        await discovery.heartbeat(nodes[1], deleted=[])  # n1 goes on beating
        await trio.sleep(3.0)
        await discovery.sweep()
        await discovery.sweep()  # (marked once: a second sweep says nothing more)
        states = {n.node_id: n.state for n in await discovery.list_nodes()}
        assert states == {"n0": NodeState.UNAVAILABLE, "n1": NodeState.AVAILABLE}
        messages = [r.getMessage() for r in caplog.records]
        assert messages == [
            "node n0 is unavailable: no heartbeat for over 5 s (no new parts"
            " go there; its files' reads go around it or fail until it is back)"
        ]
        caplog.clear()
        await discovery.heartbeat(nodes[0], deleted=[])
        await discovery.heartbeat(nodes[0], deleted=[])
        assert [r.getMessage() for r in caplog.records] == ["node n0 is back: it heartbeats again"]
    finally:
        store.close()


async def test_a_silent_node_that_registers_again_is_back_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A restarted node registers (its first heartbeat comes after): that is its return."""
    store = SqliteMetadataStore(tmp_path / "d.sqlite3")
    discovery = new_discovery(store, DiscoveryConfig(node_timeout=5.0))
    node = NodeRegistration(node_id="n0", url="http://n0", capacity_bytes=9)
    try:
        caplog.set_level(logging.WARNING, logger="karma8")
        await discovery.register_node(node)  # new: nothing to say
        await trio.sleep(6.0)
        await discovery.sweep()
        assert [n.state for n in await discovery.list_nodes()] == [NodeState.UNAVAILABLE]
        caplog.clear()
        await discovery.register_node(node)
        await discovery.heartbeat(node, deleted=[])
        await discovery.register_node(node)
        assert [r.getMessage() for r in caplog.records] == ["node n0 is back: it registers again"]
        assert [n.state for n in await discovery.list_nodes()] == [NodeState.AVAILABLE]
    finally:
        store.close()


async def test_lost_parts_are_counted_in_words_that_agree(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """'lost 1 part', 'lost 2 parts' (not 'lost 1 parts')."""
    store = SqliteMetadataStore(tmp_path / "d.sqlite3")
    discovery = new_discovery(store, DiscoveryConfig())
    layout = StripeLayout(parts=2, unit=4)
    store.create_namespace("default", 0.0)
    for node in ("n0", "n1"):
        store.upsert_node(
            NodeRegistration(node_id=node, url=f"http://{node}", capacity_bytes=99), 0.0
        )
    for vid in ("a", "b"):
        store.commit_placed(
            version_id=vid,
            namespace="default",
            name=vid,
            layout=layout,
            nodes=["n0", "n1"],
            size=8,
            receipts=[PartReceipt(index=i, size=4, checksum=f"{vid}{i}") for i in (0, 1)],
            created_at=1.0,
            now=1.0,
            if_absent=False,
        )
    try:
        caplog.set_level(logging.WARNING, logger="karma8")
        await discovery.report_lost_parts(node_id="n0", keys=["a.0"], reason="rotten")
        await discovery.report_lost_parts(
            node_id="n1", keys=["a.1", "b.1"], reason=MISSING_ON_ITS_NODE
        )
        await discovery.unknown_parts(node_id="n1", keys=["a.1"])
        assert [r.getMessage() for r in caplog.records] == [
            "node n0 lost 1 part: rotten",
            f"node n1 lost 2 parts: {MISSING_ON_ITS_NODE}",
            "node n1 holds 1 part it reported missing: no longer marked lost",
        ]
    finally:
        store.close()
