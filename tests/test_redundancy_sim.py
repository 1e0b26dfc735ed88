"""raid1 and parity namespaces in the simulator: what is stored, and reads that do not
notice a lost node, a slow one or a corrupt part."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio

from karma8.actors.discovery import Discovery
from karma8.actors.gateway import Gateway
from karma8.core.erasure import encode_parity
from karma8.core.errors import InvalidRequest, NotEnoughNodes, Unavailable
from karma8.core.layout import split
from karma8.core.model import MISSING_ON_ITS_NODE, FileVersion, NodeRef, VersionState
from karma8.sim.cluster import SimCluster
from karma8.sim.network import LinkFault
from karma8.sim.runner import run_with_cluster
from karma8.sim.scenario import ClusterSpec, Scenario
from karma8.sim.workload import BytesChunks

UNIT = 4
SCENARIO = Scenario(
    name="redundancy",
    cluster=ClusterSpec(storage_nodes=11, stripe_unit=UNIT, retire_grace=2.0, upload_ttl=30.0),
)
SIZES = [0, 1, 4, 5, 6, 19, 20, 21, 41, 1003]
ENGINES = [("raid1", {"copies": 2}), ("parity", {"parity": 1}), ("parity", {"parity": 2})]


def discovery(cluster: SimCluster) -> Discovery:
    assert cluster.discovery is not None
    return cluster.discovery


def payload(size: int, salt: int = 0) -> bytes:
    return bytes((i * 31 + salt) % 256 for i in range(size))


async def read(
    gw: Gateway, namespace: str, name: str, start: int = 0, stop: int | None = None
) -> bytes:
    version = await gw.stat(namespace, name)
    out = bytearray()
    async with gw.open_read(version, start=start, stop=stop) as stream:
        async for chunk in stream:
            out += chunk
    return bytes(out)


async def make(cluster: SimCluster, engine: str, settings: dict[str, int]) -> str:
    namespace = f"{engine}{settings.get('copies', settings.get('parity'))}"
    info = await discovery(cluster).create_namespace(
        namespace=namespace,
        engine=engine,
        copies=settings.get("copies"),
        parity=settings.get("parity"),
    )
    assert info.engine == engine
    return namespace


def node_of(cluster: SimCluster, version: FileVersion, slot: int) -> str:
    return version.parts[slot].node.node_id


@pytest.mark.parametrize(("engine", "settings"), ENGINES)
@pytest.mark.parametrize("streamed", [False, True])
def test_stored_parts_are_raid0s_plus_copies_or_parity(
    engine: str, settings: dict[str, int], streamed: bool
) -> None:
    async def go(cluster: SimCluster) -> None:
        namespace = await make(cluster, engine, settings)
        gw = cluster.gateway
        disks = {n.node_id: n.disk for n in cluster.nodes}
        for size in SIZES:
            data = payload(size)
            version = await gw.put(
                namespace,
                f"f/{size}",
                BytesChunks(data, 7),
                content_length=None if streamed else size,
            )
            layout = version.layout
            assert version.state is VersionState.COMMITTED
            assert len(version.parts) == layout.slots
            assert len({p.node.node_id for p in version.parts}) == layout.slots
            data_parts = split(layout, data)
            expected = [data_parts[i % 5] for i in range(5 * layout.copies)]
            expected += encode_parity(data_parts, layout.parity) if layout.parity else []
            for part in version.parts:
                assert disks[part.node.node_id].parts[part.key].data == expected[part.index]
            assert await read(gw, namespace, f"f/{size}") == data

    run_with_cluster(go, scenario=SCENARIO)


def test_engine_settings_are_checked_and_kept() -> None:
    async def go(cluster: SimCluster) -> None:
        d = discovery(cluster)
        with pytest.raises(InvalidRequest, match="engine"):
            await d.create_namespace(namespace="x", engine="raid5")
        with pytest.raises(InvalidRequest, match="parity"):
            await d.create_namespace(namespace="x", engine="parity", parity=3)
        with pytest.raises(InvalidRequest, match="copies"):
            await d.create_namespace(namespace="x", engine="parity", copies=2)
        info = await d.create_namespace(namespace="m", engine="raid1")
        assert (info.engine, info.copies, info.parity) == ("raid1", 2, 0)
        with pytest.raises(InvalidRequest, match="raid1"):
            await d.create_namespace(namespace="m", engine="parity")
        listed = {n.name: n.engine for n in await d.list_namespaces()}
        assert listed == {"default": "raid0", "m": "raid1"}

    run_with_cluster(go, scenario=SCENARIO)


def test_too_few_nodes_for_the_engine_is_a_clear_error() -> None:
    small = Scenario(name="six", cluster=ClusterSpec(storage_nodes=6, stripe_unit=UNIT))

    async def go(cluster: SimCluster) -> None:
        await discovery(cluster).create_namespace(namespace="p", engine="parity", parity=2)
        for content_length in (None, 30):
            with pytest.raises(NotEnoughNodes, match="need 7 storage nodes"):
                await cluster.gateway.put(
                    "p", "f", BytesChunks(payload(30), 7), content_length=content_length
                )

    run_with_cluster(go, scenario=small)


async def lose(cluster: SimCluster, node_id: str) -> None:
    cluster.network.endpoint(node_id).crash()


def corrupt(cluster: SimCluster, version: FileVersion, slot: int) -> None:
    part = version.parts[slot]
    disk = cluster.disk_of(part.node.node_id)
    assert disk is not None
    stored = disk.parts[part.key]
    stored.data = bytes([stored.data[0] ^ 1]) + stored.data[1:]


@pytest.mark.parametrize(("engine", "settings"), ENGINES)
def test_reads_survive_as_many_lost_nodes_as_the_engine_tolerates(
    engine: str, settings: dict[str, int]
) -> None:
    async def go(cluster: SimCluster) -> None:
        namespace = await make(cluster, engine, settings)
        gw = cluster.gateway
        files = {}
        for size in SIZES:
            data = payload(size, size)
            files[size] = (data, await gw.put(namespace, f"f/{size}", BytesChunks(data, 5)))
        big = files[1003][1]
        tolerates = big.layout.tolerates
        # Lose the nodes of data parts 0 and 2 (as many as tolerated).
        lost = [node_of(cluster, big, slot) for slot in (0, 2)[:tolerates]]
        for node in lost:
            await lose(cluster, node)
        for size, (data, _) in files.items():
            assert await read(gw, namespace, f"f/{size}") == data, size
            assert (
                await read(gw, namespace, f"f/{size}", size // 3, size - size // 4)
                == (data[size // 3 : size - size // 4])
            )
        # The reads that went around them are counted against the lost nodes, for metrics.
        failed = {node for (node, op), count in gw.part_failures.items() if op == "read"}
        assert failed == set(lost)

    run_with_cluster(go, scenario=SCENARIO)


@pytest.mark.parametrize(("engine", "settings"), ENGINES)
def test_a_corrupt_part_is_read_from_another_copy_or_rebuilt(
    engine: str, settings: dict[str, int]
) -> None:
    async def go(cluster: SimCluster) -> None:
        namespace = await make(cluster, engine, settings)
        data = payload(1003, 9)
        version = await cluster.gateway.put(namespace, "c", BytesChunks(data, 64))
        corrupt(cluster, version, 3)
        if version.layout.tolerates > 1:
            await lose(cluster, node_of(cluster, version, 1))
        assert await read(cluster.gateway, namespace, "c") == data

    run_with_cluster(go, scenario=SCENARIO)


@pytest.mark.parametrize(("engine", "settings"), ENGINES)
def test_a_part_reported_lost_is_not_read_until_repaired(
    engine: str, settings: dict[str, int]
) -> None:
    async def go(cluster: SimCluster) -> None:
        namespace = await make(cluster, engine, settings)
        data = payload(1003, 5)
        gw = cluster.gateway
        version = await gw.put(namespace, "r", BytesChunks(data, 64))
        rotten = version.parts[2]
        await discovery(cluster).report_lost_parts(
            node_id=rotten.node.node_id, keys=[rotten.key], reason="failed its check"
        )
        stat = await gw.stat(namespace, "r")
        assert stat.parts[2].reported_lost == "failed its check"
        counting = CountingStorage(gw._storage)
        gw._storage = counting
        assert await read(gw, namespace, "r") == data
        assert rotten.key not in counting.keys
        assert not gw.part_failures  # skipped, not failed: its node is not counted against

    run_with_cluster(go, scenario=SCENARIO)


def test_a_report_of_a_part_its_node_still_holds_goes_at_the_next_parts_check() -> None:
    """A node's parts check reported a part missing (its directory was away, or another
    karma8 ran on it); its next check lists it, and the report goes: the file is not shown
    unreadable (a raid0 file's reports were never removed otherwise)."""

    async def go(cluster: SimCluster) -> None:
        gw = cluster.gateway
        version = await gw.put("default", "back", BytesChunks(payload(1003, 7), 64))
        part = version.parts[2]
        await discovery(cluster).report_lost_parts(
            node_id=part.node.node_id, keys=[part.key], reason=MISSING_ON_ITS_NODE
        )
        assert (await gw.stat("default", "back")).parts[2].reported_lost is not None
        await trio.sleep(2 * SCENARIO.cluster.orphan_check_interval)
        assert (await gw.stat("default", "back")).parts[2].reported_lost is None

    run_with_cluster(go, scenario=SCENARIO)


@pytest.mark.parametrize(("engine", "settings"), ENGINES)
def test_a_part_reported_lost_is_still_read_when_nothing_else_is_left(
    engine: str, settings: dict[str, int]
) -> None:
    """A report may be stale (the part is fine): with as many other losses as the layout
    tolerates, the read takes the reported part rather than failing."""

    async def go(cluster: SimCluster) -> None:
        namespace = await make(cluster, engine, settings)
        data = payload(1003, 6)
        gw = cluster.gateway
        version = await gw.put(namespace, "s", BytesChunks(data, 64))
        reported = version.parts[2]
        await discovery(cluster).report_lost_parts(
            node_id=reported.node.node_id, keys=[reported.key], reason="missing on its node"
        )
        layout = version.layout
        others = [s for s in range(layout.slots) if s != 2 and layout.data_part(s) in (2, None)]
        for slot in others[: layout.tolerates]:  # raid1: part 2's other copy; parity: parity
            await lose(cluster, node_of(cluster, version, slot))
        counting = CountingStorage(gw._storage)
        gw._storage = counting
        assert await read(gw, namespace, "s") == data
        assert reported.key in counting.keys

    run_with_cluster(go, scenario=SCENARIO)


def test_one_loss_more_than_tolerated_fails_cleanly() -> None:
    async def go(cluster: SimCluster) -> None:
        namespace = await make(cluster, "parity", {"parity": 1})
        version = await cluster.gateway.put(namespace, "f", BytesChunks(payload(200), 9))
        await lose(cluster, node_of(cluster, version, 0))
        await lose(cluster, node_of(cluster, version, 5))
        with pytest.raises(Unavailable, match="f: 2 of its 6 parts cannot be read; parity 1"):
            await read(cluster.gateway, namespace, "f")

    run_with_cluster(go, scenario=SCENARIO)


@pytest.mark.parametrize(("engine", "settings"), ENGINES)
def test_a_node_lost_in_the_middle_of_a_read_changes_nothing_for_the_reader(
    engine: str, settings: dict[str, int]
) -> None:
    async def go(cluster: SimCluster) -> None:
        namespace = await make(cluster, engine, settings)
        data = payload(1_000_003, 3)  # parts of ~200 kB: several of the disk's 64 kB chunks
        gw = cluster.gateway
        version = await gw.put(namespace, "big", BytesChunks(data, 1 << 16))
        out = bytearray()
        async with gw.open_read(await gw.stat(namespace, "big")) as stream:
            async for chunk in stream:
                out += chunk
                if len(out) > 300_000 and len(out) - len(chunk) <= 300_000:
                    for slot in (1, 4)[: version.layout.tolerates]:
                        await lose(cluster, node_of(cluster, version, slot))
        assert bytes(out) == data

    big_units = attrs.evolve(SCENARIO, cluster=attrs.evolve(SCENARIO.cluster, stripe_unit=16384))
    run_with_cluster(go, scenario=big_units)


def test_a_slow_node_is_read_around() -> None:
    async def go(cluster: SimCluster) -> None:
        namespace = await make(cluster, "raid1", {"copies": 2})
        data = payload(500, 4)
        gw = cluster.gateway
        version = await gw.put(namespace, "slow", BytesChunks(data, 50))
        slow = node_of(cluster, version, 2)
        now = trio.current_time()
        cluster.network.faults.append(LinkFault(a=slow, b="*", until=now + 600, extra_latency=60))
        with trio.fail_after(30):
            assert await read(gw, namespace, "slow") == data

    run_with_cluster(go, scenario=SCENARIO)


class CountingStorage:
    """A gateway's storage client that counts the part bytes it reads."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.read = 0
        self.keys: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @asynccontextmanager
    async def read_part(
        self, node: Any, key: str, **kwargs: Any
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        self.keys.append(key)
        async with self._inner.read_part(node, key, **kwargs) as chunks:
            yield Counted(chunks, self)


class Counted:
    """A part stream that adds what passes to its counter (an iterator class: a stream
    given up on leaves no generator to finalise)."""

    def __init__(self, chunks: AsyncIterator[bytes], counter: CountingStorage) -> None:
        self._chunks = chunks
        self._counter = counter

    def __aiter__(self) -> Counted:
        return self

    async def __anext__(self) -> bytes:
        chunk = await anext(self._chunks)
        self._counter.read += len(chunk)
        return chunk


@pytest.mark.parametrize("parity", [1, 2])
def test_a_degraded_parity_read_takes_in_about_the_file_not_more(parity: int) -> None:
    """With a data part lost, every data part comes from one shared rebuild over k
    streams: the read takes in the file's size (plus a window at most), where reading the
    healthy parts on their own besides the rebuild took in 9/5 of it."""

    async def go(cluster: SimCluster) -> None:
        namespace = await make(cluster, "parity", {"parity": parity})
        data = payload(2_000_003, 8)
        gw = cluster.gateway
        version = await gw.put(namespace, "big", BytesChunks(data, 1 << 16))
        await lose(cluster, node_of(cluster, version, 1))
        counting = CountingStorage(gw._storage)
        gw._storage = counting
        assert await read(gw, namespace, "big") == data
        assert len(data) <= counting.read <= len(data) * 1.1
        counting.read = 0
        assert await read(gw, namespace, "big", 700_000, 1_300_000) == data[700_000:1_300_000]
        assert counting.read <= 600_000 + 5 * (1 << 20)  # the range, and a window per slot

    big_units = attrs.evolve(SCENARIO, cluster=attrs.evolve(SCENARIO.cluster, stripe_unit=16384))
    run_with_cluster(go, scenario=big_units)


class RecordingEnds:
    """The simulated storage port, recording how each part stream a read opened ended:
    closed (after its reader was done) or given up (an exception thrown into it)."""

    def __init__(self, storage: Any) -> None:
        self.storage = storage
        self.ends: list[str] = []
        self.put_part = storage.put_part
        self.delete_part = storage.delete_part

    @asynccontextmanager
    async def read_part(
        self, node: NodeRef, key: str, *, offset: int, length: int, checksum: str | None = None
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        ending = "given up"
        try:
            async with self.storage.read_part(
                node, key, offset=offset, length=length, checksum=checksum
            ) as stream:
                yield stream
                ending = "closed"
        finally:
            self.ends.append(ending)


@pytest.mark.parametrize(("engine", "settings"), ENGINES)
def test_a_redundant_read_left_by_an_error_gives_its_streams_up(
    engine: str, settings: dict[str, int]
) -> None:
    async def go(cluster: SimCluster) -> None:
        namespace = await make(cluster, engine, settings)
        data = payload(1003)
        gw0 = cluster.gateway
        version = await gw0.put(namespace, "f", BytesChunks(data, 7), content_length=len(data))
        storage = RecordingEnds(gw0._storage)
        gw = Gateway(discovery=gw0._discovery, storage=storage, config=gw0._config)
        assert await read(gw, namespace, "f") == data
        assert storage.ends
        assert set(storage.ends) == {"closed"}
        storage.ends.clear()

        async def stop_reading() -> None:
            async with gw.open_read(version) as stream:
                await anext(stream)
                raise ValueError("the reader stops")

        with pytest.raises(ValueError, match="the reader stops"):
            await stop_reading()
        assert storage.ends
        assert set(storage.ends) == {"given up"}

    run_with_cluster(go, scenario=SCENARIO)
