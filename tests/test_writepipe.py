"""The pipe a gateway worker sends small uploads to its parent over (karma8/net/writepipe.py):
what the parent's gateway stores or refuses comes back as it is, connections are reused and
dropped when a call is cancelled, and nothing but a frame of a bounded size is taken."""

from __future__ import annotations

import os
import socket
import struct
import tempfile
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, cast

import pytest
import trio
import trio.testing

from karma8.actors.gateway import Gateway, GatewayConfig
from karma8.core.errors import (
    InvalidName,
    Karma8Error,
    PreconditionFailed,
    TooLarge,
    Unavailable,
)
from karma8.core.layout import StripeLayout
from karma8.core.model import FileVersion, StoredVersion, VersionState
from karma8.net import requestlog
from karma8.net.bounds import UploadGate
from karma8.net.objects import ObjectRoutes, new_stats
from karma8.net.writepipe import ParentUnreachable, ParentWrites, serve_writes
from karma8.ports import DiscoveryAPI, StorageAPI

BODY_MAX = 1000


def version(namespace: str, name: str, size: int) -> FileVersion:
    return FileVersion(
        version_id=f"v-{name}",
        namespace=namespace,
        name=name,
        state=VersionState.COMMITTED,
        size=size,
        layout=StripeLayout(parts=5, unit=4096),
        parts=(),
        created_at=1.0,
        committed_at=2.0,
        etag='"e"',
    )


class FakeGateway:
    """Records each upload (and the request id it ran under); ``refuse`` names to refuse;
    ``hold``: uploads wait for it."""

    def __init__(self) -> None:
        self.stored: list[tuple[str, str, bytes, bool, str | None]] = []
        self.refuse: set[str] = set()
        self.crash: set[str] = set()  # names whose upload raises what no route maps
        self.hold: trio.Event | None = None

    async def put(
        self,
        namespace: str,
        name: str,
        body: AsyncIterable[bytes],
        *,
        content_length: int | None = None,
        if_absent: bool = False,
    ) -> FileVersion:
        data = b"".join([chunk async for chunk in body])
        assert content_length == len(data)
        if self.hold is not None:
            await self.hold.wait()
        if name in self.refuse:
            raise PreconditionFailed(f"{namespace}/{name} exists")
        if name in self.crash:
            raise RuntimeError("a bug, or an OSError nobody mapped")
        self.stored.append((namespace, name, data, if_absent, requestlog.current.get()))
        return version(namespace, name, len(data))

    def holds_whole(self, content_length: int | None) -> bool:
        return content_length is not None and content_length <= BODY_MAX

    async def read_held(self, body: AsyncIterable[bytes], content_length: int) -> bytes:
        return b"".join([chunk async for chunk in body])


@asynccontextmanager
async def parent_and_worker(
    gateway: FakeGateway, *, at_once: int = 8, uploads: UploadGate | None = None
) -> AsyncIterator[tuple[ParentWrites, str]]:
    with tempfile.TemporaryDirectory(prefix="k8-pipe-", dir="/tmp") as directory:
        path = os.path.join(directory, "writes.sock")
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(serve_writes, body_max=BODY_MAX, at_once=at_once, uploads=uploads),
                path,
                cast(Gateway, gateway),
            )
            worker = ParentWrites(path)
            try:
                yield worker, path
            finally:
                await worker.aclose()
                nursery.cancel_scope.cancel()


async def test_an_upload_is_stored_by_the_parent_and_its_version_comes_back() -> None:
    gateway = FakeGateway()
    async with parent_and_worker(gateway) as (worker, _):
        token = requestlog.current.set("req-1")
        try:
            got = await worker.put("ns", "a/b.txt", b"hello", if_absent=True)
        finally:
            requestlog.current.reset(token)
        again = await worker.put("ns", "empty", b"", if_absent=False)
    assert got == StoredVersion.of(version("ns", "a/b.txt", 5))
    assert again == StoredVersion.of(version("ns", "empty", 0))
    assert gateway.stored == [
        ("ns", "a/b.txt", b"hello", True, "req-1"),
        ("ns", "empty", b"", False, again_id(gateway)),
    ]
    assert worker.sent == 2


def again_id(gateway: FakeGateway) -> str | None:
    """The id the parent gave a call that came without one: a new one, never None."""
    given = gateway.stored[1][4]
    assert given is not None
    return given


