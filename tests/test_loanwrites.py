"""A gateway worker that writes its small uploads' parts itself (karma8/net/loanwrites.py):
over the real pipe, to a real gateway whose nodes lend volumes from real packed stores, and
a discovery that records what it was asked. What is committed reads back from the nodes; what
fails is abandoned and leaves no part; full volumes are given back once idle."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, cast

import attrs
import pytest
import trio

from karma8.actors.gateway import Gateway, GatewayConfig
from karma8.actors.storage import StorageConfig, StorageNode
from karma8.core.errors import InvalidRequest, NotFound, PreconditionFailed, Unavailable
from karma8.core.layout import StripeLayout
from karma8.core.model import FileVersion, NodeRef, PartPlacement, PartReceipt, VersionState
from karma8.net import loanwrites, serve
from karma8.net.loanwrites import LoanDesk, WorkerWrites
from karma8.net.local import LocalFirstStorageClient
from karma8.net.netconfig import NetConfig
from karma8.net.writepipe import ParentWrites, serve_writes
from karma8.ports import DiscoveryAPI, StorageAPI
from karma8.store.groupsync import GroupSync
from karma8.store.tiered import TieredPartStore

from storehelpers import BIG, payload, read

NODES = [f"n{i}" for i in range(6)]
SMALL = 64 << 10  # small_part_max
HELD = 1 << 20  # small_file_max: as by default, held bodies have parts too large to pack


class FakeDiscovery:
    """Places each upload on five nodes (``place_on``, else rotating), commits what it is
    given, and records aborts; ``refuse`` names an if-absent commit refuses."""

    def __init__(self) -> None:
        self.n = 0
        self.place_on: list[str] | None = None
        self.committed: dict[str, FileVersion] = {}
        self.aborted: list[str] = []
        self.leases: dict[str, FileVersion] = {}
        self.refuse: set[str] = set()
        self.reported: list[str] = []

    async def place_upload(
        self, *, namespace: str, name: str, size: int, if_absent: bool = False
    ) -> FileVersion:
        await trio.lowlevel.checkpoint()
        self.n += 1
        version_id = f"{self.n:013x}abcdef01"
        nodes = self.place_on or [NODES[(self.n + i) % len(NODES)] for i in range(5)]
        version = FileVersion(
            version_id=version_id,
            namespace=namespace,
            name=name,
            state=VersionState.PENDING,
            size=size,
            layout=StripeLayout(parts=5, unit=4096),
            parts=tuple(
                PartPlacement(
                    index=i, key=f"{version_id}.{i}", node=NodeRef(node_id=n, url=f"http://{n}")
                )
                for i, n in enumerate(nodes)
            ),
            created_at=1.0,
        )
        self.leases[version_id] = version
        return version

    async def commit_upload(
        self, *, version_id: str, size: int, receipts: list[PartReceipt], if_absent: bool
    ) -> FileVersion:
        await trio.lowlevel.checkpoint()
        version = self.leases.pop(version_id)
        if version.name in self.refuse:
            self.leases[version_id] = version
            raise PreconditionFailed(f"{version.name} exists")
        by_index = {r.index: r for r in receipts}
        committed = attrs.evolve(
            version,
            state=VersionState.COMMITTED,
            committed_at=2.0,
            etag='"e"',
            parts=tuple(
                attrs.evolve(p, size=by_index[p.index].size, checksum=by_index[p.index].checksum)
                for p in version.parts
            ),
        )
        self.committed[version.name] = committed
        return committed

    async def replace_part(
        self, *, version_id: str, index: int, failed_node_id: str
    ) -> PartPlacement:
        await trio.lowlevel.checkpoint()
        version = self.leases[version_id]
        taken = {p.node.node_id for p in version.parts}
        spare = next(n for n in NODES if n not in taken)
        placement = attrs.evolve(
            version.parts[index], node=NodeRef(node_id=spare, url=f"http://{spare}")
        )
        parts = list(version.parts)
        parts[index] = placement
        self.leases[version_id] = attrs.evolve(version, parts=tuple(parts))
        return placement

    async def report_node_failure(self, *, node_id: str, reason: str) -> None:
        await trio.lowlevel.checkpoint()
        self.reported.append(node_id)

    async def abort_upload(self, *, version_id: str) -> FileVersion:
        await trio.lowlevel.checkpoint()
        self.aborted.append(version_id)
        version = self.leases.pop(version_id, None)
        if version is None:
            raise NotFound(version_id)
        return attrs.evolve(version, state=VersionState.ABORTED)


class Parent:
    """A parent process's gateway over six packed stores in ``root``, lending volumes."""

    def __init__(
        self,
        root: Path,
        *,
        capacity: int = BIG,
        small_node: int | None = None,
        volume_size: int = 1 << 30,
    ) -> None:
        group = GroupSync.open(root)
        assert group is not None
        self.stores = {
            node: TieredPartStore(
                root / node,
                capacity_bytes=small_node if small_node and node == "n0" else capacity,
                small_part_max=SMALL,
                group_sync=group,
                volume_size=volume_size,
            )
            for node in NODES
        }
        self.nodes = {
            node: StorageNode(
                node_id=node,
                url=f"http://{node}",
                store=store,
                discovery=cast(Any, None),
                config=StorageConfig(),
            )
            for node, store in self.stores.items()
        }
        self.discovery = FakeDiscovery()
        self.gateway = Gateway(
            discovery=cast(DiscoveryAPI, self.discovery),
            storage=LocalFirstStorageClient(self.nodes, cast(StorageAPI, None)),
            config=GatewayConfig(small_file_max=HELD, cleanup_timeout=5.0),
        )

    async def read(self, version: FileVersion) -> bytes:
        """The file, from its parts on the nodes (raid0: the stripes in order)."""
        parts = [
            b"".join(await read(self.stores[p.node.node_id], p.key, 0, p.size or 0))
            for p in version.parts
        ]
        out = bytearray()
        offsets = [0] * len(parts)
        unit = version.layout.unit
        while any(offsets[i] < len(part) for i, part in enumerate(parts)):
            for i, part in enumerate(parts):
                out += part[offsets[i] : offsets[i] + unit]
                offsets[i] += unit
        return bytes(out)

    def part_keys(self) -> set[str]:
        return {key for store in self.stores.values() for key in store.packed.index.keys()}  # noqa: SIM118

    def close(self) -> None:
        for store in self.stores.values():
            store.close()


