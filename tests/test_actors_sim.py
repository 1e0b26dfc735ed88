"""The actors (gateway, discovery, storage) exercised in the deterministic simulator."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio

from karma8.actors.gateway import Gateway
from karma8.actors.storage import StorageNode
from karma8.core.errors import (
    DiskFull,
    IntegrityError,
    InvalidName,
    InvalidRequest,
    Karma8Error,
    NotEnoughNodes,
    NotFound,
    PreconditionFailed,
    StorageFailure,
    Unavailable,
    UploadConflict,
)
from karma8.core.layout import split
from karma8.core.model import NodeRef, NodeState, PartPlacement, VersionState
from karma8.ports import StoredPart
from karma8.sim.cluster import SimCluster
from karma8.sim.disk import MemoryDisk, WriteFault
from karma8.sim.runner import run_with_cluster
from karma8.sim.scenario import ClusterSpec, Scenario
from karma8.sim.workload import BytesChunks

UNIT = 4
SCENARIO = Scenario(
    name="actors",
    cluster=ClusterSpec(storage_nodes=6, stripe_unit=UNIT, retire_grace=2.0, upload_ttl=30.0),
)
EDGE_SIZES = [0, 1, 2, 4, 5, 6, 19, 20, 21, 39, 40, 41, 1000, 1003]


def chunks(data: bytes, size: int = 7) -> BytesChunks:
    return BytesChunks(data, size)


def payload(size: int, salt: int = 0) -> bytes:
    return bytes((i * 31 + salt) % 256 for i in range(size))


async def read(gw: Gateway, name: str, start: int = 0, stop: int | None = None) -> bytes:
    version = await gw.stat("default", name)
    out = bytearray()
    async with gw.open_read(version, start=start, stop=stop) as stream:
        async for chunk in stream:
            out += chunk
    return bytes(out)


def disk_keys(cluster: SimCluster) -> list[str]:
    return sorted(key for node in cluster.nodes for key in node.disk.parts)


async def settle(cluster: SimCluster) -> None:
    """Let heartbeats, sweeps and the retire grace run their course."""
    await trio.sleep(cluster.scenario.cluster.retire_grace + 5)


def test_round_trip_for_edge_sizes_with_parts_on_five_distinct_nodes() -> None:
    async def go(cluster: SimCluster) -> None:
        gw = cluster.gateway
        disks = {n.node_id: n.disk for n in cluster.nodes}
        for size in EDGE_SIZES:
            data = payload(size)
            version = await gw.put("default", f"f/{size}", chunks(data), content_length=size)
            assert version.state is VersionState.COMMITTED
            assert version.size == size
            assert len({p.node.node_id for p in version.parts}) == 5
            expected = split(version.layout, data)
            for part in version.parts:
                stored = disks[part.node.node_id].parts[part.key]
                assert stored.data == expected[part.index]
            assert await read(gw, f"f/{size}") == data

    run_with_cluster(go, scenario=SCENARIO)


def test_chunked_upload_without_content_length() -> None:
    async def go(cluster: SimCluster) -> None:
        data = payload(333, 1)
        version = await cluster.gateway.put("default", "chunked", chunks(data, 50))
        assert version.size == 333
        assert await read(cluster.gateway, "chunked") == data

    run_with_cluster(go, scenario=SCENARIO)


def test_range_reads_return_the_same_slice() -> None:
    async def go(cluster: SimCluster) -> None:
        data = payload(101, 2)
        await cluster.gateway.put("default", "r", chunks(data), content_length=101)
        for start, stop in [(0, 0), (0, 1), (3, 57), (40, 41), (99, 101), (0, 101)]:
            assert await read(cluster.gateway, "r", start, stop) == data[start:stop]

    run_with_cluster(go, scenario=SCENARIO)


def test_overwrite_and_delete_collect_old_parts() -> None:
    async def go(cluster: SimCluster) -> None:
        gw = cluster.gateway
        first = await gw.put("default", "x", chunks(payload(50)), content_length=50)
        second = await gw.put("default", "x", chunks(payload(60, 9)), content_length=60)
        assert await read(gw, "x") == payload(60, 9)
        await settle(cluster)
        keys = disk_keys(cluster)
        assert not any(k.startswith(first.version_id) for k in keys)
        assert sum(k.startswith(second.version_id) for k in keys) == 5
        assert await gw.delete("default", "x") is True
        assert await gw.delete("default", "x") is False
        with pytest.raises(NotFound):
            await gw.stat("default", "x")
        await settle(cluster)
        assert disk_keys(cluster) == []
        assert cluster.store.versions() == []

    run_with_cluster(go, scenario=SCENARIO)


@pytest.mark.parametrize(
    ("declared", "sent", "message"),
    [(100, 60, "body has 60 bytes"), (10, 60, "longer than Content-Length")],
)
def test_body_not_matching_content_length_fails_and_leaves_nothing(
    declared: int, sent: int, message: str
) -> None:
    async def go(cluster: SimCluster) -> None:
        with pytest.raises(InvalidRequest, match=message):
            await cluster.gateway.put(
                "default", "short", chunks(payload(sent)), content_length=declared
            )
        with pytest.raises(NotFound):
            await cluster.gateway.stat("default", "short")
        assert disk_keys(cluster) == []
        await settle(cluster)
        assert cluster.store.versions() == []

    run_with_cluster(go, scenario=SCENARIO)


def test_a_failing_node_fails_the_put_cleanly_and_the_old_version_stays() -> None:
    async def go(cluster: SimCluster) -> None:
        gw = cluster.gateway
        await gw.put("default", "f", chunks(payload(200)), content_length=200)
        for node in cluster.nodes:
            node.disk.faults.append(WriteFault(start=0.0, until=1e9, at_byte=10))
        with pytest.raises(StorageFailure, match="injected write failure"):
            await gw.put("default", "f", chunks(payload(200, 5)), content_length=200)
        assert await read(gw, "f") == payload(200)
        for node in cluster.nodes:
            node.disk.faults.clear()
        await settle(cluster)
        assert len(disk_keys(cluster)) == 5
        assert [v.state for v in cluster.store.versions()] == [VersionState.COMMITTED]

    run_with_cluster(go, scenario=SCENARIO)


def test_a_cancelled_put_cleans_up_after_itself() -> None:
    async def go(cluster: SimCluster) -> None:
        async def stalled() -> AsyncIterator[bytes]:
            yield payload(100)  # a few rows, then the client hangs
            await trio.sleep_forever()
            yield b""  # pragma: no cover

        with trio.move_on_after(1.0):
            await cluster.gateway.put("default", "c", stalled())
        assert disk_keys(cluster) == []
        assert [v.state for v in cluster.store.versions()] == [VersionState.ABORTED]
        await settle(cluster)
        assert cluster.store.versions() == []

    run_with_cluster(go, scenario=SCENARIO)


def test_a_corrupt_part_is_detected_on_read() -> None:
    async def go(cluster: SimCluster) -> None:
        version = await cluster.gateway.put(
            "default", "c", chunks(payload(100)), content_length=100
        )
        part = version.parts[3]
        disk = next(n.disk for n in cluster.nodes if n.node_id == part.node.node_id)
        stored = disk.parts[part.key]
        stored.data = bytes([stored.data[0] ^ 1]) + stored.data[1:]
        with pytest.raises(IntegrityError, match="checksum"):
            await read(cluster.gateway, "c")

    run_with_cluster(go, scenario=SCENARIO)


def test_if_absent_and_bad_names_and_unknown_namespace() -> None:
    async def go(cluster: SimCluster) -> None:
        gw = cluster.gateway
        await gw.put("default", "once", chunks(b"a"), if_absent=True)
        with pytest.raises(PreconditionFailed):
            await gw.put("default", "once", chunks(b"b"), if_absent=True)
        with pytest.raises(InvalidName):
            await gw.put("default", "../etc/passwd", chunks(b"x"))
        with pytest.raises(NotFound, match="namespace"):
            await gw.put("other", "f", chunks(b"x"))
        assert hashlib.sha256(await read(gw, "once")).digest() == hashlib.sha256(b"a").digest()

    run_with_cluster(go, scenario=SCENARIO)


def test_unavailable_nodes_get_no_parts_and_too_few_nodes_is_an_error() -> None:
    async def go(cluster: SimCluster) -> None:
        spec = cluster.scenario.cluster
        down = cluster.nodes[0]
        cluster.network.endpoint(down.node_id).crash()
        await trio.sleep(spec.node_timeout + spec.sweep_interval + 1)
        version = await cluster.gateway.put("default", "f", chunks(payload(30)))
        assert down.node_id not in {p.node.node_id for p in version.parts}
        cluster.network.endpoint(cluster.nodes[1].node_id).crash()
        await trio.sleep(spec.node_timeout + spec.sweep_interval + 1)
        with pytest.raises(NotEnoughNodes):
            await cluster.gateway.put("default", "g", chunks(payload(30)))
        # A new node joins: writes work again and use it.
        joined = await cluster.add_node()
        version = await cluster.gateway.put("default", "g", chunks(payload(30)))
        assert joined.node_id in {p.node.node_id for p in version.parts}

    run_with_cluster(go, scenario=SCENARIO)


def test_storage_nodes_drop_parts_discovery_does_not_know_after_a_grace() -> None:
    async def go(cluster: SimCluster) -> None:
        version = await cluster.gateway.put("default", "kept", chunks(payload(100)))
        node = cluster.nodes[0]
        writer = await node.disk.create("deadbeefdeadbeef.0")  # an orphan: no version knows it
        await writer.write(b"left behind")
        await writer.commit()
        spec = cluster.scenario.cluster
        await trio.sleep(spec.orphan_check_interval + 1)
        assert "deadbeefdeadbeef.0" in node.disk.parts  # still within the grace
        await trio.sleep(spec.orphan_grace + 2 * spec.orphan_check_interval)
        assert "deadbeefdeadbeef.0" not in node.disk.parts
        assert sum(k.startswith(version.version_id) for k in disk_keys(cluster)) == 5
        assert await read(cluster.gateway, "kept") == payload(100)

    run_with_cluster(go, scenario=SCENARIO)


def test_a_stored_part_cannot_be_overwritten() -> None:
    async def go(cluster: SimCluster) -> None:
        version = await cluster.gateway.put("default", "imm", chunks(payload(100)))
        part = version.parts[1]
        node = next(n for n in cluster.nodes if n.node_id == part.node.node_id)
        storage = cluster.network.endpoint(node.node_id).actor
        assert isinstance(storage, StorageNode)
        with pytest.raises(UploadConflict):
            await storage.put_part(part.key, chunks(b"other bytes"))
        assert node.disk.used == sum(len(p.data) for p in node.disk.parts.values())
        assert await read(cluster.gateway, "imm") == payload(100)

    run_with_cluster(go, scenario=SCENARIO)


def test_scrub_quarantines_a_corrupt_part_and_reads_then_fail_cleanly() -> None:
    async def go(cluster: SimCluster) -> None:
        version = await cluster.gateway.put("default", "s", chunks(payload(100)))
        part = version.parts[2]
        node = next(n for n in cluster.nodes if n.node_id == part.node.node_id)
        stored = node.disk.parts[part.key]
        stored.data = stored.data[:-1] + bytes([stored.data[-1] ^ 0xFF])
        storage = cluster.network.endpoint(node.node_id).actor
        assert isinstance(storage, StorageNode)
        report = await storage.scrub()
        assert report.corrupt == (part.key,)
        assert report.checked == 1
        assert part.key in node.disk.quarantined
        # Out of service, the part is gone for good (raid0: no other copy): the same error
        # as a read of the damaged bytes, not a node's failure.
        with pytest.raises(IntegrityError, match="quarantined"):
            await read(cluster.gateway, "s")
        assert (await storage.scrub()).corrupt == ()

    run_with_cluster(go, scenario=SCENARIO)


def spy_on_moves(cluster: SimCluster) -> list[PartPlacement]:
    """Every part placement discovery's store moves (``replace_part``), in order."""
    moved: list[PartPlacement] = []
    store = cluster.store
    original = store.replace_part

    def replace_part(**kwargs: Any) -> PartPlacement:
        placement = original(**kwargs)
        moved.append(placement)
        return placement

    store.replace_part = replace_part  # type: ignore[method-assign]
    return moved


