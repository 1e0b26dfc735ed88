"""A held body's parts written together to the embedded cluster's nodes
(karma8.net.local.LocalFirstStorageClient.put_whole_parts): one sync round for all of them,
each part's refusal its own, and nothing done where they cannot go together."""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio.testing

from karma8.actors.storage import StorageConfig, StorageNode
from karma8.core.errors import DiskFull, StorageFailure, UploadConflict
from karma8.core.model import NodeRef
from karma8.net.local import LocalFirstStorageClient
from karma8.ports import StorageAPI, StoredPart
from karma8.store.groupsync import GroupSync
from karma8.store.tiered import TieredPartStore

from storehelpers import BIG, payload, put, read, sha

T = 1024


class HeldSync:
    """A sync call that can be held (to cancel a writer while its round runs)."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.go.set()
        self.calls = 0

    def __call__(self) -> None:
        self.go.wait()
        self.calls += 1


class Cluster:
    """Six nodes, each on a store of its own, sharing one group sync (as on one disk)."""

    def __init__(
        self, root: Path, group: GroupSync, capacity: int = BIG, volume_size: int = 1 << 20
    ) -> None:
        self.group = group
        self.stores = [
            TieredPartStore(
                root / f"n{i}",
                capacity_bytes=capacity,
                small_part_max=T,
                group_sync=group,
                volume_size=volume_size,
            )
            for i in range(6)
        ]
        self.nodes = {
            f"n{i}": StorageNode(
                node_id=f"n{i}",
                url=f"http://n{i}",
                store=store,
                discovery=cast(Any, None),
                config=StorageConfig(),
            )
            for i, store in enumerate(self.stores)
        }
        self.client = LocalFirstStorageClient(self.nodes, cast(StorageAPI, None))

    def close(self) -> None:
        for store in self.stores:
            store.close()

    def held(self) -> list[tuple[set[str], set[str], int, int]]:
        """What each store holds for writes in flight: keys being committed, needles
        pending, reserved bytes, appends and pins of its volumes (all none once every write
        has ended; an append never ended would hold compaction off its volume)."""
        return [
            (
                set(store._committing),
                set(store.packed._pending),
                store.in_flight_bytes,
                sum(file.appends + file.pins for file in store.packed.volumes.values()),
            )
            for store in self.stores
        ]


NOTHING_HELD: list[tuple[set[str], set[str], int, int]] = [(set(), set(), 0, 0)] * 6


@pytest.fixture
def sync() -> HeldSync:
    return HeldSync()


@pytest.fixture
def cluster(tmp_path: Path, sync: HeldSync) -> Iterator[Cluster]:
    made = Cluster(tmp_path, GroupSync(sync))
    yield made
    made.close()


def ref(node_id: str) -> NodeRef:
    return NodeRef(node_id=node_id, url=f"http://{node_id}")


def parts(*sizes: int, prefix: str = "v") -> list[tuple[NodeRef, str, bytes]]:
    return [(ref(f"n{i}"), f"{prefix}.{i}", payload(size, seed=i)) for i, size in enumerate(sizes)]


async def test_whole_parts_are_written_in_one_round_and_read_back(
    cluster: Cluster, sync: HeldSync
) -> None:
    wanted = parts(300, 300, 299, 0, 1024)
    stored = await cluster.client.put_whole_parts(wanted)
    assert stored == [
        StoredPart(key=key, size=len(data), checksum=sha(data)) for _, key, data in wanted
    ]
    assert sync.calls == 1  # one round for all five
    assert cluster.held() == NOTHING_HELD
    for (_, key, data), store in zip(wanted, cluster.stores, strict=False):
        assert b"".join(await read(store, key, 0, len(data))) == data
        assert await store.used_bytes() == len(data)


async def test_a_part_refused_is_that_part_s_error_alone(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, GroupSync(HeldSync()), capacity=500)
    try:
        await put(cluster.stores[1], "v.1", b"old")  # the key is taken on node 1
        wanted = parts(300, 300, 300, prefix="v")
        wanted[2] = (ref("n2"), "v.2", payload(600))  # more than node 2's room
        stored = await cluster.client.put_whole_parts(wanted)
        assert stored is not None
        assert stored[0] == StoredPart(key="v.0", size=300, checksum=sha(wanted[0][2]))
        assert isinstance(stored[1], UploadConflict)
        assert isinstance(stored[2], DiskFull)
        assert b"".join(await read(cluster.stores[1], "v.1", 0, 3)) == b"old"
        assert await cluster.stores[2].stat("v.2") is None
        assert [await s.used_bytes() for s in cluster.stores[:3]] == [300, 3, 0]
        assert cluster.held() == NOTHING_HELD
    finally:
        cluster.close()


async def test_parts_that_cannot_go_together_are_left_to_their_writers(
    tmp_path: Path, cluster: Cluster
) -> None:
    elsewhere = GroupSync(HeldSync())  # a node on another disk
    other = TieredPartStore(
        tmp_path / "other", capacity_bytes=BIG, small_part_max=T, group_sync=elsewhere
    )
    cluster.nodes["n5"] = StorageNode(
        node_id="n5",
        url="http://n5",
        store=other,
        discovery=cast(Any, None),
        config=StorageConfig(),
    )
    for wanted in (
        [*parts(10, 10), (ref("remote"), "v.2", b"x")],  # a node not in this process
        parts(10, T + 1),  # a part too large to pack
        [*parts(10, 10), (ref("n5"), "v.5", b"x")],  # nodes on two disks
    ):
        assert await cluster.client.put_whole_parts(wanted) is None
    for store in [*cluster.stores, other]:
        assert await store.keys() == []  # nothing was begun
    other.close()


async def test_cancelled_whole_parts_leave_no_part_and_can_be_written_again(
    cluster: Cluster, sync: HeldSync
) -> None:
    wanted = parts(100, 200, 300)
    sync.go.clear()  # a round holds in its sync; the parts wait for the next one
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cluster.group.sync)
        await trio.testing.wait_all_tasks_blocked()
        with trio.CancelScope() as scope:

            async def cancel_soon() -> None:
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()

            nursery.start_soon(cancel_soon)
            await cluster.client.put_whole_parts(wanted)
        assert scope.cancelled_caught
        sync.go.set()
    for (_, key, _), store in zip(wanted, cluster.stores, strict=False):
        assert await store.stat(key) is None
        assert await store.used_bytes() == 0
    assert cluster.held() == NOTHING_HELD
    stored = await cluster.client.put_whole_parts(wanted)  # nothing holds the keys
    assert stored == [
        StoredPart(key=key, size=len(data), checksum=sha(data)) for _, key, data in wanted
    ]


async def test_a_key_held_by_the_file_engine_or_being_committed_is_refused(
    cluster: Cluster,
) -> None:
    await put(cluster.stores[0], "v.0", payload(T + 1))  # a part file of the key
    cluster.stores[1]._committing.add("v.1")  # a writer of the key is committing it
    stored = await cluster.client.put_whole_parts(parts(10, 10, 10))
    assert stored is not None
    assert [type(part) for part in stored] == [UploadConflict, UploadConflict, StoredPart]
    assert b"".join(await read(cluster.stores[0], "v.0", 0, T + 1)) == payload(T + 1)
    cluster.stores[1]._committing.discard("v.1")
    assert cluster.held() == NOTHING_HELD


def fill_volume(store: TieredPartStore) -> None:
    """Make the store's next part start a new volume."""
    store.packed.volumes[max(store.packed.volumes)].end = store.packed.volume_size


