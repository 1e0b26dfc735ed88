"""Stand-ins for the data-plane routes' tests at the ASGI level (tests/test_exchange.py,
tests/test_objects.py): Hypercorn's side of one request, and a gateway and a storage node
whose bodies are scripted.

:class:`FakeServer` hands messages to the app through a queue of 10, as Hypercorn does, and
puts the disconnect into that queue once the response has ended.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, cast

import trio
from hypercorn.typing import ASGIReceiveEvent, ASGISendEvent, HTTPScope

from karma8.actors.gateway import Gateway, GatewayConfig
from karma8.actors.storage import StorageConfig, StorageNode
from karma8.core.access import Right
from karma8.core.errors import NotFound, StorageFailure
from karma8.core.layout import StripeLayout
from karma8.core.model import FileVersion, VersionState
from karma8.core.names import check_name, check_namespace
from karma8.ports import DiscoveryAPI, StorageAPI, StoredPart
from karma8.sim.disk import MemoryDisk

BIG = 1 << 30

CHUNK = b"x" * 65536
QUEUE = 10  # Hypercorn's max_app_queue_size
# A guard against a hang, in virtual time (the autojump clock): reached only if every task
# waits for something that never comes.
HANG = 60

Headers = list[tuple[bytes, bytes]]


def http_scope(
    method: str, path: str, headers: Headers, version: str = "1.1", query: bytes = b""
) -> HTTPScope:
    scope = {"type": "http", "http_version": version, "method": method, "path": path}
    return cast(HTTPScope, scope | {"headers": headers, "query_string": query})


class FakeServer:
    """Hypercorn's side of one request."""

    def __init__(self, *, leave_after: int | None = None) -> None:
        self._to_app, self._app_side = trio.open_memory_channel[ASGIReceiveEvent](QUEUE)
        self.sent: list[ASGISendEvent] = []
        self.closed = False
        self.leave_after = leave_after  # the client disconnects after this many body messages
        self.body_messages = 0  # request body messages the client got into the queue

    async def receive(self) -> ASGIReceiveEvent:
        return await self._app_side.receive()

    async def send(self, message: ASGISendEvent) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body" and not message["more_body"]:
            await self.disconnect()  # the stream closed: the app is told through its queue
        elif len(self.bodies()) == self.leave_after:
            await self.disconnect()

    async def disconnect(self) -> None:
        self.closed = True
        await self._to_app.send({"type": "http.disconnect"})

    async def request(self, body: bytes = b"", *, more: bool = False) -> None:
        await self._to_app.send({"type": "http.request", "body": body, "more_body": more})
        self.body_messages += 1

    async def keep_sending(self, limit: int = 10 * QUEUE) -> None:
        """A client streaming a body that does not end; the queue stays full while nobody
        reads. After ``limit`` chunks it waits (so that a test whose app reads them all
        fails instead of spinning)."""
        for _ in range(limit):
            if self.closed:
                return
            await self.request(CHUNK, more=True)

    async def send_body(self, count: int) -> None:
        """A client sending a body of ``count`` chunks, as fast as the queue takes them."""
        for i in range(count):
            await self.request(CHUNK, more=i < count - 1)

    @property
    def calls(self) -> tuple[Any, Any]:
        """``receive`` and ``send``, as an ASGI app is called with them."""
        return self.receive, self.send

    @property
    def status(self) -> int:
        assert self.sent[0]["type"] == "http.response.start"
        return self.sent[0]["status"]

    def header(self, name: bytes) -> bytes | None:
        start = self.sent[0]
        assert start["type"] == "http.response.start"
        return dict(start["headers"]).get(name)

    def bodies(self) -> list[dict[str, Any]]:
        return [dict(m) for m in self.sent if m["type"] == "http.response.body"]

    def body(self) -> bytes:
        return b"".join(m["body"] for m in self.bodies())