@pytest.mark.parametrize(
    "answer",
    [
        b"{}",
        b'{"version": {"version_id": "v"}}',
        b'{"stored": {"id": "v", "ns": "ns", "name": "f", "size": "3", "etag": null}}',
        b'{"stored": {"id": "v", "ns": "ns", "size": 3, "etag": null}}',
        b'{"stored": ["v"]}',
    ],
)
async def test_an_answer_that_is_neither_a_stored_version_nor_an_error_is_unavailable(
    answer: bytes,
) -> None:
    with tempfile.TemporaryDirectory(prefix="k8-pipe-", dir="/tmp") as directory:
        path = os.path.join(directory, "writes.sock")
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await listener.bind(path)
        listener.listen()

        async def parent() -> None:  # reads one frame, answers ``answer``
            conn, _ = await listener.accept()
            async with trio.SocketStream(conn) as stream:
                head = await stream.receive_some(8)
                json_size, body_size = struct.unpack(">II", head)
                left = json_size + body_size
                while left:
                    left -= len(await stream.receive_some(left))
                await stream.send_all(struct.pack(">I", len(answer)) + answer)

        worker = ParentWrites(path)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(parent)
            with pytest.raises(Unavailable, match="upload"):
                await worker.put("ns", "f", b"abc", if_absent=False)
        await worker.aclose()
        listener.close()


async def test_the_parents_refusal_comes_back_as_the_same_error() -> None:
    gateway = FakeGateway()
    gateway.refuse.add("taken")
    async with parent_and_worker(gateway) as (worker, _):
        with pytest.raises(PreconditionFailed, match="ns/taken exists"):
            await worker.put("ns", "taken", b"x", if_absent=True)
        assert await worker.put("ns", "free", b"x", if_absent=True) is not None  # still open


async def test_the_uploads_the_parent_stores_are_counted_failed_or_not() -> None:
    # For give_back_memory: a failed upload's buffers may sit in reference cycles.
    gateway = FakeGateway()
    gateway.refuse.add("taken")
    uploads = UploadGate(max_uploads=1, idle_timeout=1.0)
    async with parent_and_worker(gateway, uploads=uploads) as (worker, _):
        await worker.put("ns", "free", b"x", if_absent=True)
        with pytest.raises(PreconditionFailed):
            await worker.put("ns", "taken", b"x", if_absent=True)
    assert (uploads.ended, uploads.failed, uploads.in_flight) == (2, 1, 0)


async def test_calls_in_turn_share_a_connection_and_concurrent_ones_open_more() -> None:
    gateway = FakeGateway()
    async with parent_and_worker(gateway) as (worker, _):
        for i in range(3):
            await worker.put("ns", f"s{i}", b"x", if_absent=False)
        assert len(worker._idle) == 1
        gateway.hold = trio.Event()
        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(partial(worker.put, "ns", f"c{i}", b"y", if_absent=False))
            await trio.testing.wait_all_tasks_blocked()
            gateway.hold.set()
        assert len(worker._idle) == 4
    assert sorted(s[1] for s in gateway.stored) == ["c0", "c1", "c2", "c3", "s0", "s1", "s2"]