@asynccontextmanager
async def worker_of(
    parent: Parent,
    *,
    local: list[str] = NODES,
    volume_size: int = 1 << 20,
    keep_for: float = 60.0,
) -> AsyncIterator[tuple[WorkerWrites, LoanDesk]]:
    with tempfile.TemporaryDirectory(prefix="k8-loan-", dir="/tmp") as directory:
        path = os.path.join(directory, "writes.sock")
        desk = LoanDesk(parent.gateway, keep_for=keep_for)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(serve_writes, body_max=HELD, at_once=8, ops=desk.ops()),
                path,
                parent.gateway,
            )
            pipe = ParentWrites(path)
            writes = WorkerWrites(
                pipe,
                local=local,
                volume_size=volume_size,
                stripe=StripeLayout(parts=5, unit=4096),
                part_max=SMALL,
            )
            try:
                yield writes, desk
            finally:
                await writes.aclose()
                await pipe.aclose()
                nursery.cancel_scope.cancel()


def hold_calls(
    writes: WorkerWrites, which: Callable[[dict[str, Any]], bool]
) -> tuple[trio.Event, trio.Event]:
    """The worker's calls to its parent that ``which`` picks wait, once the first has set
    the first event returned, for the second."""
    pipe = writes._parent
    assert isinstance(pipe, ParentWrites)
    real_call = pipe.call
    held, go = trio.Event(), trio.Event()

    async def call(request: dict[str, Any], data: bytes = b"") -> dict[str, Any]:
        if which({"op": None, "size": None, **request}):
            held.set()
            await go.wait()
        return await real_call(request, data)

    pipe.call = call  # type: ignore[method-assign]
    return held, go