class Chunks:
    """A download of :data:`CHUNK`s that does not end, or fails after ``fail_after`` chunks;
    ``open`` counts the streams open."""

    def __init__(self, fail_after: int | None) -> None:
        self.fail_after = fail_after
        self.open = 0
        self.endings: list[str] = []  # each stream's: "closed", or "given up" (an exception)

    @asynccontextmanager
    async def stream(self) -> AsyncIterator[AsyncIterator[bytes]]:
        self.open += 1
        ending = "given up"
        try:
            yield self._chunks()
            ending = "closed"
        finally:
            self.open -= 1
            self.endings.append(ending)

    async def _chunks(self) -> AsyncIterator[bytes]:
        for sent in range(100 * QUEUE):
            await trio.lowlevel.checkpoint()
            if sent == self.fail_after:
                raise StorageFailure("a part failed its check")
            yield CHUNK
        # Then it waits: a test whose download goes on fails (its deadline) instead of spinning.
        await trio.sleep_forever()


class StubGateway(Gateway):
    """A gateway whose every file is one huge file (but ``missing``) served by ``chunks``,
    and whose upload checks the names, then reads the body into ``received`` once
    ``may_read`` is set."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__(
            discovery=cast(DiscoveryAPI, None),
            storage=cast(StorageAPI, None),
            config=GatewayConfig(),
        )
        self.chunks = Chunks(fail_after)
        self.may_read = trio.Event()
        self.may_read.set()
        self.received = bytearray()
        self.stored = 0

    async def authorize(self, namespace: str, token: str | None, right: Right) -> None:
        check_namespace(namespace)  # every namespace is public here
        await trio.lowlevel.checkpoint()

    async def stat(self, namespace: str, name: str) -> FileVersion:
        await trio.lowlevel.checkpoint()
        if name == "missing":
            raise NotFound(f"no file {namespace}/{name}")
        return FileVersion(
            version_id="v1",
            namespace=namespace,
            name=name,
            state=VersionState.COMMITTED,
            size=BIG,
            layout=StripeLayout(),
            parts=(),
            created_at=0.0,
            etag='"e"',
        )

    @asynccontextmanager
    async def open_read(
        self, version: FileVersion, *, start: int = 0, stop: int | None = None
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        async with self.chunks.stream() as chunks:
            yield chunks

    async def put(
        self,
        namespace: str,
        name: str,
        body: AsyncIterable[bytes],
        *,
        content_length: int | None = None,
        if_absent: bool = False,
    ) -> FileVersion:
        check_namespace(namespace)  # as the gateway does, before it reads the body
        check_name(name)
        await self.may_read.wait()
        async for chunk in body:
            self.received += chunk
        self.stored += 1
        return await self.stat(namespace, name)


class StubNode(StorageNode):
    """A storage node on an in-memory disk, with a huge part ``big.0`` served by ``chunks``;
    its uploads wait for ``may_read`` and count what they read into ``received``."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.disk = MemoryDisk(capacity_bytes=BIG, rng=random.Random(0), sleep=trio.sleep)
        super().__init__(
            node_id="node-1",
            url="",
            store=self.disk,
            discovery=cast(DiscoveryAPI, None),
            config=StorageConfig(),
        )
        self.chunks = Chunks(fail_after)
        self.may_read = trio.Event()
        self.may_read.set()
        self.received = bytearray()

    @property
    def stored(self) -> int:
        return len(self.disk.parts)

    async def stat_part(self, key: str) -> StoredPart | None:
        if key == "big.0":
            return StoredPart(key=key, size=BIG, checksum="0" * 64)
        return await super().stat_part(key)

    def read_part(
        self, key: str, *, offset: int, length: int
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        if key == "big.0":
            return self.chunks.stream()
        return super().read_part(key, offset=offset, length=length)

    async def put_part(self, key: str, chunks: AsyncIterable[bytes]) -> StoredPart:
        await self.may_read.wait()

        async def counted() -> AsyncIterator[bytes]:
            async for chunk in chunks:
                self.received += chunk
                yield chunk

        return await super().put_part(key, counted())
