"""The metadata store, on SQLite and on PostgreSQL: two-phase versions, counters, garbage."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

import attrs
import pytest
from sqlitesteps import sqlite_steps

from karma8.core.errors import (
    DiskFull,
    IntegrityError,
    NotEnoughNodes,
    NotFound,
    PreconditionFailed,
    UploadConflict,
)
from karma8.core.layout import StripeLayout
from karma8.core.model import NodeRegistration, NodeState, PartReceipt, VersionState
from karma8.core.placement import NodeLoad, place_parts
from karma8.metadata.schema import SCHEMA
from karma8.metadata.sqlite import SqliteMetadataStore
from karma8.metadata.store import SqlMetadataStore

LAYOUT = StripeLayout(parts=5, unit=4)


def first_five(loads: Sequence[NodeLoad]) -> list[str]:
    return [n.node_id for n in loads][:5]


@pytest.fixture
def store(new_store: SqlMetadataStore) -> SqlMetadataStore:
    s = new_store
    s.create_namespace("default", 0.0)
    for i in range(6):
        s.upsert_node(
            NodeRegistration(node_id=f"n{i}", url=f"http://n{i}", capacity_bytes=1000), 0.0
        )
    return s


def begin(
    store: SqlMetadataStore,
    vid: str,
    name: str = "f",
    size: int | None = 10,
    if_absent: bool = False,
) -> None:
    store.begin_version(
        version_id=vid,
        namespace="default",
        name=name,
        layout=LAYOUT,
        size_hint=size,
        now=1.0,
        expires_at=100.0,
        if_absent=if_absent,
        place=first_five,
    )


def receipts(size: int) -> list[PartReceipt]:
    return [
        PartReceipt(index=i, size=s, checksum=f"c{i}")
        for i, s in enumerate(LAYOUT.part_sizes(size))
    ]


def test_begin_is_invisible_until_commit(store: SqlMetadataStore) -> None:
    begin(store, "v1")
    assert store.current_version("default", "f") is None
    assert sum(n.reserved_bytes for n in store.list_nodes()) == 10
    committed = store.commit_version(
        version_id="v1", size=10, receipts=receipts(10), now=2.0, if_absent=False
    )
    assert committed.state is VersionState.COMMITTED
    assert committed.etag is not None
    current = store.current_version("default", "f")
    assert current is not None
    assert current.version_id == "v1"
    nodes = store.list_nodes()
    assert sum(n.reserved_bytes for n in nodes) == 0
    assert sum(n.used_bytes for n in nodes) == 10


def test_overwrite_retires_the_previous_version_and_garbage_is_collected(
    store: SqlMetadataStore,
) -> None:
    for vid in ("v1", "v2"):
        begin(store, vid)
        store.commit_version(
            version_id=vid, size=10, receipts=receipts(10), now=2.0, if_absent=False
        )
    assert [v.version_id for v in store.versions(VersionState.RETIRED)] == ["v1"]
    assert store.garbage_for_node("n0", retired_before=1.0, limit=10) == []  # grace
    garbage = store.garbage_for_node("n0", retired_before=5.0, limit=10)
    assert garbage == ["v1.0"]
    assert store.forget_parts("n0", [*garbage, "v2.0"]) == 1  # live parts are never forgotten
    for i in range(1, 5):
        store.forget_parts(f"n{i}", [f"v1.{i}"])
    assert store.versions(VersionState.RETIRED) == []
    assert sum(n.used_bytes for n in store.list_nodes()) == 10


def test_garbage_comes_in_sorted_batches_until_none_is_left(store: SqlMetadataStore) -> None:
    for i in range(12):
        for vid in (f"a{i:02}", f"b{i:02}"):  # b retires a
            begin(store, vid, name=f"f{i}")
            store.commit_version(
                version_id=vid, size=10, receipts=receipts(10), now=2.0, if_absent=False
            )
    seen: list[str] = []
    while batch := store.garbage_for_node("n0", retired_before=5.0, limit=5):
        assert batch == sorted(batch)
        assert len(batch) <= 5
        assert not set(batch) & set(seen)
        seen += batch
        assert store.forget_parts("n0", batch) == len(batch)
    assert sorted(seen) == [f"a{i:02}.0" for i in range(12)]


def _garbage_work(garbage_versions: int) -> int:
    """SQLite's work (in steps of 100 VM instructions) to find a batch of 10 garbage keys on
    a node, with ``garbage_versions`` retired versions (each a part on every node)."""
    store = SqliteMetadataStore()
    store.create_namespace("default", 0.0)
    for i in range(6):
        store.upsert_node(
            NodeRegistration(node_id=f"n{i}", url=f"http://n{i}", capacity_bytes=1 << 40), 0.0
        )
    with store._tx() as db:
        for v in range(garbage_versions):
            db.execute(
                "INSERT INTO versions(version_id, namespace, name, state, size_hint, k, unit,"
                " copies, parity, created_at, expires_at, size, committed_at, etag, retired_at)"
                " VALUES (?, 'default', ?, 'retired', 50, 5, 4, 1, 0, 0, 0, 50, 0, 'e', 1)",
                (f"v{v}", f"f{v}"),
            )
            db.executemany(
                "INSERT INTO parts(version_id, idx, part_key, node_id, reserved, size, checksum)"
                " VALUES (?, ?, ?, ?, 0, 10, 'c')",
                [(f"v{v}", i, f"v{v}.{i}", f"n{(v + i) % 6}") for i in range(5)],
            )
    with sqlite_steps(store._db) as steps:
        assert len(store.garbage_for_node("n0", retired_before=5.0, limit=10)) == 10
    store.close()
    return steps.count


def test_a_batch_of_garbage_costs_a_batch_not_all_the_garbage() -> None:
    """Every node's heartbeat asks for its garbage; after a mass delete of small files there
    are millions of garbage parts, and each ask must not read them all."""
    fewer, more = _garbage_work(300), _garbage_work(3000)
    assert more < 2 * fewer + 10


def test_commit_checks_state_sizes_and_expiry(store: SqlMetadataStore) -> None:
    begin(store, "v1")
    with pytest.raises(IntegrityError):
        store.commit_version(
            version_id="v1", size=11, receipts=receipts(10), now=2.0, if_absent=False
        )
    with pytest.raises(UploadConflict, match="expired"):
        store.commit_version(
            version_id="v1", size=10, receipts=receipts(10), now=200.0, if_absent=False
        )
    aborted = store.abort_version("v1", 3.0)
    assert aborted.state is VersionState.ABORTED
    with pytest.raises(UploadConflict):
        store.commit_version(
            version_id="v1", size=10, receipts=receipts(10), now=2.0, if_absent=False
        )
    assert store.garbage_for_node("n0", retired_before=0.0, limit=10) == ["v1.0"]


def test_a_commit_sent_again_succeeds_and_changes_nothing(store: SqlMetadataStore) -> None:
    """A commit whose answer was lost is sent again (maybe to another discovery instance):
    for the version it committed, with the same receipts, it answers success, once retired
    too; with other receipts, or for a version aborted instead, it is refused."""
    begin(store, "v1")
    first = store.commit_version(
        version_id="v1", size=10, receipts=receipts(10), now=2.0, if_absent=True
    )
    before = store.list_nodes()
    again = store.commit_version(
        version_id="v1", size=10, receipts=receipts(10), now=3.0, if_absent=True
    )
    assert again == first
    assert store.list_nodes() == before  # nothing counted twice
    other = [attrs.evolve(r, checksum="x") for r in receipts(10)]
    with pytest.raises(UploadConflict, match="committed, not pending"):
        store.commit_version(version_id="v1", size=10, receipts=other, now=3.0, if_absent=False)
    with pytest.raises(UploadConflict):
        store.commit_version(
            version_id="v1", size=10, receipts=receipts(10)[:4], now=3.0, if_absent=False
        )
    begin(store, "v2")
    store.commit_version(version_id="v2", size=10, receipts=receipts(10), now=4.0, if_absent=False)
    retired = store.commit_version(
        version_id="v1", size=10, receipts=receipts(10), now=5.0, if_absent=False
    )
    assert retired.state is VersionState.RETIRED
    current = store.current_version("default", "f")
    assert current is not None
    assert current.version_id == "v2"
    begin(store, "v3")
    store.abort_version("v3", 6.0)
    with pytest.raises(UploadConflict, match="aborted, not pending"):
        store.commit_version(
            version_id="v3", size=10, receipts=receipts(10), now=7.0, if_absent=False
        )


def test_a_placed_commit_sent_again_succeeds(store: SqlMetadataStore) -> None:
    """A small upload's commit sent again finds its version committed (the placement lease is
    gone with the first commit, or held by another instance): success, nothing counted twice."""
    placed = store.commit_placed(
        version_id="p1",
        namespace="default",
        name="small",
        layout=LAYOUT,
        nodes=["n0", "n1", "n2", "n3", "n4"],
        size=10,
        receipts=receipts(10),
        created_at=1.0,
        now=2.0,
        if_absent=False,
    )
    before = store.list_nodes()
    again = store.commit_version(
        version_id="p1", size=10, receipts=receipts(10), now=3.0, if_absent=False
    )
    assert again == placed
    assert store.list_nodes() == before


def test_abort_after_commit_reports_committed(store: SqlMetadataStore) -> None:
    begin(store, "v1")
    store.commit_version(version_id="v1", size=10, receipts=receipts(10), now=2.0, if_absent=False)
    assert store.abort_version("v1", 3.0).state is VersionState.COMMITTED


def test_if_absent(store: SqlMetadataStore) -> None:
    begin(store, "v1", if_absent=True)
    begin(store, "v2", if_absent=True)
    store.commit_version(version_id="v1", size=10, receipts=receipts(10), now=2.0, if_absent=True)
    with pytest.raises(PreconditionFailed):
        store.commit_version(
            version_id="v2", size=10, receipts=receipts(10), now=2.0, if_absent=True
        )
    with pytest.raises(PreconditionFailed):
        begin(store, "v3", if_absent=True)


def test_expiry_aborts_pending_versions(store: SqlMetadataStore) -> None:
    begin(store, "v1")
    assert store.expire_pending(50.0) == 0
    assert store.expire_pending(100.0) == 1
    assert store.versions(VersionState.ABORTED)[0].version_id == "v1"
    assert sum(n.reserved_bytes for n in store.list_nodes()) == 0


def test_listing_and_unknown_namespace(store: SqlMetadataStore) -> None:
    for i, name in enumerate(["a/1", "a/2", "b/1"]):
        begin(store, f"v{i}", name=name)
        store.commit_version(
            version_id=f"v{i}", size=10, receipts=receipts(10), now=2.0, if_absent=False
        )
    assert [e.name for e in store.list_files("default", prefix="a/", after="", limit=10)] == [
        "a/1",
        "a/2",
    ]
    assert [e.name for e in store.list_files("default", prefix="", after="a/1", limit=1)] == ["a/2"]
    with pytest.raises(NotFound):
        store.list_files("nope", prefix="", after="", limit=10)
    with pytest.raises(NotFound):
        store.begin_version(
            version_id="vx",
            namespace="nope",
            name="f",
            layout=LAYOUT,
            size_hint=1,
            now=1.0,
            expires_at=2.0,
            if_absent=False,
            place=first_five,
        )


def test_stale_nodes_become_unavailable(store: SqlMetadataStore) -> None:
    store.upsert_node(NodeRegistration(node_id="n0", url="http://n0", capacity_bytes=1000), 10.0)
    assert store.mark_stale_nodes(5.0) == ["n1", "n2", "n3", "n4", "n5"]
    states = {n.node_id: n.state.value for n in store.list_nodes()}
    assert states["n0"] == "available"
    assert states["n1"] == "unavailable"


def test_a_node_at_another_nodes_address_takes_it_off_that_nodes_record(
    store: SqlMetadataStore,
) -> None:
    # n0's disk was wiped; its directory restarted on the same port under a new id, n9.
    begin(store, "v1")
    store.commit_version(version_id="v1", size=10, receipts=receipts(10), now=2.0, if_absent=False)
    newcomer = NodeRegistration(node_id="n9", url="http://n0", capacity_bytes=1000)
    arrival = store.upsert_node(newcomer, 20.0)
    assert (arrival.was, arrival.displaced) == (None, ("n0",))
    nodes = {n.node_id: n for n in store.list_nodes()}
    assert (nodes["n0"].url, nodes["n0"].state) == ("", NodeState.UNAVAILABLE)
    assert nodes["n9"].url == "http://n0"
    current = store.current_version("default", "f")
    assert current is not None
    # No reader is sent to n9 for n0's part: it has no address.
    assert {p.node.node_id: p.node.url for p in current.parts}["n0"] == ""
    assert store.upsert_node(newcomer, 21.0).displaced == ()  # its heartbeats take nothing
    # n0 comes back, from an address of its own: its parts are read there again.
    back = store.upsert_node(
        NodeRegistration(node_id="n0", url="http://n0-again", capacity_bytes=1000), 30.0
    )
    assert (back.was, back.displaced) == (NodeState.UNAVAILABLE, ())
    current = store.current_version("default", "f")
    assert current is not None
    assert {p.node.node_id: p.node.url for p in current.parts}["n0"] == "http://n0-again"
    assert states(store)["n0"] == "available"


def test_file_database_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "meta.sqlite3"
    s = SqliteMetadataStore(path)
    s.create_namespace("default", 0.0)
    s.close()
    assert SqliteMetadataStore(path).namespace_exists("default")


def beat(store: SqlMetadataStore, node_id: str, now: float, suspect_for: float = 4.0) -> None:
    registration = NodeRegistration(node_id=node_id, url=f"http://{node_id}", capacity_bytes=1000)
    store.upsert_node(registration, now, suspect_for=suspect_for)


def states(store: SqlMetadataStore) -> dict[str, str]:
    return {n.node_id: n.state.value for n in store.list_nodes()}


def test_a_reported_node_is_suspect_until_a_heartbeat_suspect_for_after_the_report(
    store: SqlMetadataStore,
) -> None:
    assert store.mark_node_suspect("n2", 10.0)
    assert not store.mark_node_suspect("nobody", 10.0)
    assert states(store)["n2"] == "suspect"
    assert next(n for n in store.list_nodes() if n.node_id == "n2").failed_at == 10.0
    beat(store, "n2", 13.9)  # too soon: a heartbeat may have been sent before the failure
    assert states(store)["n2"] == "suspect"
    store.mark_node_suspect("n2", 9.0)  # a report that arrives late does not move it back
    beat(store, "n2", 14.0)
    assert states(store)["n2"] == "available"
    # Placement skips a suspect node.
    store.mark_node_suspect("n0", 20.0)
    seen: list[NodeLoad] = []

    def spy(loads: Sequence[NodeLoad]) -> list[str]:
        seen.extend(loads)
        return [n.node_id for n in loads if n.available][:5]

    store.begin_version(
        version_id="v",
        namespace="default",
        name="f",
        layout=LAYOUT,
        size_hint=10,
        now=20.0,
        expires_at=100.0,
        if_absent=False,
        place=spy,
    )
    assert [n.node_id for n in seen if not n.available] == ["n0"]


def test_a_silent_suspect_node_becomes_unavailable_and_a_report_keeps_it_so(
    store: SqlMetadataStore,
) -> None:
    store.mark_node_suspect("n1", 1.0)
    beat(store, "n0", 10.0)
    assert store.mark_stale_nodes(5.0) == ["n1", "n2", "n3", "n4", "n5"]
    assert states(store)["n1"] == "unavailable"
    store.mark_node_suspect("n2", 10.0)
    assert states(store)["n2"] == "unavailable"
    beat(store, "n2", 12.0)  # back, but the report is recent
    assert states(store)["n2"] == "suspect"
    beat(store, "n1", 12.0)  # back long after its report
    assert states(store)["n1"] == "available"


def test_replace_part_moves_the_part_and_its_reservation(store: SqlMetadataStore) -> None:
    begin(store, "v1", size=100)  # parts of 20 bytes on n0..n4
    sizes: list[int] = []

    def emptiest(loads: Sequence[NodeLoad], part_size: int) -> list[str]:
        sizes.append(part_size)
        return [n.node_id for n in loads if n.available][:1]

    placement = store.replace_part(version_id="v1", index=2, failed_node_id="n2", place=emptiest)
    assert (placement.index, placement.key, placement.node.node_id) == (2, "v1.2", "n5")
    assert sizes == [20]
    nodes = {n.node_id: n for n in store.list_nodes()}
    assert (nodes["n2"].reserved_bytes, nodes["n2"].parts) == (0, 0)
    assert (nodes["n5"].reserved_bytes, nodes["n5"].parts) == (20, 1)
    with pytest.raises(UploadConflict, match="not on node n2"):
        store.replace_part(version_id="v1", index=2, failed_node_id="n2", place=emptiest)
    # The one node without a part of the version is suspect: placement refuses.
    store.mark_node_suspect("n2", 1.0)
    with pytest.raises(NotEnoughNodes):
        store.replace_part(
            version_id="v1",
            index=0,
            failed_node_id="n0",
            place=lambda loads, size: place_parts(loads, count=1, part_size=size, salt="v1"),
        )
    receipts = [PartReceipt(index=i, size=20, checksum="c") for i in range(5)]
    version = store.commit_version(
        version_id="v1", size=100, receipts=receipts, now=1.0, if_absent=False
    )
    assert [p.node.node_id for p in version.parts] == ["n0", "n1", "n5", "n3", "n4"]
    assert all(n.reserved_bytes == 0 for n in store.list_nodes())
    with pytest.raises(UploadConflict, match="committed, not pending"):
        store.replace_part(version_id="v1", index=1, failed_node_id="n1", place=emptiest)


def test_an_old_database_gains_the_failed_at_column(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA.replace(",\n    failed_at       REAL\n", "\n"))
    db.close()
    store = SqliteMetadataStore(path)
    beat(store, "n0", 1.0)
    assert store.mark_node_suspect("n0", 2.0)
    assert states(store) == {"n0": "suspect"}
    store.close()


def reserved(store: SqlMetadataStore) -> dict[str, int]:
    return {n.node_id: n.reserved_bytes for n in store.list_nodes()}


def test_a_reservation_starts_capped_and_grows_with_the_bytes(store: SqlMetadataStore) -> None:
    # A hint of 4000 bytes (800 a part) reserves only what a 100-byte file needs (20 a part).
    store.begin_version(
        version_id="v1",
        namespace="default",
        name="f",
        layout=LAYOUT,
        size_hint=4000,
        now=1.0,
        expires_at=100.0,
        if_absent=False,
        place=first_five,
        reserve_size=100,
    )
    assert reserved(store) == {"n0": 20, "n1": 20, "n2": 20, "n3": 20, "n4": 20, "n5": 0}
    store.extend_reservation(version_id="v1", size=1000)
    assert reserved(store)["n0"] == 200
    store.extend_reservation(version_id="v1", size=500)  # never shrinks
    assert reserved(store)["n0"] == 200
    # Another upload takes room on n0..n4: v1 cannot grow past it, and nothing changes.
    begin(store, "v2", name="g", size=3000)
    with pytest.raises(DiskFull, match="no room"):
        store.extend_reservation(version_id="v1", size=4000)
    assert reserved(store)["n0"] == 200 + 600
    store.abort_version("v1", 2.0)
    assert reserved(store)["n0"] == 600
    with pytest.raises(UploadConflict, match="aborted, not pending"):
        store.extend_reservation(version_id="v1", size=2000)
