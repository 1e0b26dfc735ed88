"""Fixes to the HTTP stack that streaming storage needs (Quart 0.22, Quart-Trio 0.12,
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

3. Read sizes. Hypercorn receives at most 64 KiB per socket read and httpcore reads response
   bodies 64 KiB at a time. Every chunk then costs a trip through h11, the ASGI queue, Quart
   and our actors; at 1 MiB per read the per-chunk work is paid 16 times less often (profiled:
   the per-chunk overhead, not the bytes, dominated the gateway's CPU time).

4. Body bytes through h11 (0.16, asserted). h11's receive buffer is a bytearray: every body
   chunk is copied in, then copied out twice (``maybe_extract_at_most`` slices before it
   extracts), each copy a fresh 1 MiB allocation (profiled: a quarter of the gateway's event
   loop during a large PUT). :class:`PassThroughReceiveBuffer` hands a chunk that arrives
   into an empty buffer and is wanted whole straight through, uncopied; anything else (header
   lines, a chunk split between a body and the next request) takes the stock path.

5. A connection the client closed is closed at once. Hypercorn starts its keep-alive timer
   (75 s) when a connection is ready for the next request, and nothing stops it when the
   client then closes: the socket stayed in CLOSE-WAIT until the timer ran out (1,000 GETs
   on a connection each left ~210 such sockets behind). Quart-Trio hid it by cancelling its
   handler on the disconnect; the gateway's object routes (:mod:`karma8.net.objects`) do not.

6. HTTP/1.1 only, as documented. Hypercorn switches a cleartext connection to HTTP/2 on a
   prior-knowledge preface or an ``Upgrade: h2c``; its HTTP/2 path crashes the whole process
   on a DATA frame for a stream that was already answered (an early error), and none of the
   fixes above apply to it. The upgrade is ignored (RFC 9110 allows it), and the preface is
   parsed as an HTTP/1.1 request, which fails.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Generator
from importlib.metadata import version
from typing import Any

import h11._connection
import httpcore
import trio
from h11._receivebuffer import ReceiveBuffer
from hypercorn.events import Closed, RawData
from hypercorn.protocol import h11 as h11_protocol
from hypercorn.trio import tcp_server
from quart.wrappers import Response
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection
from quart_trio.wrappers.request import TrioBody, TrioRequest
from werkzeug.exceptions import RequestEntityTooLarge

HIGH_WATER = 1 << 20
RECEIVE_SIZE = 1 << 20
PINNED = {"quart": "0.22.0", "quart-trio": "0.12.0", "hypercorn": "0.18.0", "h11": "0.16.0"}


def check_versions() -> None:
    wrong = {name: version(name) for name, want in PINNED.items() if version(name) != want}
    if wrong:
        raise RuntimeError(f"karma8.net patches {PINNED}; installed {wrong}")


class BoundedBody(TrioBody):
    """A request body that holds at most ``HIGH_WATER`` unread bytes.

    Chunks are kept as received (a deque of ``bytes``) and handed out as they are: stock
    Quart copies every byte twice (into a bytearray, then out with ``bytes()``).
    """

    def __init__(self, expected_content_length: int | None, max_content_length: int | None) -> None:
        super().__init__(expected_content_length, max_content_length)
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._space = trio.Event()
        self._unbounded = False  # a whole-body read (get_json) must not throttle
        self._discard = False  # the view returned: unread bytes are dropped

    async def wait_for_space(self) -> None:
        while not self._unbounded and not self._discard and self._buffered >= HIGH_WATER:
            self._space = trio.Event()
            await self._space.wait()

    def append(self, data: bytes) -> None:
        if self._discard or not data or self._must_raise is not None:
            return
        self._chunks.append(data if type(data) is bytes else bytes(data))
        self._buffered += len(data)
        self._has_data.set()
        if self._max_content_length is not None and self._buffered > self._max_content_length:
            self._must_raise = RequestEntityTooLarge()
            self.set_complete()

    async def __anext__(self) -> bytes:
        try:
            if self._must_raise is not None:
                raise self._must_raise
            while not self._chunks and not self._complete.is_set():
                self._has_data.clear()
                await self._has_data.wait()
            if not self._chunks:
                raise StopAsyncIteration
            chunk = self._chunks.popleft()
            self._buffered -= len(chunk)
            return chunk
        finally:
            self._space.set()

    def __await__(self) -> Generator[Any, None, Any]:
        self._unbounded = True
        self._space.set()
        if self._must_raise is not None:
            raise self._must_raise
        yield from self._complete.wait().__await__()
        if self._must_raise is not None:
            raise self._must_raise
        data = b"".join(self._chunks)
        self._chunks.clear()
        if data:
            self._chunks.append(data)
        return data

    def clear(self) -> None:
        self._chunks.clear()
        self._buffered = 0

    def stop(self) -> None:
        self._discard = True
        self.clear()
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
_original_read_data = tcp_server.TCPServer._read_data


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


async def _read_data_then_stop_idle_timer(self: Any) -> None:
    await _original_read_data(self)
    # The client closed: no request can follow, so the keep-alive timer must not hold the
    # connection (and its socket) open until it runs out.
    await self.idle_task.stop()


async def _http11_only(self: Any, event: h11.Request) -> None:
    """Stands in for Hypercorn's switch to HTTP/2 (an h2c upgrade or a prior-knowledge
    preface): the request goes on as HTTP/1.1."""


class PassThroughReceiveBuffer(ReceiveBuffer):
    """h11's receive buffer, with a chunk that is wanted whole passed through uncopied.

    A ``bytes`` chunk added to an empty buffer is parked as it is. Extracting at most as many
    bytes as it holds (a body read) returns that very object; every other operation first
    moves it into the bytearray and runs h11's own code.
    """

    def __init__(self) -> None:
        super().__init__()
        self._parked: bytes | None = None

    def _unpark(self) -> None:
        if self._parked is not None:
            self._data += self._parked
            self._parked = None

    def __iadd__(self, byteslike: bytes | bytearray) -> PassThroughReceiveBuffer:
        if self._parked is None and not self._data and type(byteslike) is bytes:
            self._parked = byteslike
        else:
            self._unpark()
            self._data += byteslike
        return self

    def __len__(self) -> int:
        return len(self._data) + (0 if self._parked is None else len(self._parked))

    def __bytes__(self) -> bytes:
        self._unpark()
        return super().__bytes__()

    def maybe_extract_at_most(self, count: int) -> bytearray | None:
        parked = self._parked
        if parked is not None and len(parked) <= count:
            self._parked = None
            self._next_line_search = 0
            self._multiple_lines_search = 0
            # bytes, where h11 annotates bytearray: its Data events take any bytes-like.
            return parked  # type: ignore[return-value]
        self._unpark()
        return super().maybe_extract_at_most(count)

    def maybe_extract_next_line(self) -> bytearray | None:
        self._unpark()
        return super().maybe_extract_next_line()

    def maybe_extract_lines(self) -> list[bytearray] | None:
        self._unpark()
        return super().maybe_extract_lines()

    def is_next_line_obviously_invalid_request_line(self) -> bool:
        self._unpark()
        return super().is_next_line_obviously_invalid_request_line()


def patch_h11() -> None:
    """Every h11 connection (Hypercorn's and httpcore's) gets the pass-through buffer."""
    check_versions()
    setattr(h11._connection, "ReceiveBuffer", PassThroughReceiveBuffer)  # noqa: B010


def patch_hypercorn() -> None:
    """Apply the connection fixes and the read size (idempotent; process-wide)."""
    check_versions()
    patch_h11()
    setattr(tcp_server, "MAX_RECV", RECEIVE_SIZE)  # noqa: B010
    setattr(tcp_server.TCPServer, "_close", _shielded_close)  # noqa: B010
    setattr(tcp_server.TCPServer, "protocol_send", _cancellable_send)  # noqa: B010
    setattr(tcp_server.TCPServer, "_read_data", _read_data_then_stop_idle_timer)  # noqa: B010
    setattr(h11_protocol.H11Protocol, "_check_protocol", _http11_only)  # noqa: B010


def patch_httpcore() -> None:
    """Read response bodies ``RECEIVE_SIZE`` bytes at a time (idempotent; process-wide)."""
    patch_h11()
    setattr(httpcore.AsyncHTTP11Connection, "READ_NUM_BYTES", RECEIVE_SIZE)  # noqa: B010
