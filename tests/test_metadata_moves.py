"""Part moves in the metadata store (SQLite, PostgreSQL): each step, its conflicts, and what a
crash leaves."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlitesteps import sqlite_steps

from karma8.core.errors import IntegrityError, MoveConflict
from karma8.core.layout import StripeLayout
from karma8.core.model import NodeRegistration, NodeState, PartReceipt, VersionState
from karma8.metadata.schema import SCHEMA
from karma8.metadata.sqlite import SqliteMetadataStore
from karma8.metadata.store import SqlMetadataStore

from test_metadata import begin, receipts

LEASE = 50.0


@pytest.fixture
def store(new_store: SqlMetadataStore) -> SqlMetadataStore:
    """Six nodes of 1000 bytes; file "f" (v1, 50 bytes) committed on n0..n4; n5 empty."""
    s = new_store
    s.create_namespace("default", 0.0)
    for i in range(6):
        s.upsert_node(
            NodeRegistration(node_id=f"n{i}", url=f"http://n{i}", capacity_bytes=1000), 0.0
        )
    begin(s, "v1", size=50)
    s.commit_version(version_id="v1", size=50, receipts=receipts(50), now=2.0, if_absent=False)
    return s


def nodes(store: SqlMetadataStore) -> dict[str, tuple[int, int, int]]:
    """node id -> (used, reserved, parts)."""
    return {n.node_id: (n.used_bytes, n.reserved_bytes, n.parts) for n in store.list_nodes()}


def live(store: SqlMetadataStore) -> dict[str, int]:
    return {f.node_id: f.live for f in store.rebalance_fills()}


def test_a_move_copies_switches_and_leaves_the_old_copy_for_readers(
    store: SqlMetadataStore,
) -> None:
    ticket = store.begin_move(key="v1.0", source="n0", target="n5", now=3.0, lease_until=53.0)
    assert ticket.size == 10
    assert ticket.checksum == "c0"
    assert ticket.source.url == "http://n0"
    assert ticket.target.url == "http://n5"
    assert nodes(store)["n5"] == (0, 10, 0)  # reserved while it copies
    assert live(store)["n5"] == 10  # planning counts it as done
    assert "v1.0" in store.part_keys_on_node("n5")  # never an orphan on the target
    store.finish_move(key="v1.0", target="n5", checksum="c0", now=4.0)
    version = store.current_version("default", "f")
    assert version is not None
    assert version.parts[0].node.node_id == "n5"
    assert nodes(store)["n5"] == (10, 0, 1)
    assert nodes(store)["n0"] == (10, 0, 0)  # the old copy is still on its disk
    assert live(store)["n0"] == 0
    assert "v1.0" in store.part_keys_on_node("n0")
    # Deleted like garbage once readers are done, then forgotten with its bytes.
    assert store.garbage_for_node("n0", retired_before=3.9, limit=10) == []
    assert store.garbage_for_node("n0", retired_before=4.0, limit=10) == ["v1.0"]
    assert store.garbage_for_node("n5", retired_before=100.0, limit=10) == []
    assert store.forget_parts("n0", ["v1.0"]) == 1
    assert nodes(store)["n0"] == (0, 0, 0)
    assert "v1.0" not in store.part_keys_on_node("n0")
    counts = store.move_counts()
    assert counts["moved_bytes"] == 10
    assert counts["moved_parts"] == 1
    assert counts["stale_copies"] == 0
    assert counts["moving_parts"] == 0


def test_begin_refuses_what_would_break_a_rule(store: SqlMetadataStore) -> None:
    with pytest.raises(MoveConflict, match="not a committed part"):
        store.begin_move(key="v1.0", source="n1", target="n5", now=3.0, lease_until=LEASE)
    with pytest.raises(MoveConflict, match="holds a part"):
        store.begin_move(key="v1.0", source="n0", target="n1", now=3.0, lease_until=LEASE)
    with pytest.raises(MoveConflict, match="already"):
        store.begin_move(key="v1.0", source="n0", target="n0", now=3.0, lease_until=LEASE)
    store.mark_node_suspect("n5", 3.0)
    with pytest.raises(MoveConflict, match="not available"):
        store.begin_move(key="v1.0", source="n0", target="n5", now=3.0, lease_until=LEASE)
    store.upsert_node(NodeRegistration(node_id="n5", url="http://n5", capacity_bytes=5), 9.0)
    with pytest.raises(MoveConflict, match="no room"):
        store.begin_move(key="v1.0", source="n0", target="n5", now=9.0, lease_until=LEASE)
    store.upsert_node(NodeRegistration(node_id="n5", url="http://n5", capacity_bytes=900), 9.0)
    store.begin_move(key="v1.0", source="n0", target="n5", now=9.0, lease_until=LEASE)
    with pytest.raises(MoveConflict, match="moving already"):
        store.begin_move(key="v1.0", source="n0", target="n5", now=9.0, lease_until=LEASE)
    begin(store, "v2", name="g", size=50)  # pending parts never move
    with pytest.raises(MoveConflict, match="not a committed part"):
        store.begin_move(key="v2.0", source="n0", target="n5", now=9.0, lease_until=LEASE)


def test_a_wrong_copy_is_refused_and_becomes_garbage(store: SqlMetadataStore) -> None:
    store.begin_move(key="v1.0", source="n0", target="n5", now=3.0, lease_until=LEASE)
    with pytest.raises(IntegrityError):
        store.finish_move(key="v1.0", target="n5", checksum="bad", now=4.0)
    version = store.current_version("default", "f")
    assert version is not None
    assert version.parts[0].node.node_id == "n0"  # readers never see the wrong copy
    assert nodes(store)["n5"] == (0, 0, 0)
    assert store.garbage_for_node("n5", retired_before=4.0, limit=10) == ["v1.0"]
    # While that copy waits for deletion, the part may not go back to that node.
    with pytest.raises(MoveConflict, match=r"copy of v1\.0"):
        store.begin_move(key="v1.0", source="n0", target="n5", now=5.0, lease_until=LEASE)
    store.forget_parts("n5", ["v1.0"])
    store.begin_move(key="v1.0", source="n0", target="n5", now=5.0, lease_until=LEASE)


def test_a_version_retired_while_its_part_moves_is_not_switched(
    store: SqlMetadataStore,
) -> None:
    store.begin_move(key="v1.0", source="n0", target="n5", now=3.0, lease_until=LEASE)
    assert store.retire_current("default", "f", 3.5)
    with pytest.raises(MoveConflict, match="changed"):
        store.finish_move(key="v1.0", target="n5", checksum="c0", now=4.0)
    # Both copies go: the part's own as garbage of its version, the target's as a stale copy.
    assert store.garbage_for_node("n0", retired_before=10.0, limit=10) == ["v1.0"]
    assert store.garbage_for_node("n5", retired_before=10.0, limit=10) == ["v1.0"]
    assert all(n == 0 for n in live(store).values())


def test_a_lease_that_runs_out_aborts_the_move(store: SqlMetadataStore) -> None:
    """A rebalancer that died mid-copy: discovery's sweeper ends its move."""
    store.begin_move(key="v1.0", source="n0", target="n5", now=3.0, lease_until=10.0)
    assert store.expire_moves(9.9) == 0
    assert store.expire_moves(10.0) == 1
    assert nodes(store)["n5"] == (0, 0, 0)
    with pytest.raises(MoveConflict, match="no move"):
        store.finish_move(key="v1.0", target="n5", checksum="c0", now=10.5)
    version = store.current_version("default", "f")
    assert version is not None
    assert version.parts[0].node.node_id == "n0"
    assert store.move_counts()["stale_copies"] == 1