def node_state(cluster: SimCluster, node_id: str) -> NodeState:
    return next(n.state for n in cluster.store.list_nodes() if n.node_id == node_id)


def test_a_crashed_node_fails_only_the_put_it_was_writing_and_is_avoided_at_once() -> None:
    async def go(cluster: SimCluster) -> None:
        gw = cluster.gateway
        cluster.network.crashable = True
        moved = spy_on_moves(cluster)
        paused, resume = trio.Event(), trio.Event()

        async def stalls_mid_body() -> AsyncGenerator[bytes]:
            yield payload(100)  # 5 rows: every node has taken some of its part
            paused.set()
            await resume.wait()
            yield payload(100, 1)

        async def victim() -> None:
            body = stalls_mid_body()
            with pytest.raises(Unavailable):
                await gw.put("default", "victim", body)
            await body.aclose()  # abandoned mid-way: finalised here, not by the collector

        async with trio.open_nursery() as nursery:
            nursery.start_soon(victim)
            await paused.wait()
            (pending,) = cluster.store.versions(VersionState.PENDING)
            dead = pending.parts[0].node.node_id
            crashed_at = trio.current_time()
            cluster.network.endpoint(dead).crash()
            resume.set()

        # Every PUT from now on succeeds, at once: the dead node is suspect and no longer
        # placed, and PUTs placed on it before the report move their part elsewhere.
        async def client(i: int) -> None:
            for j in range(8):
                data = payload(200, 10 * i + j)
                version = await gw.put("default", f"c{i}/{j}", chunks(data), content_length=200)
                assert dead not in {p.node.node_id for p in version.parts}

        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(client, i)
        spec = cluster.scenario.cluster
        assert trio.current_time() - crashed_at < spec.node_timeout / 10
        assert node_state(cluster, dead) is NodeState.SUSPECT
        assert all(p.node.node_id != dead for p in moved)
        for i in range(4):
            assert await read(gw, f"c{i}/7") == payload(200, 10 * i + 7)
        # The failed PUT left nothing behind on the living nodes.
        assert not [k for k in disk_keys(cluster) if k.startswith(pending.version_id)]

    run_with_cluster(go, scenario=SCENARIO)