async def test_a_cancelled_call_closes_its_connection_and_later_calls_open_another(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = FakeGateway()
    gateway.hold = trio.Event()
    async with parent_and_worker(gateway) as (worker, _):
        with trio.move_on_after(5) as scope:  # virtual time: the clock jumps when all wait
            await worker.put("ns", "late", b"x", if_absent=False)
        assert scope.cancelled_caught
        assert worker._idle == []  # its answer would come on it: never reused
        gateway.hold.set()
        got = await worker.put("ns", "next", b"z", if_absent=False)
    assert got.name == "next"


async def test_with_no_parent_nothing_is_sent() -> None:
    with tempfile.TemporaryDirectory(prefix="k8-pipe-", dir="/tmp") as directory:
        worker = ParentWrites(os.path.join(directory, "writes.sock"))
        with pytest.raises(ParentUnreachable):
            await worker.put("ns", "a", b"x", if_absent=False)
    assert worker.sent == 0


async def test_a_body_over_the_bound_closes_the_connection_and_fails_the_call() -> None:
    gateway = FakeGateway()
    async with parent_and_worker(gateway) as (worker, _):
        with pytest.raises(Unavailable, match="did not answer"):
            await worker.put("ns", "big", b"x" * (BODY_MAX + 1), if_absent=False)
        assert (await worker.put("ns", "ok", b"x" * BODY_MAX, if_absent=False)).size == BODY_MAX
    assert [s[1] for s in gateway.stored] == ["ok"]


@pytest.mark.parametrize(
    "frame",
    [
        struct.pack(">II", 5, 0) + b"notjs",
        struct.pack(">II", 2, 0) + b"[]",
        struct.pack(">II", 1 << 20, 0),  # a JSON longer than any request's
        struct.pack(">II", 13, 0) + b'{"name": "x"}',  # no namespace
    ],
)
async def test_anything_but_a_frame_closes_that_connection_only(frame: bytes) -> None:
    gateway = FakeGateway()
    async with parent_and_worker(gateway) as (worker, path):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.connect(path)
            raw.sendall(frame)
            raw.settimeout(30)  # a guard against a hang, not a speed limit
            assert await trio.to_thread.run_sync(raw.recv, 10) == b""  # closed, no answer
        assert (await worker.put("ns", "after", b"x", if_absent=False)).name == "after"
    assert [s[1] for s in gateway.stored] == ["after"]


async def test_a_burst_of_new_connections_to_the_parent_all_get_stored() -> None:
    # More connections at once than the parent's backlog once held: a full backlog is EAGAIN
    # on a Unix socket's connect, which trio took for "in progress" (found by review).
    gateway = FakeGateway()
    failures: list[BaseException] = []
    async with parent_and_worker(gateway) as (worker, _):

        async def one(i: int) -> None:
            try:
                await worker.put("ns", f"b{i}", b"x", if_absent=False)
            except (Unavailable, ParentUnreachable) as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            for i in range(300):
                nursery.start_soon(one, i)
    assert failures == []
    assert len(gateway.stored) == 300


async def test_an_unexpected_error_in_the_parent_is_a_500_and_the_parent_goes_on() -> None:
    gateway = FakeGateway()
    gateway.crash.add("boom")
    async with parent_and_worker(gateway) as (worker, _):
        with pytest.raises(Karma8Error) as caught:
            await worker.put("ns", "boom", b"x", if_absent=False)
        assert (caught.value.code, caught.value.message) == ("internal", "internal error")
        assert (await worker.put("ns", "after", b"x", if_absent=False)).name == "after"


async def test_the_parent_stores_at_most_at_once_uploads_together() -> None:
    gateway = FakeGateway()
    gateway.hold = trio.Event()
    async with parent_and_worker(gateway, at_once=2) as (worker, _):
        running: list[str] = []
        real_put = gateway.put

        async def counted(*args: Any, **kwargs: Any) -> FileVersion:
            running.append(args[1])
            return await real_put(*args, **kwargs)

        gateway.put = counted  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(partial(worker.put, "ns", f"w{i}", b"x", if_absent=False))
            await trio.testing.wait_all_tasks_blocked()
            assert len(running) == 2  # the others wait, their bodies unread
            gateway.hold.set()
    assert len(gateway.stored) == 5


async def test_a_small_put_over_max_file_size_is_refused_before_its_body_is_read() -> None:
    own = Gateway(
        discovery=cast(DiscoveryAPI, None),
        storage=cast(StorageAPI, None),
        config=GatewayConfig(max_file_size=10, small_file_max=BODY_MAX),
    )
    read: list[bool] = []

    async def body() -> AsyncIterator[bytes]:
        read.append(True)
        yield b"x" * 20

    async def app(*_: object) -> None:
        raise AssertionError("not an object route")

    async with parent_and_worker(FakeGateway()) as (worker, _):
        routes = ObjectRoutes(own, new_stats(), app, parent=worker)
        with pytest.raises(TooLarge):
            await routes._store("ns", "f", body(), content_length=20, if_absent=False)
    assert read == []
    assert worker.sent == 0


async def test_a_worker_without_its_parent_stores_the_upload_itself() -> None:
    # The parent is unreachable (nothing sent): the worker's own gateway stores it.
    own = FakeGateway()

    async def app(*_: object) -> None:
        raise AssertionError("not an object route")

    with tempfile.TemporaryDirectory(prefix="k8-pipe-", dir="/tmp") as directory:
        routes = ObjectRoutes(
            cast(Gateway, own),
            new_stats(),
            app,
            parent=ParentWrites(os.path.join(directory, "writes.sock")),
        )

        async def body() -> AsyncIterator[bytes]:
            yield b"abc"

        got = await routes._store("ns", "f", body(), content_length=3, if_absent=False)
        with pytest.raises(InvalidName):  # checked before the body is read or sent
            await routes._store("ns", "", body(), content_length=3, if_absent=False)
    assert got.name == "f"
    assert [s[:3] for s in own.stored] == [("ns", "f", b"abc")]