def test_a_finish_after_the_lease_is_refused(store: SqlMetadataStore) -> None:
    store.begin_move(key="v1.0", source="n0", target="n5", now=3.0, lease_until=10.0)
    with pytest.raises(MoveConflict, match="lease"):
        store.finish_move(key="v1.0", target="n5", checksum="c0", now=10.0)
    assert store.move_counts()["moving_parts"] == 0


def test_movable_parts_name_the_nodes_they_may_not_go_to(store: SqlMetadataStore) -> None:
    parts = store.movable_parts("n0", limit=10, receivers=["n5"])
    assert [p.key for p in parts] == ["v1.0"]
    assert parts[0].blocked == frozenset({"n0", "n1", "n2", "n3", "n4"})
    assert store.movable_parts("n0", limit=10, receivers=["n1"]) == []  # n1 holds v1.1
    assert store.movable_parts("n0", limit=10, receivers=[]) == []
    store.begin_move(key="v1.0", source="n0", target="n5", now=3.0, lease_until=LEASE)
    assert store.movable_parts("n0", limit=10, receivers=["n5"]) == []  # moving already


def test_movable_parts_of_many_versions_each_name_their_own_blocked_nodes(
    store: SqlMetadataStore,
) -> None:
    """One plan asks for hundreds of parts at once: each keeps its own version's nodes and
    its own stale copies, never another's."""
    for i in range(2, 8):
        begin(store, f"v{i}", name=f"g{i}", size=50)
        store.commit_version(
            version_id=f"v{i}", size=50, receipts=receipts(50), now=2.0, if_absent=False
        )
    store.begin_move(key="v3.0", source="n0", target="n5", now=3.0, lease_until=10.0)
    assert store.expire_moves(10.0) == 1  # v3.0's copy on n5 is stale now
    parts = {p.key: p for p in store.movable_parts("n0", limit=100, receivers=["n5"])}
    assert set(parts) == {f"v{i}.0" for i in range(1, 8)}
    holders = frozenset(f"n{i}" for i in range(5))
    for key, part in parts.items():
        assert part.version_id == key.split(".")[0]
        assert part.blocked == (holders | {"n5"} if key == "v3.0" else holders), key
    assert len(store.movable_parts("n0", limit=3, receivers=["n5"])) == 3


