"""A gateway worker's storage port (karma8.net.direct.DirectReadStorage): parts of the
nodes it can see are read from their directories (packed volumes, part files); everything
else, and anything that fails its check there when opened, is asked of the node."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, cast

import attrs
import pytest
import trio
import trio.testing
from trio.testing import wait_all_tasks_blocked

from karma8.actors.gateway import Gateway, GatewayConfig
from karma8.core.erasure import encode_parity
from karma8.core.errors import IntegrityError, Karma8Error
from karma8.core.layout import StripeLayout, split
from karma8.core.model import (
    FileVersion,
    NodeRef,
    NodeRegistration,
    PartPlacement,
    PartReceipt,
    VersionState,
)
from karma8.metadata.sqlite import SqliteMetadataStore
from karma8.net.direct import DirectReadStorage, ReadOnlyMetadata, open_direct_reads
from karma8.ports import StoredPart
from karma8.store.readonly import PartStoreReader
from karma8.store.tiered import OneChunk, TieredPartStore

from storehelpers import BIG, flip_bit, packed_parts, part_location, payload, put, sha

T = 1024
NODE = NodeRef(node_id="node-a", url="http://127.0.0.1:1")
OTHER = NodeRef(node_id="node-b", url="http://127.0.0.1:2")


class AskedNode:
    """The remote port: records what it is asked and answers ``b"node:" + key``."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str, int, int]] = []

    async def put_part(
        self, node: NodeRef, key: str, chunks: AsyncIterable[bytes], *, size: int | None = None
    ) -> StoredPart:
        raise AssertionError("not used")

    @asynccontextmanager
    async def read_part(
        self, node: NodeRef, key: str, *, offset: int, length: int, checksum: str | None = None
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        self.asked.append((node.node_id, key, offset, length))

        async def chunks() -> AsyncIterator[bytes]:
            yield (b"node:" + key.encode())[offset : offset + length]

        yield chunks()

    async def delete_part(self, node: NodeRef, key: str) -> None:
        raise AssertionError("not used")


async def read(
    storage: DirectReadStorage, node: NodeRef, key: str, offset: int, length: int
) -> bytes:
    async with storage.read_part(node, key, offset=offset, length=length) as chunks:
        return b"".join([c async for c in chunks])


async def test_packed_parts_are_read_directly_and_the_rest_is_asked(tmp_path: Path) -> None:
    store = TieredPartStore(tmp_path, capacity_bytes=BIG, small_part_max=T, group_sync=False)
    await put(store, "p.0", payload(500, seed=1))
    await put(store, "p.1", payload(300, seed=2))
    await put(store, "big.0", payload(T + 10))
    node = AskedNode()
    storage = DirectReadStorage(node, {NODE.node_id: PartStoreReader(tmp_path)}, small_part_max=T)
    assert await read(storage, NODE, "p.0", 0, 500) == payload(500, seed=1)
    assert await read(storage, NODE, "p.0", 100, 50) == payload(500, seed=1)[100:150]
    assert node.asked == []
    assert storage.counts == {"direct": 2, "asked": 0}
    # A part file is read through the file engine's checked reader.
    assert await read(storage, NODE, "big.0", 7, T) == payload(T + 10)[7 : T + 7]
    assert storage.counts == {"direct": 3, "asked": 0}
    # A node it cannot see, a key it does not hold.
    assert await read(storage, OTHER, "p.1", 0, 6) == b"node:p"
    assert await read(storage, NODE, "gone.0", 0, 6) == b"node:g"
    # A part whose bytes fail their CRC: the node reads it (and verifies and reports it).
    path, offset = packed_parts(tmp_path)["p.1"]
    flip_bit(path, offset + 3)
    assert await read(storage, NODE, "p.1", 0, 7) == b"node:p."
    # So is a part file whose header is damaged.
    big = store.files.part_path("big.0")
    flip_bit(big, 2)
    assert await read(storage, NODE, "big.0", 0, 5) == b"node:"
    assert [key for _, key, _, _ in node.asked] == ["p.1", "gone.0", "p.1", "big.0"]
    assert storage.counts == {"direct": 3, "asked": 4}
    storage.close()
    store.close()


async def test_a_block_failing_its_check_fails_the_read_and_the_node_reads_it_again(
    tmp_path: Path,
) -> None:
    store = TieredPartStore(tmp_path, capacity_bytes=BIG, small_part_max=T, group_sync=False)
    await put(store, "big.1", payload(3 * T))
    path, offset = part_location(tmp_path, "big.1")
    flip_bit(path, offset + 2 * T)  # a block's payload: the file opens, the block fails
    node = AskedNode()
    storage = DirectReadStorage(node, {NODE.node_id: PartStoreReader(tmp_path)}, small_part_max=T)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(storage.run)
        with pytest.raises(IntegrityError):
            await read(storage, NODE, "big.1", 0, 3 * T)
        assert storage.counts == {"direct": 1, "asked": 0}
        await wait_all_tasks_blocked()
        assert node.asked == [(NODE.node_id, "big.1", 0, 3 * T)]  # so that it finds it too
        nursery.cancel_scope.cancel()
    storage.close()
    store.close()


async def test_a_worker_indexes_its_nodes_appends_without_waiting_for_a_read(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    store = TieredPartStore(tmp_path, capacity_bytes=BIG, small_part_max=T, group_sync=False)
    reader = PartStoreReader(tmp_path)
    storage = DirectReadStorage(AskedNode(), {NODE.node_id: reader}, small_part_max=T)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(storage.run)
        for i in range(600):  # ~540 KiB: more than one refresh's budget
            await put(store, f"w{i}.0", payload(900, seed=i))
        await trio.sleep(1)  # virtual: the keeper's rounds, each a bounded step or more
        nursery.cancel_scope.cancel()
    assert not reader.packed.behind
    refreshes = reader.packed.refreshes
    assert all(reader.read_packed(f"w{i}.0") == payload(900, seed=i) for i in range(600))
    assert reader.packed.refreshes == refreshes  # found, and indexed already
    storage.close()
    store.close()


class KnowingNode(AskedNode):
    """The remote port, answering with the parts' real bytes."""

    def __init__(self, parts: dict[str, bytes]) -> None:
        super().__init__()
        self.parts = parts

    @asynccontextmanager
    async def read_part(
        self, node: NodeRef, key: str, *, offset: int, length: int, checksum: str | None = None
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        self.asked.append((node.node_id, key, offset, length))
        yield OneChunk(self.parts[key][offset : offset + length])


class OpenCounting(DirectReadStorage):
    """Counts the part streams opened (the long way of a read)."""

    opened = 0

    def read_part(
        self, node: NodeRef, key: str, *, offset: int, length: int, checksum: str | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        self.opened += 1
        return super().read_part(node, key, offset=offset, length=length, checksum=checksum)


async def stored(
    store: TieredPartStore, version_id: str, data: bytes, layout: StripeLayout | None = None
) -> FileVersion:
    """``data`` stored as a committed version of ``layout`` (default raid0, rows of 5 KiB):
    every slot, copies and parity parts too, on the one node."""
    layout = layout or StripeLayout(unit=T)
    data_parts = split(layout, data)
    parity = encode_parity(data_parts, layout.parity) if layout.parity else []
    slots = data_parts * layout.copies + parity
    placements = []
    for index, part in enumerate(slots):
        await put(store, f"{version_id}.{index}", part)
        placement = PartPlacement(
            index=index, key=f"{version_id}.{index}", node=NODE, size=len(part), checksum=sha(part)
        )
        placements.append(placement)
    return FileVersion(
        version_id=version_id,
        namespace="ns",
        name=version_id,
        state=VersionState.COMMITTED,
        size=len(data),
        layout=layout,
        parts=tuple(placements),
        created_at=0.0,
    )


@pytest.mark.parametrize(
    "layout",
    [
        StripeLayout(unit=T),
        StripeLayout(unit=T, copies=2),
        StripeLayout(unit=T, parity=1),
        StripeLayout(parts=3, unit=T, parity=2),
    ],
    ids=["raid0", "raid1", "parity1", "k3-parity2"],
)
async def test_a_small_whole_read_at_once_is_the_file_for_every_layout_and_size(
    tmp_path: Path, layout: StripeLayout
) -> None:
    store = TieredPartStore(tmp_path, capacity_bytes=BIG, small_part_max=64 * T, group_sync=False)
    row = layout.row_size
    files = {}
    for size in (0, 1, 4, row - 1, row, row + 1, 2 * row + 345):
        data = payload(size, seed=size)
        files[size] = (data, await stored(store, f"v{size}", data, layout))
    # The worker's reader opens after the writes: it has every needle (no node is asked).
    storage = OpenCounting(AskedNode(), {NODE.node_id: PartStoreReader(tmp_path)}, 64 * T)
    gateway = Gateway(discovery=cast(Any, None), storage=storage, config=GatewayConfig())
    for size, (data, version) in files.items():
        assert await gateway.read_bytes(version) == data
        assert storage.opened == 0, size  # every one at once
        # A range, even one that starts or ends with the file, takes the parts' streams.
        if size > 1:
            assert await gateway.read_bytes(version, start=0, stop=size - 1) == data[:-1]
            assert await gateway.read_bytes(version, start=1, stop=size) == data[1:]
            assert storage.opened > 0
            storage.opened = 0
    assert storage.counts["asked"] == 0
    storage.close()
    store.close()


async def test_a_small_whole_read_takes_its_parts_at_once_else_it_goes_the_long_way(
    tmp_path: Path,
) -> None:
    store = TieredPartStore(tmp_path, capacity_bytes=BIG, small_part_max=64 * T, group_sync=False)
    tail, rows = payload(3000, seed=1), payload(12_345, seed=2)  # a tail; two rows and a tail
    a, b = await stored(store, "a", tail), await stored(store, "b", rows)
    parts = {f"a.{i}": p for i, p in enumerate(split(a.layout, tail))}
    parts |= {f"b.{i}": p for i, p in enumerate(split(b.layout, rows))}
    node = KnowingNode(parts)
    storage = OpenCounting(node, {NODE.node_id: PartStoreReader(tmp_path)}, small_part_max=64 * T)
    gateway = Gateway(discovery=cast(Any, None), storage=storage, config=GatewayConfig())
    assert await gateway.read_bytes(a) == tail
    assert await gateway.read_bytes(b, start=0, stop=len(rows)) == rows
    assert (storage.opened, storage.counts, node.asked) == (0, {"direct": 10, "asked": 0}, [])
    # A range: its parts' streams.
    assert await gateway.read_bytes(b, start=100, stop=5000) == rows[100:5000]
    assert storage.opened == 5
    # Not committed: the long way, which refuses it.
    with pytest.raises(Karma8Error):
        await gateway.read_bytes(attrs.evolve(b, state=VersionState.PENDING))
    # A version whose size is not its parts': the long way, which finds the parts short.
    with pytest.raises(IntegrityError):
        await gateway.read_bytes(attrs.evolve(a, size=len(tail) + 5))
    # A part that fails its check: the long way, where the node is asked for it; each part
    # read counted once, as the long way read it.
    path, offset = packed_parts(tmp_path)["a.2"]
    flip_bit(path, offset + 3)
    storage.opened = 0
    storage.counts.update(direct=0, asked=0)
    node.asked.clear()
    assert await gateway.read_bytes(a) == tail
    assert storage.opened == 5
    assert node.asked == [(NODE.node_id, "a.2", 0, len(parts["a.2"]))]
    assert storage.counts == {"direct": 4, "asked": 1}
    # A part whose recorded checksum is not its bytes', or reported lost: the long way.
    for changed, asked in (
        (attrs.evolve(b.parts[1], checksum=sha(b"other")), ["b.1"]),  # the node is asked
        (attrs.evolve(b.parts[1], reported_lost="missing on its node"), []),
    ):
        storage.opened = 0
        node.asked.clear()
        version = attrs.evolve(b, parts=(b.parts[0], changed, *b.parts[2:]))
        assert await gateway.read_bytes(version) == rows
        assert storage.opened == 5
        assert [key for _, key, _, _ in node.asked] == asked
    storage.close()
    store.close()


async def test_a_node_whose_volumes_cannot_be_indexed_does_not_stop_the_others(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stores = {
        name: TieredPartStore(
            tmp_path / name, capacity_bytes=BIG, small_part_max=T, group_sync=False
        )
        for name in ("bad", "good")
    }
    readers = {name: PartStoreReader(tmp_path / name) for name in stores}

    def broken(budget: int | None = 0) -> bool:
        raise RuntimeError("a bug")

    monkeypatch.setattr(readers["bad"].packed, "refresh", broken)
    storage = DirectReadStorage(AskedNode(), readers, small_part_max=T)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(storage.run)
        await put(stores["good"], "g.0", payload(10))
        await trio.sleep(1)  # virtual: five rounds of the worker's task, each failing for "bad"
        nursery.cancel_scope.cancel()
    refreshes = readers["good"].packed.refreshes
    assert readers["good"].read_packed("g.0") == payload(10)
    assert readers["good"].packed.refreshes == refreshes  # indexed by the task
    failures = [r for r in caplog.records if "indexing node bad" in r.getMessage()]
    assert len(failures) == 1  # logged once while it keeps failing
    storage.close()
    for store in stores.values():
        store.close()


def test_a_worker_resolves_only_what_discovery_has_made_durable(tmp_path: Path) -> None:
    """Discovery commits without syncing and syncs the log in rounds; until a round has
    covered a commit, a worker reading the database must not answer with it (a power loss
    could take it back), and asks discovery instead."""
    path = tmp_path / "discovery.sqlite3"
    store = SqliteMetadataStore(path, sync_on_commit=False)
    store.create_namespace("default", 0.0)
    for i in range(6):
        store.upsert_node(
            NodeRegistration(node_id=f"n{i}", url=f"http://n{i}", capacity_bytes=10_000), 0.0
        )
    layout = StripeLayout(parts=5, unit=64)

    def commit(vid: str) -> None:
        store.begin_version(
            version_id=vid,
            namespace="default",
            name="f",
            layout=layout,
            size_hint=10,
            now=1.0,
            expires_at=100.0,
            if_absent=False,
            place=lambda loads: [n.node_id for n in loads][:5],
        )
        parts = [
            PartReceipt(index=i, size=s, checksum=f"c{i}")
            for i, s in enumerate(layout.part_sizes(10))
        ]
        store.commit_version(version_id=vid, size=10, receipts=parts, now=2.0, if_absent=False)

    worker = ReadOnlyMetadata(path)
    commit("v1")
    assert store.current_version("default", "f") is not None  # committed, in the log
    assert worker.current_version("default", "f") is None  # ... but not synced
    store.sync_wal()
    found = worker.current_version("default", "f")
    assert found is not None
    assert found.version_id == "v1"
    commit("v2")  # a newer version not synced yet: neither is answered
    assert worker.current_version("default", "f") is None
    assert worker.current_version("default", "f") is None  # nor kept from the first look
    store.checkpoint()  # the log copied into the database (synced) and emptied
    v2 = worker.current_version("default", "f")
    assert v2 is not None
    assert v2.version_id == "v2"
    commit("v3")
    assert worker.current_version("default", "f") is None
    worker.close()
    store.close()


def test_with_the_metadata_elsewhere_a_database_file_left_behind_is_not_read(
    tmp_path: Path,
) -> None:
    SqliteMetadataStore(tmp_path / "discovery.sqlite3", sync_on_commit=False).close()
    (tmp_path / "storage-0").mkdir()
    (tmp_path / "storage-0" / "node_id").write_text("node-a\n")
    metadata, readers = open_direct_reads(tmp_path)
    assert metadata is not None
    assert list(readers) == ["node-a"]
    metadata.close()
    readers["node-a"].close()
    metadata, readers = open_direct_reads(tmp_path, metadata=False)  # metadata_url is set
    assert metadata is None
    assert list(readers) == ["node-a"]
    readers["node-a"].close()


class Discovered:
    """Discovery's database as net mode opens it, 6 nodes, and small versions committed as a
    placement lease's are (no pending row)."""

    LAYOUT = StripeLayout(parts=5, unit=64)

    def __init__(self, path: Path) -> None:
        self.path = path
        self.store = SqliteMetadataStore(path, sync_on_commit=False)
        self.store.create_namespace("default", 0.0)
        self.nodes = [
            NodeRegistration(node_id=f"n{i}", url=f"http://n{i}", capacity_bytes=10**9)
            for i in range(6)
        ]
        for registration in self.nodes:
            self.store.upsert_node(registration, 0.0)

    def commit(self, version_id: str, name: str = "f") -> None:
        """Commit a 10-byte version of ``default/name`` (not synced)."""
        self.store.commit_placed(
            version_id=version_id,
            namespace="default",
            name=name,
            layout=self.LAYOUT,
            nodes=[n.node_id for n in self.nodes[:5]],
            size=10,
            receipts=[
                PartReceipt(index=i, size=size, checksum=f"c{i}")
                for i, size in enumerate(self.LAYOUT.part_sizes(10))
            ],
            created_at=1.0,
            now=2.0,
            if_absent=False,
        )


@pytest.fixture
def discovered(tmp_path: Path) -> Iterator[Discovered]:
    d = Discovered(tmp_path / "discovery.sqlite3")
    yield d
    d.store.close()


def test_a_resolved_name_is_kept_while_it_stays_current(discovered: Discovered) -> None:
    """A hot file is resolved from memory while no other connection has committed; after a
    commit (here a node's heartbeat) it is given again, for ``keep_for`` seconds since it was
    read, only once the name's committed version is seen to be the same; a new version of
    the name is read at once, and so is the same one once ``keep_for`` has passed."""
    store = discovered.store
    now = [0.0]
    worker = ReadOnlyMetadata(discovered.path, keep_for=1.0, clock=lambda: now[0])
    reads: list[str] = []  # the versions the worker read from the database

    def traced(statement: str) -> None:
        if statement.startswith("SELECT * FROM versions WHERE version_id"):
            reads.append(statement.rsplit("'", 2)[1])

    def resolved() -> str | None:
        found = worker.current_version("default", "f")
        return None if found is None else found.version_id

    worker._db.set_trace_callback(traced)
    discovered.commit("v1")
    store.sync_wal()
    assert [resolved() for _ in range(3)] == ["v1"] * 3
    assert reads == ["v1"]  # read once, then kept
    store.upsert_node(discovered.nodes[0], 5.0)  # a heartbeat: a commit, not of the name
    store.sync_wal()
    now[0] = 0.9
    assert [resolved() for _ in range(2)] == ["v1"] * 2
    assert reads == ["v1"]  # still the name's version: kept
    discovered.commit("v2")  # a new version of the name
    store.sync_wal()
    assert resolved() == "v2"
    assert reads == ["v1", "v2"]
    store.upsert_node(discovered.nodes[0], 6.0)
    store.sync_wal()
    now[0] = 2.0  # v2 was read over a second ago: read again, whatever the name holds
    assert resolved() == "v2"
    assert reads == ["v1", "v2", "v2"]
    store.upsert_node(discovered.nodes[0], 7.0)
    store.sync_wal()
    now[0] = 2.5
    assert resolved() == "v2"  # checked, not read: given only while young...
    assert reads == ["v1", "v2", "v2"]
    now[0] = 3.5  # ...even with nothing committed since the check
    assert resolved() == "v2"
    assert reads == ["v1", "v2", "v2", "v2"]
    worker.close()


def test_after_a_checkpoint_that_could_not_empty_the_log_nothing_is_durable_until_one_does(
    discovered: Discovered,
) -> None:
    """A checkpoint that copied the log but could not empty it (a worker was reading) lets
    discovery's next commit start the log over inside its old size: the durable mark must
    not vouch for that commit before it is synced."""
    store, path, commit = discovered.store, discovered.path, discovered.commit
    for i in range(40):
        commit(f"old{i}", f"g{i}")
    commit("v1")
    store.sync_wal()
    worker = ReadOnlyMetadata(path)
    reading = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    reading.execute("BEGIN")
    reading.execute("SELECT count(*) FROM versions").fetchone()  # a read in flight
    assert not store.checkpoint()  # copied, not emptied
    reading.execute("COMMIT")
    reading.close()
    store.sync_wal()
    commit("v2")  # starts the log over; committed, not synced
    assert store.log_bytes() > 0
    assert worker.current_version("default", "f") is None
    store.sync_wal()
    assert worker.current_version("default", "f") is None  # not until a checkpoint empties it
    assert store.checkpoint()
    store.sync_wal()
    found = worker.current_version("default", "f")
    assert found is not None
    assert found.version_id == "v2"
    worker.close()


def test_a_rolled_back_transaction_leaves_nothing_in_the_log(tmp_path: Path) -> None:
    """Pages of a transaction are written to the log only at its commit (no spilling): a
    rolled-back one would leave frames past the last commit, inside the size the durable
    mark publishes, for a later commit to overwrite unsynced."""
    store = SqliteMetadataStore(tmp_path / "discovery.sqlite3", sync_on_commit=False)
    store._db.execute("PRAGMA cache_size = 10")  # a few pages: a big transaction would spill
    store.create_namespace("default", 0.0)
    before = store.log_bytes()

    def big_then_undone() -> None:
        with store._tx() as db:
            for i in range(200):
                db.execute(
                    "INSERT INTO counters(name, value) VALUES (?, 0)", (f"{i:03d}" + "x" * 3000,)
                )
            raise ValueError("undo")

    with pytest.raises(ValueError, match="undo"):
        big_then_undone()
    assert store.log_bytes() == before
    store.close()
