"""The SQLite metadata store: two-phase versions, counters, garbage."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from karma8.core.errors import IntegrityError, NotFound, PreconditionFailed, UploadConflict
from karma8.core.layout import StripeLayout
from karma8.core.model import NodeRegistration, PartReceipt, VersionState
from karma8.core.placement import NodeLoad
from karma8.metadata.sqlite import SqliteMetadataStore

LAYOUT = StripeLayout(parts=5, unit=4)


def first_five(loads: Sequence[NodeLoad]) -> list[str]:
    return [n.node_id for n in loads][:5]


@pytest.fixture
def store() -> SqliteMetadataStore:
    s = SqliteMetadataStore()
    s.create_namespace("default", 0.0)
    for i in range(6):
        s.upsert_node(
            NodeRegistration(node_id=f"n{i}", url=f"http://n{i}", capacity_bytes=1000), 0.0
        )
    return s


def begin(
    store: SqliteMetadataStore,
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


def test_begin_is_invisible_until_commit(store: SqliteMetadataStore) -> None:
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
    store: SqliteMetadataStore,
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


def test_commit_checks_state_sizes_and_expiry(store: SqliteMetadataStore) -> None:
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


def test_abort_after_commit_reports_committed(store: SqliteMetadataStore) -> None:
    begin(store, "v1")
    store.commit_version(version_id="v1", size=10, receipts=receipts(10), now=2.0, if_absent=False)
    assert store.abort_version("v1", 3.0).state is VersionState.COMMITTED


def test_if_absent(store: SqliteMetadataStore) -> None:
    begin(store, "v1", if_absent=True)
    begin(store, "v2", if_absent=True)
    store.commit_version(version_id="v1", size=10, receipts=receipts(10), now=2.0, if_absent=True)
    with pytest.raises(PreconditionFailed):
        store.commit_version(
            version_id="v2", size=10, receipts=receipts(10), now=2.0, if_absent=True
        )
    with pytest.raises(PreconditionFailed):
        begin(store, "v3", if_absent=True)


def test_expiry_aborts_pending_versions(store: SqliteMetadataStore) -> None:
    begin(store, "v1")
    assert store.expire_pending(50.0) == 0
    assert store.expire_pending(100.0) == 1
    assert store.versions(VersionState.ABORTED)[0].version_id == "v1"
    assert sum(n.reserved_bytes for n in store.list_nodes()) == 0


def test_listing_and_unknown_namespace(store: SqliteMetadataStore) -> None:
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


def test_stale_nodes_become_unavailable(store: SqliteMetadataStore) -> None:
    store.upsert_node(NodeRegistration(node_id="n0", url="http://n0", capacity_bytes=1000), 10.0)
    assert store.mark_stale_nodes(5.0) == ["n1", "n2", "n3", "n4", "n5"]
    states = {n.node_id: n.state.value for n in store.list_nodes()}
    assert states["n0"] == "available"
    assert states["n1"] == "unavailable"


def test_file_database_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "meta.sqlite3"
    s = SqliteMetadataStore(path)
    s.create_namespace("default", 0.0)
    s.close()
    assert SqliteMetadataStore(path).namespace_exists("default")