def test_live_bytes_follow_commits_overwrites_and_deletes(store: SqlMetadataStore) -> None:
    assert live(store) == {"n0": 10, "n1": 10, "n2": 10, "n3": 10, "n4": 10, "n5": 0}
    begin(store, "v2", size=100)
    assert live(store)["n0"] == 10  # pending bytes are not live
    store.commit_version(
        version_id="v2", size=100, receipts=receipts(100), now=3.0, if_absent=False
    )
    assert live(store)["n0"] == 20  # v1 retired, v2 current
    assert store.retire_current("default", "f", 4.0)
    assert set(live(store).values()) == {0}


def test_only_available_nodes_with_capacity_are_planned_over(store: SqlMetadataStore) -> None:
    store.mark_stale_nodes(seen_before=1.0)
    store.upsert_node(NodeRegistration(node_id="n1", url="http://n1", capacity_bytes=0), 5.0)
    store.upsert_node(NodeRegistration(node_id="n2", url="http://n2", capacity_bytes=1000), 5.0)
    states = {n.node_id: n.state for n in store.list_nodes()}
    assert states["n0"] is NodeState.UNAVAILABLE
    assert [f.node_id for f in store.rebalance_fills()] == ["n2"]


def test_an_old_database_gains_live_bytes_from_its_committed_parts(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    store = SqliteMetadataStore(path)
    store.create_namespace("default", 0.0)
    for i in range(5):
        store.upsert_node(
            NodeRegistration(node_id=f"n{i}", url=f"http://n{i}", capacity_bytes=1000), 0.0
        )
    begin(store, "v1", size=50)
    store.commit_version(version_id="v1", size=50, receipts=receipts(50), now=2.0, if_absent=False)
    store.close()
    db = sqlite3.connect(path)  # as a karma8 without moves left it
    db.execute("ALTER TABLE nodes DROP COLUMN live_bytes")
    db.execute("DROP TABLE schema_version")
    db.commit()
    db.close()
    assert "live_bytes" not in SCHEMA.split("CREATE TABLE IF NOT EXISTS versions")[1]
    reopened = SqliteMetadataStore(path)
    assert {f.live for f in reopened.rebalance_fills()} == {10}
    assert [v.state for v in reopened.versions()] == [VersionState.COMMITTED]
    reopened.close()


def test_a_commit_costs_the_same_however_many_parts_the_nodes_hold() -> None:
    """Keeping live bytes must look up the version's parts, never scan a node's (a query
    plan that took the node index made every PUT slower as the nodes filled)."""
    store = SqliteMetadataStore()
    store.create_namespace("default", 0.0)
    for i in range(5):
        store.upsert_node(
            NodeRegistration(node_id=f"n{i}", url=f"http://n{i}", capacity_bytes=10**9), 0.0
        )

    def put(version_id: str) -> int:
        """SQLite VM steps (in hundreds) of one begin + commit."""
        with sqlite_steps(store._db) as steps:
            begin(store, version_id, name=version_id, size=50)
            store.commit_version(
                version_id=version_id, size=50, receipts=receipts(50), now=2.0, if_absent=False
            )
        return steps.count

    early = max(put(f"a{i}") for i in range(5))
    for i in range(2000):
        put(f"b{i}")
    late = max(put(f"c{i}") for i in range(5))
    assert late <= 2 * early + 5, (early, late)


def test_a_part_reported_lost_is_repaired_onto_another_node(new_store: SqlMetadataStore) -> None:
    """Repair's side of the store (on both databases): a report, the counts, a repair move
    chosen and finished like any move."""
    store = new_store
    store.create_namespace("default", 0.0)
    for i in range(7):
        store.upsert_node(
            NodeRegistration(node_id=f"n{i}", url=f"http://n{i}", capacity_bytes=1000), 0.0
        )
    layout = StripeLayout(parts=5, unit=4, parity=1)
    store.begin_version(
        version_id="p1",
        namespace="default",
        name="f",
        layout=layout,
        size_hint=50,
        now=1.0,
        expires_at=100.0,
        if_absent=False,
        place=lambda loads: [n.node_id for n in loads][:6],
    )
    store.commit_version(
        version_id="p1",
        size=50,
        receipts=[
            PartReceipt(index=i, size=s, checksum=f"c{i}")
            for i, s in enumerate(layout.slot_sizes(50))
        ],
        now=2.0,
        if_absent=False,
    )
    assert store.mark_damaged("n0", ["p1.0", "p1.1"], "corrupt", 3.0) == 1  # n0 holds p1.0 only
    counts = store.repair_counts(lost_before=0.0)
    assert (counts["degraded_files"], counts["lost_parts"], counts["due_parts"]) == (1, 1, 1)
    (repair,) = store.begin_repairs(
        lost_before=0.0,
        limit=10,
        now=4.0,
        lease_until=50.0,
        place=lambda loads, part: loads[0].node_id if loads else None,
        held=lambda node_id: 0,
    )
    assert (repair.ticket.key, repair.ticket.target.node_id, repair.slot) == ("p1.0", "n6", 0)
    store.finish_move(key="p1.0", target="n6", checksum="c0", now=5.0)
    counts = store.repair_counts(lost_before=0.0)
    assert (counts["lost_parts"], counts["repaired_parts"]) == (0, 1)
    assert store.expected_parts("n6") == ["p1.0"]