async def test_a_volume_that_cannot_be_started_refuses_its_part_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = Cluster(tmp_path, GroupSync(HeldSync()))
    try:
        fill_volume(cluster.stores[1])

        def no_descriptors(*args: object) -> None:
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(cluster.stores[1].packed, "_create", no_descriptors)
        stored = await cluster.client.put_whole_parts(parts(10, 10, 10))
        assert stored is not None
        assert isinstance(stored[1], StorageFailure)
        assert "starting a volume" in stored[1].message
        assert [type(part) for part in stored] == [StoredPart, StorageFailure, StoredPart]
        assert cluster.held() == NOTHING_HELD
    finally:
        cluster.close()


async def test_cancelled_while_beginning_the_parts_ends_those_begun(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, GroupSync(HeldSync()))
    try:
        fill_volume(cluster.stores[1])  # its part waits for a new volume: a checkpoint
        with trio.CancelScope() as scope:
            scope.cancel()
            await cluster.client.put_whole_parts(parts(10, 10, 10))
        assert scope.cancelled_caught
        assert cluster.held() == NOTHING_HELD  # node 0's part was begun, and ended
        stored = await cluster.client.put_whole_parts(parts(10, 10, 10))
        assert stored is not None
        assert all(isinstance(part, StoredPart) for part in stored)
    finally:
        cluster.close()
