"""The gateway's object routes at the ASGI level, against a stand-in for Hypercorn.

What Quart-Trio used to do for these routes (drain a body it did not read, stop a download
whose client left, cut a body short on a failed read) is checked here with the server side
played by :class:`FakeServer`, which hands messages to the app through a queue of 10, as
Hypercorn does, and puts the disconnect into that queue once the response has ended.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest
import trio
import trio.testing
from hypercorn.typing import ASGIReceiveEvent, ASGISendEvent, HTTPScope, Scope

from karma8.actors.gateway import Gateway, GatewayConfig
from karma8.core.errors import StorageFailure
from karma8.core.layout import StripeLayout
from karma8.core.model import FileVersion, VersionState
from karma8.net.objects import ObjectRoutes, object_path
from karma8.ports import DiscoveryAPI, StorageAPI

BIG = 1 << 30
CHUNK = b"x" * 65536
# A guard against a hang, in virtual time (the autojump clock): reached only if every task
# waits for something that never comes.
HANG = 60


def http_scope(
    method: str, path: str, headers: list[tuple[bytes, bytes]], version: str = "1.1"
) -> HTTPScope:
    scope = {"type": "http", "http_version": version, "method": method, "path": path}
    return cast(HTTPScope, scope | {"headers": headers})


class FakeServer:
    """Hypercorn's side of one request."""

    def __init__(self, *, leave_after: int | None = None) -> None:
        self._to_app, self._app_side = trio.open_memory_channel[ASGIReceiveEvent](10)
        self.sent: list[ASGISendEvent] = []
        self.closed = False
        self.leave_after = leave_after  # the client disconnects after this many body messages

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

    async def keep_sending(self) -> None:
        """A client streaming a body without end; the queue stays full while nobody reads."""
        while not self.closed:
            await self.request(CHUNK, more=True)

    @property
    def status(self) -> int:
        assert self.sent[0]["type"] == "http.response.start"
        return self.sent[0]["status"]

    def bodies(self) -> list[dict[str, Any]]:
        return [dict(m) for m in self.sent if m["type"] == "http.response.body"]


class StubGateway(Gateway):
    """A gateway with one huge file whose stream never ends, or fails after ``fail_after``
    chunks."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__(
            discovery=cast(DiscoveryAPI, None),
            storage=cast(StorageAPI, None),
            config=GatewayConfig(),
        )
        self.fail_after = fail_after
        self.streams_open = 0

    async def stat(self, namespace: str, name: str) -> FileVersion:
        await trio.lowlevel.checkpoint()
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
        self.streams_open += 1
        try:
            yield self._chunks()
        finally:
            self.streams_open -= 1

    async def _chunks(self) -> AsyncIterator[bytes]:
        sent = 0
        while True:
            await trio.lowlevel.checkpoint()
            if sent == self.fail_after:
                raise StorageFailure("a part failed its check")
            sent += 1
            yield CHUNK


class BodyReader(StubGateway):
    """A gateway whose upload reads the whole body into ``received`` (and stores nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.received = b""

    async def put(
        self,
        namespace: str,
        name: str,
        body: AsyncIterable[bytes],
        *,
        content_length: int | None = None,
        if_absent: bool = False,
    ) -> FileVersion:
        async for chunk in body:
            self.received += chunk
        return await self.stat(namespace, name)


async def not_ours(scope: Scope, receive: Any, send: Any) -> None:
    raise AssertionError(f"{scope.get('path')} went to Quart")


def routes(gateway: Gateway, stats: dict[str, int] | None = None) -> ObjectRoutes:
    return ObjectRoutes(gateway, stats or {"gets": 0, "puts": 0, "read_errors": 0}, not_ours)


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("/default/a.txt", ("default", "a.txt")),
        ("/default/dir/sub/a", ("default", "dir/sub/a")),
        ("/default//a", ("default", "/a")),  # the gateway rejects the name, with a 400
        ("/default/", None),  # the listing
        ("/default", None),
        ("/metrics", None),
        ("/", None),
        ("//a", None),
    ],
)
def test_which_paths_are_objects(path: str, target: tuple[str, str] | None) -> None:
    assert object_path(path) == target


async def test_other_routes_go_to_the_app() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        seen.append(cast(dict[str, str], scope).get("path", scope["type"]))

    objects = ObjectRoutes(StubGateway(), {}, app)
    server = FakeServer()
    for path in ("/default/", "/metrics", "/healthz"):
        await objects(http_scope("GET", path, []), server.receive, server.send)
    await objects(cast(Scope, {"type": "lifespan"}), server.receive, server.send)
    assert seen == ["/default/", "/metrics", "/healthz", "lifespan"]
    assert server.sent == []


async def test_an_early_answer_drains_the_body_it_did_not_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The namespace is refused before the body is read. Hypercorn puts the disconnect into
    # the request's queue once the answer has ended; with the queue full of unread body and
    # nobody reading, that would wait forever.
    server = FakeServer()
    headers = [(b"content-length", str(BIG).encode())]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.keep_sending)
        await trio.testing.wait_all_tasks_blocked()  # the queue is full
        with trio.fail_after(HANG):
            await routes(StubGateway())(
                http_scope("PUT", "/Bad NS/x", headers), server.receive, server.send
            )
        nursery.cancel_scope.cancel()
    assert server.status == 400
    assert b"invalid_name" in server.bodies()[-1]["body"]


async def test_a_download_stops_when_the_client_goes_away(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = StubGateway()
    server = FakeServer(leave_after=3)
    await server.request()  # a GET: its (empty) body is complete
    with trio.fail_after(HANG):
        await routes(gateway)(http_scope("GET", "/default/big", []), server.receive, server.send)
    assert server.status == 200
    assert all(body["more_body"] for body in server.bodies())  # never ended as complete
    assert gateway.streams_open == 0


async def test_a_read_that_fails_mid_stream_cuts_the_body_short(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stats = {"gets": 0, "puts": 0, "read_errors": 0}
    gateway = StubGateway(fail_after=2)
    server = FakeServer()
    await server.request()
    with trio.fail_after(HANG):
        await routes(gateway, stats)(
            http_scope("GET", "/default/big", []), server.receive, server.send
        )
    assert server.status == 200
    bodies = server.bodies()
    assert [len(b["body"]) for b in bodies] == [len(CHUNK), len(CHUNK)]
    assert all(body["more_body"] for body in bodies)  # Hypercorn closes: a short body
    assert stats == {"gets": 1, "puts": 0, "read_errors": 1}
    assert gateway.streams_open == 0


async def test_a_body_that_ends_with_a_disconnect_fails_the_put_without_an_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = FakeServer()
    await server.request(b"abc", more=True)
    await server.disconnect()
    stats = {"gets": 0, "puts": 0, "read_errors": 0}
    with trio.fail_after(HANG):
        await routes(BodyReader(), stats)(
            http_scope("PUT", "/default/x", [(b"content-length", b"10")]),
            server.receive,
            server.send,
        )
    assert server.sent == []  # nobody to answer
    assert stats["puts"] == 0


async def test_an_http2_body_without_a_length_is_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # HTTP/2 has no chunked coding: a body of unknown size comes with neither header.
    gateway = BodyReader()
    server = FakeServer()
    await server.request(b"abc", more=True)
    await server.request(b"def")
    with trio.fail_after(HANG):
        await routes(gateway)(
            http_scope("PUT", "/default/x", [], version="2"), server.receive, server.send
        )
    assert gateway.received == b"abcdef"
    assert server.status == 201