@pytest.fixture
def parent(tmp_path: Path) -> Any:
    made = Parent(tmp_path)
    yield made
    made.close()


async def test_parts_written_by_the_worker_are_committed_and_read_back(parent: Parent) -> None:
    bodies = {f"f{i}": payload(i * 977 + 1, seed=i) for i in range(20)}
    async with worker_of(parent) as (writes, desk):
        async with trio.open_nursery() as nursery:
            for name, body in bodies.items():
                nursery.start_soon(partial(writes.put, "ns", name, body, if_absent=False))
        assert writes.written == len(bodies)
        assert desk.placed == 0
        lent = {node: store.packed.lent for node, store in parent.stores.items()}
        assert all(list(volumes.values()) == [writes.borrower] for volumes in lent.values())
    for name, body in bodies.items():
        version = parent.discovery.committed[name]
        assert await parent.read(version) == body
        for placement in version.parts:
            assert (
                placement.checksum
                == hashlib.sha256(
                    b"".join(
                        await read(
                            parent.stores[placement.node.node_id],
                            placement.key,
                            0,
                            placement.size or 0,
                        )
                    )
                ).hexdigest()
            )
    assert parent.discovery.aborted == []


async def test_a_refused_commit_leaves_nothing_and_says_why(parent: Parent) -> None:
    parent.discovery.refuse.add("taken")
    async with worker_of(parent) as (writes, desk):
        with pytest.raises(PreconditionFailed):
            await writes.put("ns", "taken", payload(5000), if_absent=True)
        assert desk.placed == 0
    assert parent.part_keys() == set()  # adopted, then deleted by the clean-up
    assert len(parent.discovery.aborted) == 1


async def test_a_part_a_node_will_not_adopt_has_the_parent_store_the_body(
    tmp_path: Path,
) -> None:
    parent = Parent(tmp_path, small_node=1000)  # n0 cannot take a part of 2,000 bytes
    try:
        async with worker_of(parent) as (writes, _):
            parent.discovery.place_on = NODES[:5]
            await writes.put("ns", "f", payload(10_000), if_absent=False)
        assert writes.written == 0  # stored by the parent, which moved the part
        assert len(parent.discovery.aborted) == 1  # the worker's placement, given up
        assert parent.discovery.reported == ["n0"]
        version = parent.discovery.committed["f"]
        assert [p.node.node_id for p in version.parts] == ["n5", *NODES[1:5]]
        assert await parent.read(version) == payload(10_000)
        assert parent.part_keys() == {p.key for p in version.parts}
    finally:
        parent.close()


async def test_a_node_of_another_process_sends_the_body_the_old_way(parent: Parent) -> None:
    stored: list[str] = []

    async def put(self: Gateway, namespace: str, name: str, body: Any, **_: Any) -> Any:
        stored.append(name)
        return attrs.evolve(
            await parent.discovery.place_upload(namespace=namespace, name=name, size=3),
            state=VersionState.COMMITTED,
            etag='"e"',
        )

    parent.gateway.put = partial(put, parent.gateway)  # type: ignore[method-assign]
    async with worker_of(parent, local=NODES[:3]) as (writes, desk):
        got = await writes.put("ns", "elsewhere", b"abc", if_absent=False)
        assert desk.placed == 0
    assert got.name == "elsewhere"
    assert stored == ["elsewhere"]
    assert writes.written == 0
    assert len(parent.discovery.aborted) == 1  # the placement it did not use
    assert parent.part_keys() == set()


async def test_a_full_volume_is_given_back_once_idle_and_another_borrowed(
    tmp_path: Path,
) -> None:
    parent = Parent(tmp_path, volume_size=8192)
    try:
        async with worker_of(parent, volume_size=8192) as (writes, _):
            for i in range(12):
                await writes.put("ns", f"f{i}", payload(20_000, seed=i), if_absent=False)
            lent = [store.packed.lent for store in parent.stores.values()]
            assert all(len(volumes) == 1 for volumes in lent)  # only the one in use is out
            volumes = [len(store.packed.volumes) for store in parent.stores.values()]
            assert all(count > 3 for count in volumes)
        for i in range(12):
            version = parent.discovery.committed[f"f{i}"]
            assert await parent.read(version) == payload(20_000, seed=i)
    finally:
        parent.close()