def test_puts_placed_on_a_dead_node_move_the_part_to_another_node() -> None:
    async def go(cluster: SimCluster) -> None:
        moved = spy_on_moves(cluster)
        dead = cluster.nodes[0].node_id
        cluster.network.endpoint(dead).crash()
        for i in range(10):
            data = payload(150, i)
            version = await cluster.gateway.put("default", f"f{i}", chunks(data))
            assert dead not in {p.node.node_id for p in version.parts}
            assert await read(cluster.gateway, f"f{i}") == data
        # The first PUT met the dead node: its part moved; later ones never chose it.
        assert len(moved) == 1
        assert node_state(cluster, dead) is NodeState.SUSPECT

    run_with_cluster(go, scenario=SCENARIO)


class WholeWriting:
    """The simulated storage port, with a held body's parts stored by ``put_whole_parts``
    (each part's ``put_part`` in turn, its error as its result), as the embedded cluster's
    nodes store them, so that the gateway's way of writing parts together is exercised.
    Every try of a key ending in ``refuse`` is refused as by a full node, after the node
    took its bytes; ``tries`` records each part write, (key, node, "batch" or "alone")."""

    def __init__(self, storage: Any, refuse: str | None = None, times: int = 1 << 30) -> None:
        self.storage = storage
        self.refuse = refuse
        self.times = times  # how many tries are refused
        self.keep = False  # a refused try alone stores the part, then its answer is lost
        self.batches = 0
        self.tries: list[tuple[str, str, str]] = []
        self.read_part = storage.read_part
        self.delete_part = storage.delete_part

    async def put_part(
        self, node: NodeRef, key: str, parts: Any, *, size: int | None = None, how: str = "alone"
    ) -> StoredPart:
        self.tries.append((key, node.node_id, how))
        if self.refuse is not None and key.endswith(self.refuse) and self.times:
            self.times -= 1
            if self.keep and how == "alone":
                await self.storage.put_part(node, key, parts, size=size)
                raise Unavailable(f"{node.node_id} did not answer")
            async for _ in parts:
                pass
            raise DiskFull("no space left on the node")
        stored: StoredPart = await self.storage.put_part(node, key, parts, size=size)
        return stored

    async def put_whole_parts(
        self, parts: list[tuple[NodeRef, str, bytes]]
    ) -> list[StoredPart | Karma8Error]:
        self.batches += 1
        results: list[StoredPart | Karma8Error] = []
        for node, key, data in parts:
            try:
                results.append(await self.put_part(node, key, chunks(data), how="batch"))
            except Karma8Error as exc:
                results.append(exc)
        return results


