"""Fixes to the HTTP stack that streaming storage needs. Each one names its upstream issue
(or, where none exists, the upstream line it works around) and has a test in
tests/test_http_fixes.py or tests/test_http_api.py. The packages are pinned in pyproject.toml
and :func:`check_versions` refuses any other version before a patch is applied.

1. Request-body backpressure (Quart 0.22, Quart-Trio 0.12). Quart appends every ASGI body
   message to an unbounded buffer, so a large PUT to a slow handler is held in RAM.
   :class:`BoundedBody` makes Quart's receiver wait while more than ``HIGH_WATER`` bytes are
   buffered; Hypercorn's bounded per-request queue then fills, its reader stops, and TCP flow
   control slows the client. Installed through the app's settings, not patched.
   No upstream issue; the buffer: https://github.com/pallets/quart/blob/0.22.0/src/quart/wrappers/request.py#L104-L107
   and its reader: https://github.com/pgjones/quart-trio/blob/0.12.0/src/quart_trio/asgi.py#L36

2. Hypercorn connection handling (0.18). ``TCPServer._close`` runs unshielded: when
   Quart-Trio cancels a handler that answered before reading the body (an early 4xx), the
   socket is never closed and the client hangs. And ``protocol_send`` shields ``send_all``,
   so a client that stops reading blocks shutdown forever. We shield the close and make sends
   cancellable.
   Close: https://github.com/pgjones/hypercorn/issues/106
   Send, no upstream issue: https://github.com/pgjones/hypercorn/blob/0.18.0/src/hypercorn/trio/tcp_server.py#L82-L91

3. Read sizes. Hypercorn and httpcore read at most 64 KiB per socket read; every chunk then
   costs a trip through h11, the ASGI queue, Quart and our actors, and that per-chunk work,
   not the bytes, dominated the gateway's CPU time. Both read ``RECEIVE_SIZE`` instead.
   No upstream issue (module constants, not settings):
   https://github.com/pgjones/hypercorn/blob/0.18.0/src/hypercorn/trio/tcp_server.py#L17 and
   https://github.com/encode/httpcore/blob/1.0.9/httpcore/_async/http11.py#L44

4. Body bytes through h11 (0.16). h11's receive buffer is a bytearray: every body chunk is
   copied in, then copied out twice (``maybe_extract_at_most`` slices before it extracts).
   :class:`PassThroughReceiveBuffer` hands a chunk that arrives into an empty buffer and is
   wanted whole straight through, uncopied; anything else (header lines, a chunk split
   between a body and the next request) takes the stock path.
   Upstream: https://github.com/python-hyper/h11/issues/35

5. A connection the client closed is closed at once. Hypercorn starts its keep-alive timer
   when a connection is ready for the next request, and nothing stops it when the client
   then closes: the socket stays in CLOSE-WAIT until the timer runs out. Quart-Trio hid it
   by cancelling its handler on the disconnect; the gateway's object routes
   (:mod:`karma8.net.objects`) do not.
   Reported for the trio worker in https://github.com/pgjones/hypercorn/pull/87, which fixed
   the end-of-file handling; the timer still holds the connection:
   https://github.com/pgjones/hypercorn/blob/0.18.0/src/hypercorn/trio/tcp_server.py#L100-L115

6. HTTP/1.1 only, as documented. Hypercorn switches a cleartext connection to HTTP/2 on a
   prior-knowledge preface or an ``Upgrade: h2c``; its HTTP/2 path crashes the whole process
   on a DATA frame for a stream that was already answered (an early error), and none of the
   fixes above apply to it. The upgrade is ignored (RFC 9110 allows it), and the preface is
   parsed as an HTTP/1.1 request, which fails.
   Upstream: https://github.com/pgjones/hypercorn/pull/365
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
PINNED = {
    "quart": "0.22.0",
    "quart-trio": "0.12.0",
    "hypercorn": "0.18.0",
    "h11": "0.16.0",
    "httpcore": "1.0.9",
}


def check_versions() -> None:
    """Refuse to patch any version but the ones the patches were written for."""
    wrong = {name: version(name) for name, want in PINNED.items() if version(name) != want}
    if wrong:
        raise RuntimeError(f"karma8.net patches {PINNED}; installed {wrong}")


def _replace(owner: object, name: str, value: object) -> None:
    """Set ``owner.name``, which must exist: a renamed upstream name fails loudly."""
    if not hasattr(owner, name):
        raise RuntimeError(f"karma8.net patches {owner!r}.{name}, which no longer exists")
    setattr(owner, name, value)


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
    check_versions()
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
    _replace(h11._connection, "ReceiveBuffer", PassThroughReceiveBuffer)


def patch_hypercorn() -> None:
    """Apply the connection fixes and the read size (idempotent; process-wide)."""
    check_versions()
    patch_h11()
    _replace(tcp_server, "MAX_RECV", RECEIVE_SIZE)
    _replace(tcp_server.TCPServer, "_close", _shielded_close)
    _replace(tcp_server.TCPServer, "protocol_send", _cancellable_send)
    _replace(tcp_server.TCPServer, "_read_data", _read_data_then_stop_idle_timer)
    _replace(h11_protocol.H11Protocol, "_check_protocol", _http11_only)


def patch_httpcore() -> None:
    """Read response bodies ``RECEIVE_SIZE`` bytes at a time (idempotent; process-wide)."""
    check_versions()
    patch_h11()
    _replace(httpcore.AsyncHTTP11Connection, "READ_NUM_BYTES", RECEIVE_SIZE)
