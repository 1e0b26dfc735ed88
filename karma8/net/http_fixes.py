"""Two fixes to the HTTP stack that streaming storage needs (Quart 0.22, Quart-Trio 0.12,
Hypercorn 0.18; versions pinned in pyproject.toml and asserted here).

1. Request-body backpressure. Stock Quart drains every ASGI body message into an unbounded
   buffer, so a 300 MiB PUT to a slow handler costs 300 MiB of RAM (measured: 43 -> 344 MiB
   RSS). :class:`BoundedBody` makes Quart's receiver wait while more than ``HIGH_WATER`` bytes
   are buffered; Hypercorn's bounded per-request queue then fills, its reader stops, and TCP
   flow control slows the client. Memory per request stays bounded by the stripe row.

2. Hypercorn connection handling. ``TCPServer._close`` runs unshielded: when Quart-Trio
   cancels a handler that answered before reading the body (an early 4xx), the socket is
   never closed and the client hangs. And ``protocol_send`` shields ``send_all``, so a client
   that stops reading blocks shutdown forever. We shield the close and make sends cancellable.
"""

from __future__ import annotations

from collections.abc import Generator
from importlib.metadata import version
from typing import Any

import trio
from hypercorn.events import Closed, RawData
from hypercorn.trio import tcp_server
from quart.wrappers import Response
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection
from quart_trio.wrappers.request import TrioBody, TrioRequest

HIGH_WATER = 1 << 20
PINNED = {"quart": "0.22.0", "quart-trio": "0.12.0", "hypercorn": "0.18.0"}


def check_versions() -> None:
    wrong = {name: version(name) for name, want in PINNED.items() if version(name) != want}
    if wrong:
        raise RuntimeError(f"karma8.net patches {PINNED}; installed {wrong}")


class BoundedBody(TrioBody):
    """A request body that holds at most ``HIGH_WATER`` unread bytes."""

    def __init__(self, expected_content_length: int | None, max_content_length: int | None) -> None:
        super().__init__(expected_content_length, max_content_length)
        self._space = trio.Event()
        self._unbounded = False  # a whole-body read (get_json) must not throttle
        self._discard = False  # the view returned: unread bytes are dropped

    async def wait_for_space(self) -> None:
        while not self._unbounded and not self._discard and len(self._data) >= HIGH_WATER:
            self._space = trio.Event()
            await self._space.wait()

    def append(self, data: bytes) -> None:
        if not self._discard:
            super().append(data)

    async def __anext__(self) -> bytes:
        try:
            chunk: bytes = await super().__anext__()
            return chunk
        finally:
            self._space.set()

    def __await__(self) -> Generator[Any, None, Any]:
        self._unbounded = True
        self._space.set()
        return super().__await__()

    def stop(self) -> None:
        self._discard = True
        self._data.clear()
        self._space.set()


class BoundedRequest(TrioRequest):
    body_class = BoundedBody


class BoundedConnection(TrioASGIHTTPConnection):
    async def handle_messages(  # type: ignore[override]
        self, nursery: trio.Nursery, request: Any, receive: Any
    ) -> None:
        body = request.body
        while True:
            if isinstance(body, BoundedBody):
                await body.wait_for_space()
            message = await receive()
            if message["type"] == "http.request":
                body.append(message.get("body", b""))
                if not message.get("more_body", False):
                    body.set_complete()
            elif message["type"] == "http.disconnect":
                break
        nursery.cancel_scope.cancel()

    async def handle_request(  # type: ignore[override]
        self, nursery: trio.Nursery, request: Any, send: Any
    ) -> None:
        try:
            response = await self.app.handle_request(request)
        finally:
            if isinstance(request.body, BoundedBody):
                request.body.stop()
        timeout = (
            response.timeout
            if isinstance(response, Response) and response.timeout is not Ellipsis
            else self.app.config["RESPONSE_TIMEOUT"]
        )
        with trio.move_on_after(timeout if timeout is not None else float("inf")):
            await self._send_response(send, response)
        nursery.cancel_scope.cancel()


def install_backpressure(app: QuartTrio) -> None:
    """Make ``app`` stream request bodies with bounded buffering, without size limits."""
    app.asgi_http_class = BoundedConnection
    app.request_class = BoundedRequest
    app.config["MAX_CONTENT_LENGTH"] = None  # limits are enforced by the actors, streaming
    app.config["BODY_TIMEOUT"] = None
    app.config["RESPONSE_TIMEOUT"] = None


_original_close = tcp_server.TCPServer._close
_original_protocol_send = tcp_server.TCPServer.protocol_send


async def _shielded_close(self: Any) -> None:
    with trio.CancelScope(shield=True):
        await _original_close(self)


async def _cancellable_send(self: Any, event: Any) -> None:
    if not isinstance(event, RawData):
        await _original_protocol_send(self, event)
        return
    async with self.send_lock:
        try:
            await self.stream.send_all(event.data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            with trio.CancelScope(shield=True):
                await self.stream.aclose()
            await self.protocol.handle(Closed())
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                await self.stream.aclose()
            raise


def patch_hypercorn() -> None:
    """Apply the connection fixes (idempotent; process-wide)."""
    check_versions()
    setattr(tcp_server.TCPServer, "_close", _shielded_close)  # noqa: B010
    setattr(tcp_server.TCPServer, "protocol_send", _cancellable_send)  # noqa: B010