def test_a_part_written_together_moves_as_often_as_part_retries_allows() -> None:
    async def go(cluster: SimCluster) -> None:
        config = cluster.gateway._config
        storage = WholeWriting(cluster.gateway._storage, refuse=".2")
        gw = Gateway(discovery=cluster.gateway._discovery, storage=storage, config=config)
        with pytest.raises(StorageFailure, match="no space"):
            await gw.put("default", "f", chunks(payload(150)), content_length=150)
        tries = [(node, how) for key, node, how in storage.tries if key.endswith(".2")]
        # The batch was its first try; then as many moves as part_retries, each to a node
        # not tried before, each write from its first piece (the node took them all).
        assert [how for _, how in tries] == ["batch"] + ["alone"] * config.part_retries
        assert len({node for node, _ in tries}) == len(tries)
        assert sum(gw.part_failures.values()) == len(tries)
        # Refused twice, after its nodes took every piece: it moves, whole, and the PUT holds.
        storage.refuse, storage.times = ".3", 2
        version = await gw.put("default", "g", chunks(payload(150, 1)), content_length=150)
        assert await read(gw, "g") == payload(150, 1)
        assert [how for key, _, how in storage.tries if key == f"{version.version_id}.3"] == [
            "batch",
            "alone",
            "alone",
        ]
        # A node that kept the part it took (its answer lost) has it deleted when it moves.
        storage.refuse, storage.times, storage.keep = ".1", 2, True
        version = await gw.put("default", "h", chunks(payload(150, 2)), content_length=150)
        assert await read(gw, "h") == payload(150, 2)
        key = f"{version.version_id}.1"
        tried = [node for k, node, _ in storage.tries if k == key]
        holders = [n.node_id for n in cluster.nodes if key in n.disk.parts]
        assert len(tried) == 3
        assert holders == [tried[-1]]  # the copy left on the second node was deleted

    run_with_cluster(
        go,
        scenario=attrs.evolve(SCENARIO, cluster=attrs.evolve(SCENARIO.cluster, storage_nodes=16)),
    )


