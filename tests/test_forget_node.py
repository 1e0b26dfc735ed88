"""``karma8 nodes forget``: an unavailable node the operator declares gone for good (its disk
died). Its parts are lost at once (those of redundant files due for repair without waiting for
``repair_after``), it counts in no total, and its id is refused from then on. On both
databases, in discovery, and at the command line."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import trio
from test_cli import _report
from test_metadata_repairs import NODES, PARITY, RAID0, commit, repair

from karma8.actors.discovery import Discovery, DiscoveryConfig
from karma8.cli import _user_error, main
from karma8.core.errors import NodeForgotten, NodeNotGone, NotFound, error_from_code
from karma8.core.layout import StripeLayout
from karma8.core.model import (
    ClusterTotals,
    FileVersion,
    NodeRef,
    NodeRegistration,
    NodeState,
    NodeStatus,
    PartPlacement,
    RepairStatus,
    VersionState,
)
from karma8.core.status import ClusterStatus
from karma8.metadata.sqlite import SqliteMetadataStore
from karma8.metadata.store import SqlMetadataStore
from karma8.net import admin
from karma8.net.codec import STATUS_BY_CODE
from karma8.net.serving import RandomIds
from karma8.net.status_page import render_status
from karma8.sim.world import InlineRunner

from drivers import eventually, net_config, net_driver


def _node(node_id: str, at: float, url: str | None = None) -> NodeRegistration:
    return NodeRegistration(node_id=node_id, url=url or f"http://{node_id}", capacity_bytes=1000)


@pytest.fixture
def store(new_store: SqlMetadataStore) -> SqlMetadataStore:
    """Nine nodes; "p" (parity 5+1) on n0..n5, "r" (raid0) on n0..n4; n0 silent since 0.0
    (unavailable), the others heard at 3.0."""
    s = new_store
    s.create_namespace("default", 0.0)
    for node in NODES:
        s.upsert_node(_node(node, 0.0), 0.0)
    commit(s, "p", PARITY, NODES[:6])
    commit(s, "r", RAID0, NODES[:5])
    s.mark_stale_nodes(seen_before=1.0)
    for node in NODES[1:]:
        s.upsert_node(_node(node, 3.0), 3.0)
    return s


def _state(store: SqlMetadataStore, node_id: str) -> NodeStatus:
    (node,) = [n for n in store.list_nodes() if n.node_id == node_id]
    return node


def test_a_forgotten_nodes_parts_are_due_at_once(store: SqlMetadataStore) -> None:
    # Unavailable since 0.0, repair_after not over (lost_before -1): nothing due yet.
    assert store.repair_counts(lost_before=-1.0)["due_parts"] == 0
    node = store.forget_node("n0", 5.0, heard_before=4.0)
    assert (node.state, node.forgotten_at) == (NodeState.FORGOTTEN, 5.0)
    counts = store.repair_counts(lost_before=-1.0)
    # p.0 is due now; r.0 (raid0) is lost, not rebuildable.
    assert (counts["degraded_files"], counts["lost_parts"], counts["due_parts"]) == (2, 1, 1)
    assert repair(store, lost_before=-1.0) == ["p.0:n0->n6"]
    for name in ("p", "r"):
        version = store.current_version("default", name)
        assert version is not None
        (part,) = [p for p in version.parts if p.node.node_id == "n0"]
        assert part.reported_lost == "its node was forgotten by the operator"


def test_a_node_heard_lately_is_not_forgotten_and_an_unknown_one_is_not_found(
    store: SqlMetadataStore,
) -> None:
    with pytest.raises(NodeNotGone, match=r"n1 is available, heard 2\.0 s ago"):
        store.forget_node("n1", 5.0, heard_before=2.0)
    store.mark_node_suspect("n2", 4.0)
    with pytest.raises(NodeNotGone, match="n2 is suspect"):
        store.forget_node("n2", 5.0, heard_before=2.0)
    assert _state(store, "n1").state is NodeState.AVAILABLE
    assert store.repair_counts(lost_before=-1.0)["lost_parts"] == 1  # n0's part of p only
    # Silent for node_timeout but not swept yet: it may go.
    assert store.forget_node("n1", 5.0, heard_before=3.5).state is NodeState.FORGOTTEN
    with pytest.raises(NotFound, match="no storage node 'nope'"):
        store.forget_node("nope", 5.0, heard_before=2.0)


def test_forgetting_is_idempotent_and_for_good(store: SqlMetadataStore) -> None:
    first = store.forget_node("n0", 5.0, heard_before=4.0)
    assert store.forget_node("n0", 9.0, heard_before=8.0) == first  # as it was
    with pytest.raises(NodeForgotten, match="wipe its directory"):
        store.upsert_node(_node("n0", 6.0), 6.0)
    # Nothing else brings it back or changes it: the sweep, a failure, a newcomer's address.
    assert store.mark_stale_nodes(seen_before=100.0) == NODES[1:]
    assert not store.mark_node_suspect("n0", 7.0)
    store.upsert_node(_node("new", 8.0, url="http://n0"), 8.0)
    after = _state(store, "n0")
    assert (after.state, after.forgotten_at) == (NodeState.FORGOTTEN, 5.0)


def test_views_count_a_forgotten_node_apart() -> None:
    up = NodeStatus(
        node_id="a",
        url="http://a",
        state=NodeState.AVAILABLE,
        capacity_bytes=500,
        used_bytes=100,
        reserved_bytes=0,
        parts=3,
        last_seen=0.0,
    )
    gone = attrs.evolve(
        up, node_id="b", state=NodeState.FORGOTTEN, used_bytes=400, parts=2, forgotten_at=1.0
    )
    table = admin.nodes_table([up, gone])
    assert "\nb " not in table  # not in the table of nodes
    assert table.endswith(
        "1 forgotten (gone for good, in no total; parts left on them: lost,"
        " or rebuilt elsewhere): b (2 parts)"
    )
    assert " of 500 B (5 parts" in table  # its capacity is in no total
    status = ClusterStatus(
        time=2.0,
        nodes=(up, gone),
        namespaces=(),
        totals=ClusterTotals(files=0, bytes=0, pending_uploads=0),
        rebalance=_report(),
        repair=RepairStatus(
            degraded_files=0,
            lost_parts=0,
            due_parts=0,
            repairing_parts=0,
            repaired_parts=0,
            repaired_bytes=0,
        ),
        recent_errors=(),
    )
    assert (status.capacity_bytes, status.used_bytes) == (500, 100)
    assert status.nodes_summary() == "1 nodes (1 available), 1 forgotten"
    assert "1 nodes (1 available), 1 forgotten" in render_status(status)
    # A raid0 file with a part there is lost, not waiting for a node to come back.
    layout = StripeLayout(parts=2, unit=4)
    version = FileVersion(
        version_id="v",
        namespace="default",
        name="f",
        state=VersionState.COMMITTED,
        size=8,
        layout=layout,
        parts=tuple(
            PartPlacement(index=i, key=f"v.{i}", node=NodeRef(node_id=n, url=""), size=4)
            for i, n in enumerate(("a", "b"))
        ),
        created_at=0.0,
    )
    states = {"a": NodeState.AVAILABLE, "b": NodeState.UNAVAILABLE}
    assert admin.redundancy(version, states) == "unreadable until a node is back"
    states["b"] = NodeState.FORGOTTEN
    assert admin.redundancy(version, states).startswith("lost: a part was on a node the operator")


# -- discovery -------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t


async def test_discovery_forgets_a_silent_node_only_and_refuses_it_for_good() -> None:
    clock = Clock()
    d = Discovery(
        store=SqliteMetadataStore(":memory:"),
        blocking=InlineRunner(),
        clock=clock,
        ids=RandomIds(),
        config=DiscoveryConfig(layout=StripeLayout(parts=5, unit=4096), node_timeout=10.0),
    )
    await d.create_namespace(namespace="default")
    for i in range(6):
        await d.register_node(_node(f"n{i}", clock.t, url=f"http://127.0.0.1:{i + 1}"))
    with pytest.raises(NodeNotGone, match="only an unavailable node can be forgotten"):
        await d.forget_node(node_id="n0")
    with pytest.raises(NotFound):
        await d.forget_node(node_id="n9")
    clock.t += 11.0  # n0 silent past node_timeout; the others heartbeat
    for i in range(1, 6):
        await d.heartbeat(_node(f"n{i}", clock.t, url=f"http://127.0.0.1:{i + 1}"), deleted=[])
    await d.sweep()
    assert (await d.forget_node(node_id="n0")).state is NodeState.FORGOTTEN
    clock.t += 1.0
    again = await d.forget_node(node_id="n0")  # idempotent: as it was
    assert (again.state, again.forgotten_at) == (NodeState.FORGOTTEN, clock.t - 1.0)
    with pytest.raises(NodeForgotten, match="n0 was forgotten by the operator") as refused:
        await d.register_node(_node("n0", clock.t, url="http://127.0.0.1:1"))
    with pytest.raises(NodeForgotten):
        await d.heartbeat(_node("n0", clock.t, url="http://127.0.0.1:1"), deleted=[])
    assert STATUS_BY_CODE[refused.value.code] == 409
    assert isinstance(error_from_code("node_forgotten", "m"), NodeForgotten)
    assert STATUS_BY_CODE["node_not_gone"] == 409
    # Its address is free at once: a new node on the old one's port is no conflict.
    await d.register_node(_node("fresh", clock.t, url="http://127.0.0.1:1"))
    version = await d.begin_upload(namespace="default", name="f", size_hint=10)
    assert "n0" not in {p.node.node_id for p in version.parts}
    states = {n.node_id: n.state for n in await d.list_nodes()}
    assert states["n0"] is NodeState.FORGOTTEN


# -- the command line ------------------------------------------------------------------------


async def test_nodes_forget_at_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = attrs.evolve(net_config(), node_timeout=3.0)
    async with net_driver(tmp_path / "cluster", config=config) as net:
        at = ["--discovery", net._discovery_url, "--secret", config.secret or ""]

        async def cli(*args: str) -> int:
            status: int = await trio.to_thread.run_sync(main, [*args, *at])
            return status

        await net.create_namespace("safe", engine="parity", parity=1)
        net.namespace = "safe"
        joined = await net.add_node()  # a 7th node: a file of 6 parts may skip it

        async def on_joined(name: str) -> bool:
            return joined in {p.node.node_id for p in (await net.stat(name)).parts}

        names: list[str] = []
        while not names or not await on_joined(names[-1]):
            assert len(names) < 20, "no file placed a part on the new node"
            names.append(f"f{len(names)}")
            await net.put(names[-1], b"x" * 300_000)
        assert await cli("nodes", "forget", "nope") == 1
        assert "no storage node 'nope'" in capsys.readouterr().err
        assert await cli("nodes", "forget", joined) == 1
        err = capsys.readouterr().err
        assert f"karma8 nodes: node {joined} is available, heard" in err
        assert "only an unavailable node can be forgotten" in err
        await net.kill_node(joined)

        async def forgotten() -> bool:
            return await cli("nodes", "forget", joined, "--json") == 0

        await eventually(forgotten, what="the killed node forgotten")
        node = json.loads(capsys.readouterr().out)  # refusals went to stderr
        assert (node["node_id"], node["state"]) == (joined, "forgotten")
        assert await cli("nodes", "forget", joined) == 0  # again: the same answer
        assert f"node {joined} is forgotten: the parts still on it" in capsys.readouterr().out

        async def rebuilt() -> bool:
            return not await on_joined(names[-1])

        await eventually(rebuilt, what="its parts rebuilt elsewhere")
        for name in names:
            assert await net.get(name) == b"x" * 300_000
        assert await cli("nodes") == 0
        assert "1 forgotten (gone for good" in capsys.readouterr().out
        # Started again on its directory: refused, and it says what to do.
        with pytest.raises(BaseException) as refused:  # noqa: PT011 (inside trio's groups)
            await net.add_node(again=joined)
        error = _user_error(refused.value)
        assert isinstance(error, NodeForgotten)
        assert "wipe its directory" in error.message