async def test_a_volume_given_back_with_room_is_lent_again(parent: Parent) -> None:
    async with worker_of(parent, volume_size=8192) as (writes, _):  # full for the worker
        for i in range(12):
            await writes.put("ns", f"f{i}", payload(20_000, seed=i), if_absent=False)
    # ... not for the nodes (1 GiB volumes): each lent one of its two again and again.
    assert all(len(store.packed.volumes) <= 3 for store in parent.stores.values())
    for i in range(12):
        assert await parent.read(parent.discovery.committed[f"f{i}"]) == payload(20_000, seed=i)


async def test_bad_frames_are_refused_and_unknown_placements_are_not_committed(
    parent: Parent,
) -> None:
    async with worker_of(parent) as (writes, desk):
        pipe = writes._parent
        assert isinstance(pipe, ParentWrites)
        answer = await pipe.call({"op": "commit", "id": "nope", "size": 1, "borrower": "x"})
        assert answer["error"]["code"] == InvalidRequest.code  # no needles
        answer = await pipe.call(
            {"op": "commit", "id": "nope", "size": 1, "borrower": "x", "written": []}
        )
        assert answer["error"]["code"] == Unavailable.code
        placed = await pipe.call({"op": "place", "namespace": "ns", "name": "a", "size": 10})
        version_id = placed["placed"]["version_id"]
        answer = await pipe.call(
            {"op": "commit", "id": version_id, "size": 10, "borrower": "x", "written": [[1]]}
        )
        assert answer["error"]["code"] == InvalidRequest.code
        assert desk.placed == 0  # taken, and abandoned
        assert version_id in parent.discovery.aborted
        answer = await pipe.call({"op": "place", "namespace": "ns", "name": "a", "size": -1})
        assert answer["error"]["code"] == InvalidRequest.code
        answer = await pipe.call(
            {"op": "place", "namespace": "ns", "name": "big", "size": HELD + 1}
        )
        assert answer["error"]["code"] == InvalidRequest.code
        answer = await pipe.call({"op": "lend", "node": "n9", "url": "", "borrower": "x"})
        assert answer["error"]["code"] == Unavailable.code
        answer = await pipe.call(
            {"op": "give_back", "node": "n0", "url": "", "borrower": "x", "volume": 1, "end": 0}
        )
        assert answer["error"]["code"] == NotFound.code
        assert await pipe.call({"op": "abandon", "id": "gone"}) == {"ok": True}


async def test_a_worker_cancelled_mid_upload_abandons_it(parent: Parent) -> None:
    async with worker_of(parent) as (writes, desk):
        with trio.CancelScope() as scope:
            original = writes._write

            async def write_then_cancel(version: FileVersion, data: bytes, begun: Any) -> Any:
                written = await original(version, data, begun)
                scope.cancel()
                await trio.lowlevel.checkpoint()
                return written

            writes._write = write_then_cancel  # type: ignore[method-assign]
            await writes.put("ns", "gone", payload(3000), if_absent=False)
        assert desk.placed == 0
    assert len(parent.discovery.aborted) == 1
    assert "gone" not in parent.discovery.committed
    assert parent.part_keys() == set()  # never adopted: garbage in the volumes, no part


async def test_a_placement_never_committed_is_forgotten_after_a_while(parent: Parent) -> None:
    async with worker_of(parent, keep_for=0.0) as (writes, desk):
        pipe = writes._parent
        assert isinstance(pipe, ParentWrites)
        first = await pipe.call({"op": "place", "namespace": "ns", "name": "a", "size": 10})
        await pipe.call({"op": "place", "namespace": "ns", "name": "b", "size": 10})
        assert desk.placed == 1  # the worker that placed "a" is gone: its lease has expired
        answer = await pipe.call(
            {
                "op": "commit",
                "id": first["placed"]["version_id"],
                "size": 10,
                "borrower": writes.borrower,
                "written": [[1, 0, 2, "0" * 64]] * 5,
            }
        )
        assert answer["error"]["code"] == Unavailable.code