def test_parts_written_together_move_off_a_dead_node_as_parts_written_alone_do() -> None:
    async def go(cluster: SimCluster) -> None:
        storage = WholeWriting(cluster.gateway._storage)
        gw = Gateway(
            discovery=cluster.gateway._discovery, storage=storage, config=cluster.gateway._config
        )
        dead = cluster.nodes[0].node_id
        cluster.network.endpoint(dead).crash()
        for i in range(10):
            data = payload(150, i)
            version = await gw.put("default", f"f{i}", chunks(data), content_length=len(data))
            assert dead not in {p.node.node_id for p in version.parts}
            assert await read(gw, f"f{i}") == data
        assert storage.batches == 10
        # The first PUT met the dead node (its part then moved); later ones never chose it.
        assert gw.part_failures == {(dead, "write"): 1}
        assert node_state(cluster, dead) is NodeState.SUSPECT
        # A refusal that is not the node's fault fails the write; what it clashed with stays.
        taken = await gw.stat("default", "f0")
        placed = await gw._discovery.place_upload(namespace="default", name="g", size=150)
        clash = attrs.evolve(placed, parts=(taken.parts[0], *placed.parts[1:]))
        with pytest.raises(StorageFailure, match="already exists"):
            await gw._uploader.write_held(clash, list(clash.parts), payload(150))
        assert await read(gw, "f0") == payload(150, 0)

    run_with_cluster(go, scenario=SCENARIO)


def test_a_full_node_fails_one_put_then_is_not_chosen_until_it_heartbeats_again() -> None:
    async def go(cluster: SimCluster) -> None:
        gw = cluster.gateway
        full = cluster.nodes[0]
        full.disk.full_until = 1e9
        failures: list[str] = []
        for i in range(20):
            try:
                version = await gw.put("default", f"f{i}", chunks(payload(100, i)))
            except StorageFailure as exc:
                failures.append(exc.message)
                continue
            assert full.node_id not in {p.node.node_id for p in version.parts}
        # The node took bytes before it failed (a write fails when full, as on a real disk),
        # so that PUT failed; the node was reported at once and no other PUT chose it.
        assert len(failures) == 1
        assert "no space" in failures[0]
        assert node_state(cluster, full.node_id) is NodeState.SUSPECT
        assert not [k for k in full.disk.parts]
        # Room again: a heartbeat suspect_for after the report makes it available.
        full.disk.full_until = 0.0
        suspect_for = cluster.discovery_config.suspect_for
        await trio.sleep(suspect_for + 2 * cluster.scenario.cluster.heartbeat_interval)
        assert node_state(cluster, full.node_id) is NodeState.AVAILABLE
        version = await gw.put("default", "after", chunks(payload(100)))
        assert full.node_id in {p.node.node_id for p in version.parts}  # the emptiest

    run_with_cluster(go, scenario=SCENARIO)


def test_a_full_disk_shrinks_its_nodes_capacity_so_no_put_even_tries_it() -> None:
    async def go(cluster: SimCluster) -> None:
        gw = cluster.gateway
        await gw.put("default", "before", chunks(payload(100)))
        full = cluster.nodes[0]
        full.disk.full_until = 1e9  # full for a reason that is not karma8's quota
        await trio.sleep(2 * cluster.scenario.cluster.heartbeat_interval)  # a heartbeat tells
        status = next(n for n in cluster.store.list_nodes() if n.node_id == full.node_id)
        assert status.capacity_bytes == full.disk.used  # what it holds, and no more
        for i in range(20):  # none fails: the node is never chosen
            version = await gw.put("default", f"f{i}", chunks(payload(100, i)))
            assert full.node_id not in {p.node.node_id for p in version.parts}
        assert node_state(cluster, full.node_id) is NodeState.AVAILABLE  # full, not failing

    run_with_cluster(go, scenario=SCENARIO)


def test_a_node_that_cannot_read_its_free_space_registers_with_its_quota(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def unreadable(self: MemoryDisk) -> int:
        raise StorageFailure("statvfs failed: Input/output error")

    monkeypatch.setattr(MemoryDisk, "free_bytes", unreadable)

    async def go(cluster: SimCluster) -> None:
        nodes = cluster.store.list_nodes()
        assert len(nodes) == 6  # every node came up
        assert {n.capacity_bytes for n in nodes} == {SCENARIO.cluster.capacity}
        await cluster.gateway.put("default", "f", chunks(payload(100)))

    run_with_cluster(go, scenario=SCENARIO)


def test_the_gateway_extends_the_reservation_as_the_body_arrives() -> None:
    async def go(cluster: SimCluster) -> None:
        config = attrs.evolve(cluster.gateway._config, reserve_step=300, small_file_max=0)
        gw = Gateway(
            discovery=cluster.gateway._discovery, storage=cluster.gateway._storage, config=config
        )
        asked: list[int] = []
        original = cluster.store.extend_reservation

        def extend_reservation(**kwargs: Any) -> None:
            asked.append(kwargs["size"])
            original(**kwargs)

        cluster.store.extend_reservation = extend_reservation  # type: ignore[method-assign]
        data = payload(1000, 3)
        await gw.put("default", "grows", chunks(data, 70), content_length=1000)
        assert asked == [600, 900, 1000]  # each time the body passes what is reserved
        assert await read(gw, "grows") == data
        await gw.put("default", "chunked", chunks(data, 70))  # no length: nothing reserved
        assert asked == [600, 900, 1000]
        assert all(n.reserved_bytes == 0 for n in cluster.store.list_nodes())

    run_with_cluster(go, scenario=SCENARIO)


class OpeningTogether:
    """The simulated storage port, whose part streams open only once every stream of the read
    has begun opening (a read that opened them one after another would wait for ever); a
    stream of a key ending in ``fail`` then refuses to open. Records how each stream ended:
    read to its end, closed by its reader without the rest, or cancelled."""

    def __init__(
        self, storage: Any, expect: int, fail: str | None = None, stall: str | None = None
    ) -> None:
        self.storage = storage
        self.expect = expect
        self.fail = fail
        self.stall = stall  # a key ending so never opens
        self.begun = 0
        self.all_begun = trio.Event()
        self.ends: dict[str, str] = {}
        self.put_part = storage.put_part
        self.delete_part = storage.delete_part

    @asynccontextmanager
    async def read_part(
        self, node: NodeRef, key: str, *, offset: int, length: int, checksum: str | None = None
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        self.begun += 1
        if self.begun == self.expect:
            self.all_begun.set()
        await self.all_begun.wait()
        if self.fail is not None and key.endswith(self.fail):
            raise Unavailable(f"{node.node_id} does not answer")
        if self.stall is not None and key.endswith(self.stall):
            try:
                await trio.sleep_forever()
            finally:
                self.ends[key] = "cancelled while opening"
        try:
            async with self.storage.read_part(
                node, key, offset=offset, length=length, checksum=checksum
            ) as stream:
                yield stream
        except trio.Cancelled:
            self.ends[key] = "cancelled"
            raise
        except BaseException:
            self.ends[key] = "closed by an error"
            raise
        self.ends[key] = "closed"


def test_a_read_opens_its_part_streams_together_and_closes_them_with_it() -> None:
    async def go(cluster: SimCluster) -> None:
        data = payload(1000)
        version = await cluster.gateway.put("default", "f", chunks(data), content_length=1000)
        storage = OpeningTogether(cluster.gateway._storage, expect=5)
        gw = Gateway(
            discovery=cluster.gateway._discovery, storage=storage, config=cluster.gateway._config
        )
        with trio.fail_after(60):  # virtual time: streams opened in turn would never open
            assert await read(gw, "f") == data
        assert storage.begun == 5
        assert set(storage.ends.values()) == {"closed"}
        # A range within one part (a stripe unit is 4 bytes) opens that part alone.
        storage.begun, storage.expect, storage.all_begun = 0, 1, trio.Event()
        with trio.fail_after(60):
            assert await read(gw, "f", 0, 4) == data[0:4]
        assert storage.begun == 1
        # A reader that stops with an error: the streams it held are cancelled, not read on.
        storage.begun, storage.expect, storage.all_begun = 0, 5, trio.Event()
        storage.ends.clear()

        async def stop_reading() -> None:
            async with gw.open_read(version) as stream:
                async for _ in stream:
                    raise ValueError("the reader stops")

        with trio.fail_after(60), pytest.raises(ValueError, match="reader stops"):
            await stop_reading()
        assert set(storage.ends.values()) == {"cancelled"}
        assert len(storage.ends) == 5

    run_with_cluster(go, scenario=SCENARIO)


def test_a_part_that_does_not_open_fails_the_read_and_cancels_the_others() -> None:
    async def go(cluster: SimCluster) -> None:
        version = await cluster.gateway.put(
            "default", "f", chunks(payload(1000)), content_length=1000
        )
        storage = OpeningTogether(cluster.gateway._storage, expect=5, fail=".2")
        gw = Gateway(
            discovery=cluster.gateway._discovery, storage=storage, config=cluster.gateway._config
        )
        failed = version.parts[2].node.node_id
        with pytest.raises(Unavailable, match=f"part 2 of default/f is on node {failed}"):
            with trio.fail_after(60):
                await read(gw, "f")
        assert dict(gw.part_failures) == {(failed, "read"): 1}
        assert len(storage.ends) == 4  # the four that opened, none read to its end
        assert set(storage.ends.values()) == {"cancelled"}
        # The first to fail answers at once: a part still opening is not waited for.
        storage = OpeningTogether(cluster.gateway._storage, expect=5, fail=".2", stall=".4")
        gw = Gateway(
            discovery=cluster.gateway._discovery, storage=storage, config=cluster.gateway._config
        )
        with (
            trio.fail_after(cluster.gateway._config.read_deadline),
            pytest.raises(Unavailable, match="part 2 of default/f"),
        ):
            await read(gw, "f")
        assert storage.ends[f"{version.version_id}.4"] == "cancelled while opening"

    run_with_cluster(go, scenario=SCENARIO)


def test_a_read_cancelled_from_outside_raises_what_it_raised_not_a_group() -> None:
    async def go(cluster: SimCluster) -> None:
        version = await cluster.gateway.put(
            "default", "f", chunks(payload(1000)), content_length=1000
        )
        gw = cluster.gateway

        async def cancelled_while_reading(then: BaseException | None) -> None:
            with trio.CancelScope() as scope:
                async with gw.open_read(version) as stream:
                    await anext(stream)
                    scope.cancel()
                    if then is not None:
                        raise then
                    await trio.sleep(1)

        with trio.CancelScope() as outer:
            try:
                await cancelled_while_reading(None)
            except BaseExceptionGroup:
                pytest.fail("a cancelled read raised a group")
        assert not outer.cancelled_caught
        cause = KeyError("why")
        error = IntegrityError("damaged")
        error.__cause__ = cause
        with pytest.raises(IntegrityError) as raised:
            await cancelled_while_reading(error)
        assert raised.value is error
        assert raised.value.__cause__ is cause

    run_with_cluster(go, scenario=SCENARIO)