async def test_uploads_across_full_volumes_all_commit(
    parent: Parent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A volume full for one upload is not given back while another's needles in it wait
    for their commit."""
    bodies = {f"f{i}": payload(20_000, seed=i) for i in range(40)}
    # Each upload borrows at most one volume of a node: with no cap in reach, every one is
    # written here whatever the order its rounds end in (the cap's fallback has its test).
    monkeypatch.setattr(loanwrites, "LOANS_MAX", len(bodies) + 1)
    async with (
        worker_of(parent, volume_size=8192) as (writes, _),
        trio.open_nursery() as nursery,
    ):
        for name, body in bodies.items():
            nursery.start_soon(partial(writes.put, "ns", name, body, if_absent=False))
    assert writes.written == len(bodies)
    for name, body in bodies.items():
        assert await parent.read(parent.discovery.committed[name]) == body


async def test_a_commit_held_back_keeps_its_volume_lent(parent: Parent) -> None:
    async with worker_of(parent, volume_size=8192) as (writes, _):
        held, go = hold_calls(writes, lambda r: r["op"] == "commit" and r["size"] == 20_000)
        parent.discovery.place_on = NODES[:5]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(writes.put, "ns", "x", payload(20_000), if_absent=False))
            await held.wait()
            for i in range(3):  # fill x's volumes and move on to new ones
                await writes.put("ns", f"y{i}", payload(20_001 + i, seed=i), if_absent=False)
            go.set()
    assert await parent.read(parent.discovery.committed["x"]) == payload(20_000)


async def test_a_loan_refused_has_the_parent_store_the_body(
    parent: Parent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loanwrites, "LOANS_MAX", 0)
    async with worker_of(parent) as (writes, desk):
        await writes.put("ns", "f", payload(3000), if_absent=False)
        assert desk.placed == 0
    assert writes.written == 0
    assert len(parent.discovery.aborted) == 1  # the worker's placement
    assert await parent.read(parent.discovery.committed["f"]) == payload(3000)


def test_workers_write_parts_only_where_they_can(monkeypatch: pytest.MonkeyPatch) -> None:
    config = NetConfig()
    readers = {"n0": object()}
    assert serve._writes_parts(config, readers)
    assert not serve._writes_parts(attrs.evolve(config, worker_parts=False), readers)
    assert not serve._writes_parts(attrs.evolve(config, local_calls=False), readers)
    assert not serve._writes_parts(attrs.evolve(config, small_part_max=0), readers)
    assert not serve._writes_parts(config, {})
    monkeypatch.setattr(serve, "can_sync_file_systems", lambda: False)  # no syncfs here
    assert not serve._writes_parts(config, readers)


async def test_an_upload_whose_parts_a_node_would_not_pack_goes_to_the_parent(
    parent: Parent,
) -> None:
    # 400,000 bytes: parts of 80,000, over small_part_max (64 KiB), files on the nodes.
    async with worker_of(parent) as (writes, desk):
        await writes.put("ns", "big", payload(400_000), if_absent=False)
        assert desk.placed == 0
    assert writes.written == 0
    assert parent.discovery.aborted == []  # nothing placed for the worker
    assert await parent.read(parent.discovery.committed["big"]) == payload(400_000)
    assert all(not store.packed.lent for store in parent.stores.values())


async def test_a_loan_whose_caller_is_cancelled_is_still_the_workers(parent: Parent) -> None:
    async with worker_of(parent) as (writes, _):
        lending, go = hold_calls(writes, lambda r: r["op"] == "lend")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(writes.put, "ns", "gone", payload(3000), if_absent=False))
            await lending.wait()
            nursery.cancel_scope.cancel()  # the client left while the loan was asked for
            go.set()
        lent = {v for store in parent.stores.values() for v in store.packed.lent}
        assert lent  # the loan arrived after all, and the worker keeps it for later uploads
        await writes.put("ns", "next", payload(3000), if_absent=False)
        assert {v for store in parent.stores.values() for v in store.packed.lent} >= lent
