"""Fixes to the HTTP stack that streaming storage needs. Each one names its upstream issue
(or, where none exists, the upstream line it works around) and has a test in
tests/test_http_fixes.py that fails without it. The packages are pinned in pyproject.toml
and :func:`check_versions` refuses any other version before a patch is applied.

1. Hypercorn connection handling (0.18). ``TCPServer._close`` runs unshielded: when
   Quart-Trio cancels a handler that answered before reading the body (an early 4xx), the
   socket is never closed and the client hangs. And ``protocol_send`` shields ``send_all``,
   so a client that stops reading blocks shutdown forever. We shield the close and make sends
   cancellable.
   Close: https://github.com/pgjones/hypercorn/issues/106
   Send, no upstream issue: https://github.com/pgjones/hypercorn/blob/0.18.0/src/hypercorn/trio/tcp_server.py#L82-L91

2. Read sizes. Hypercorn and httpcore read at most 64 KiB per socket read; every chunk then
   costs a trip through h11, the ASGI queue and our actors, and that per-chunk work,
   not the bytes, dominated the gateway's CPU time. Both read ``RECEIVE_SIZE`` instead.
   Module constants, not settings: httpcore chose its size in
   https://github.com/encode/httpcore/issues/135; Hypercorn's has no upstream issue.
   https://github.com/pgjones/hypercorn/blob/0.18.0/src/hypercorn/trio/tcp_server.py#L17 and
   https://github.com/encode/httpcore/blob/1.0.9/httpcore/_async/http11.py#L44

3. Body bytes through h11 (0.16). h11's receive buffer is a bytearray: every body chunk is
   copied in, then copied out twice (``maybe_extract_at_most`` slices before it extracts).
   :class:`PassThroughReceiveBuffer` hands a chunk that arrives into an empty buffer and is
   wanted whole straight through, uncopied; anything else (header lines, a chunk split
   between a body and the next request) takes the stock path.
   Upstream: https://github.com/python-hyper/h11/issues/35

4. A connection the client closed is closed at once. Hypercorn starts its keep-alive timer
   when a connection is ready for the next request, and nothing stops it when the client
   then closes: the socket stays in CLOSE-WAIT until the timer runs out. Quart-Trio hid it
   by cancelling its handler on the disconnect; the data-plane routes
   (:mod:`karma8.net.exchange`) do not.
   Reported for the trio worker in https://github.com/pgjones/hypercorn/pull/87, which fixed
   the end-of-file handling; the timer still holds the connection:
   https://github.com/pgjones/hypercorn/blob/0.18.0/src/hypercorn/trio/tcp_server.py#L100-L115

5. HTTP/1.1 only, as documented. Hypercorn switches a cleartext connection to HTTP/2 on a
   prior-knowledge preface or an ``Upgrade: h2c``; its HTTP/2 path crashes the whole process
   on a DATA frame for a stream that was already answered (an early error), and none of the
   fixes above apply to it. The upgrade is ignored (RFC 9110 allows it), and the preface is
   parsed as an HTTP/1.1 request, which fails.
   Upstream: https://github.com/pgjones/hypercorn/pull/365

6. ``100 Continue`` when the app asks for the body. Hypercorn answers ``Expect:
   100-continue`` as soon as the request's headers are parsed, before the app has seen
   them, so a client that waits for it sends its whole body even to a request the app
   rejects on its headers (no such namespace, too large, no access). The 100 goes out when
   the app first calls ``receive()`` instead (as uvicorn and hyper do), and not at all if it
   answered first (h11 then no longer counts the client as waiting). No upstream issue; the
   line: https://github.com/pgjones/hypercorn/blob/0.18.0/src/hypercorn/protocol/h11.py#L155-L160
   Precedent: https://github.com/Kludex/uvicorn/pull/166

7. An answer that closes the connection is sent whole. Once an answer says ``Connection:
   close``, h11 takes any further bytes from the client (a pipelined request, e.g. one
   smuggled after a Transfer-Encoding + Content-Length request) for a protocol error, and
   Hypercorn's reader then closes the socket at once, mid-answer. While an answer is being
   sent, that close waits for its end (Hypercorn closes after it anyway); and a close takes
   the send lock, so its ``send_eof`` never meets another task's ``send_all``, shielded (the
   task that closes may be a Quart-Trio handler being cancelled as its answer ends) and for
   at most ``CLOSE_WAIT`` (a send to a client that stops reading is cut by the close).
   No upstream issue; the lines:
   https://github.com/pgjones/hypercorn/blob/0.18.0/src/hypercorn/protocol/h11.py#L162-L168
   https://github.com/pgjones/hypercorn/blob/0.18.0/src/hypercorn/trio/tcp_server.py#L92-L94

8. A cap on open connections. Hypercorn takes every connection it can accept, so enough
   idle or slow ones hold a descriptor and a task each until the process runs out. A server
   given a cap (:func:`cap_connections`) answers a connection beyond it with a ``503`` and
   ``Retry-After`` and closes it, as uvicorn's ``--limit-concurrency`` does, and logs (at
   most every 10 s) that it did.
   Upstream: https://github.com/pgjones/hypercorn/issues/81

9. A small answer in one send. Hypercorn writes a response's head, each body message and the
   end of the body as separate socket sends (the end is empty with a Content-Length, and is
   still a trip through the send path), so a 4 KiB GET costs three. The head waits for the
   first body bytes (or the end of an empty body) and goes out with them when they are
   small (``COALESCE_MAX``), and an empty end is not sent at all: one send per small answer,
   as aiohttp does (https://github.com/aio-libs/aiohttp/pull/10991). No upstream issue; the
   lines: https://github.com/pgjones/hypercorn/blob/0.18.0/src/hypercorn/protocol/h11.py#L121-L145

10. Connections that move between processes. Hypercorn serves the connections its own
   listeners accept, which it builds from sockets only. A gateway worker hands write
   connections to its parent (:mod:`karma8.net.handoff`): :func:`route_connections` lets a
   route take a connection before Hypercorn reads a byte of it, and
   :func:`connection_handler` serves a stream accepted elsewhere with Hypercorn's own TCP
   server, config and patches (tested in tests/test_handoff.py). Not a fix, so no upstream
   issue; the lines:
   https://github.com/pgjones/hypercorn/blob/0.18.0/src/hypercorn/trio/run.py#L96-L108

11. Methods keep their case. RFC 9110 §9.1: the method token is case-sensitive, and
   ``put`` is not ``PUT``; Hypercorn upper-cases it, so a lowercase ``put`` stored a file
   (and Werkzeug, under the Quart apps, upper-cases it again to match routes). A method
   that is not all upper case is answered ``501 Not Implemented`` before any app sees it,
   as RFC 9110 §15.6.2 says of a method the server does not recognise.
   No upstream issue; the line:
   https://github.com/pgjones/hypercorn/blob/0.18.0/src/hypercorn/protocol/h11.py#L240

13. A request target is a path. Hypercorn passes any target on, and Quart indexes its first
   character: ``GET ?a`` was a ``500`` with a traceback, and ``PUT Xdefault/f`` stored
   ``default/f`` (the first character dropped). A target that is not a path (origin form),
   an absolute ``http(s)://`` URL or ``OPTIONS *`` is answered ``400 invalid_request``
   before any app sees it (RFC 9112 §3.2). No upstream issue; the line:
   https://github.com/pallets/quart/blob/0.22.0/src/quart/asgi.py#L81

12. One keep-alive timer per connection, not one per request. Hypercorn (re)starts its
   keep-alive timer as a new task each time a connection becomes idle (a task spawned
   through a nursery's ``start``, under a lock) and cancels it when the next request
   arrives: two scheduler round trips and a task per request, about a tenth of a gateway
   worker's CPU on small requests. :class:`IdleTimer` keeps one task per connection and
   moves its deadline instead (``keep_alive_timeout`` from now while idle, none while a
   request runs); a graceful shutdown (the context's ``terminated``) still closes a
   connection only while it is idle, as Hypercorn's does. No upstream issue; the lines:
   https://github.com/pgjones/hypercorn/blob/0.18.0/src/hypercorn/trio/tcp_server.py#L92-L98
   https://github.com/pgjones/hypercorn/blob/0.18.0/src/hypercorn/trio/worker_context.py#L24-L38
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import secrets
import weakref
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from typing import Any

import h11
import h11._connection
import httpcore
import trio
from h11._receivebuffer import ReceiveBuffer
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, RawData
from hypercorn.protocol import events as stream_events
from hypercorn.protocol import h11 as h11_protocol
from hypercorn.trio import tcp_server
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, Framework
from hypercorn.utils import wrap_app

from karma8.net.requestlog import accept_request_id

log = logging.getLogger("karma8.net")

RECEIVE_SIZE = 1 << 20
PINNED = {
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


_original_run = tcp_server.TCPServer.run
_original_close = tcp_server.TCPServer._close
_original_protocol_send = tcp_server.TCPServer.protocol_send
_original_read_data = tcp_server.TCPServer._read_data
_original_h11_init = h11_protocol.H11Protocol.__init__
_original_stream_send = h11_protocol.H11Protocol.stream_send
_original_create_stream = h11_protocol.H11Protocol._create_stream


async def _shielded_close(self: Any) -> None:
    with trio.CancelScope(shield=True):
        await _original_close(self)


CLOSE_WAIT = 10.0  # seconds a close waits for a send in progress before it cuts it


async def _cancellable_send(self: Any, event: Any) -> None:
    if isinstance(event, Closed):
        protocol = self.protocol.protocol
        connection = getattr(protocol, "connection", None)
        if (
            isinstance(connection, h11.Connection)
            and connection.our_state is h11.SEND_BODY
            and getattr(protocol, "stream", None) is not None
        ):
            # Bytes after a request answered with "Connection: close" (a pipelined request)
            # are a protocol error to h11, and Hypercorn's reader closes at once, cutting
            # the answer in progress. It is closed when the app is done with its stream
            # (Hypercorn lets go of the stream first, then closes: that close goes ahead).
            return
        # And the close waits for a send in progress (send_eof would meet the app task's
        # send_all: BusyResourceError), shielded: Quart-Trio cancels the handler that sends
        # this Closed once its answer is out, and a close cancelled while it waits for the
        # lock left the socket open for good. A send that holds the lock longer than
        # CLOSE_WAIT (a client that stops reading) is cut by the close instead.
        with trio.CancelScope(shield=True):
            with trio.move_on_after(CLOSE_WAIT) as waited:
                async with self.send_lock:
                    await self._close()
            if waited.cancelled_caught:
                await self._close()
        await self.protocol.handle(Closed())
        return
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
    timer = self.idle_task
    if isinstance(timer, IdleTimer):
        timer.cancel()
    else:
        await timer.stop()


class IdleTimer:
    """Hypercorn's keep-alive timer of one connection (patch 12), in its ``TrioSingleTask``'s
    place: one task for the connection's life, whose deadline :meth:`restart` sets
    ``keep_alive_timeout`` from now (the connection waits for a request) and :meth:`stop`
    lifts (a request runs). At the deadline, or at a graceful shutdown while idle, it closes
    the connection as Hypercorn's ``_idle_timeout`` does."""

    def __init__(self) -> None:
        self._scope = trio.CancelScope()
        self._idle = trio.Event()  # set while the connection waits for a request
        self._timeout: float | None = None
        self._ended = False

    async def restart(self, task_group: Any, action: Callable[[], Awaitable[None]]) -> None:
        # ``action`` is the server's ``_idle_timeout``, bound: its server is what to close.
        if self._timeout is None:
            server = action.__self__  # type: ignore[attr-defined]
            self._timeout = float(server.config.keep_alive_timeout)
            task_group._nursery.start_soon(self._watch, server)
        self._scope.deadline = trio.current_time() + self._timeout
        self._idle.set()

    async def stop(self) -> None:
        self._scope.deadline = math.inf
        if self._idle.is_set():
            self._idle = trio.Event()

    def cancel(self) -> None:
        """End the timer for good: the connection's reader is done."""
        self._ended = True
        self._scope.cancel()

    async def _watch(self, server: Any) -> None:
        while True:
            with self._scope:
                while True:
                    await self._idle.wait()
                    await server.context.terminated.wait()
                    if self._idle.is_set():
                        break  # shut down while idle; while a request runs, once answered
            if self._ended:
                return  # cancel(): the reader ended, and Hypercorn closes the connection
            if not self._scope.cancelled_caught or self._scope.deadline <= trio.current_time():
                break
            # The deadline passed, but a request lifted it (or a restart moved it) before
            # this task ran: a cancelled scope stays cancelled, so watch on with a new one.
            self._scope = trio.CancelScope(deadline=self._scope.deadline)
        with trio.CancelScope(shield=True):
            await server._initiate_server_close()


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


class ContinueOnAskConnection(h11.Connection):
    """h11's server connection, that counts the client as waiting for ``100 Continue`` only
    once the app asked for the body (:attr:`continue_asked`, cleared per request)."""

    continue_asked = False

    @property
    def they_are_waiting_for_100_continue(self) -> bool:
        return self.continue_asked and super().they_are_waiting_for_100_continue


class _AskForContinue:
    """Hypercorn's app wrapper, with a ``receive`` that calls ``ask`` first, once."""

    def __init__(self, app: Any, ask: Callable[[], Awaitable[None]]) -> None:
        self._app = app
        self._ask = ask

    async def __call__(self, scope: Any, receive: Any, send: Any, *args: Any) -> None:
        asked = False

        async def receive_asking() -> Any:
            nonlocal asked
            if not asked:
                asked = True
                await self._ask()
            return await receive()

        await self._app(scope, receive_asking, send, *args)


class _Refusal:
    """In the app's place for a request no app should see (patches 11 and 13): an error
    answer that closes the connection, the body drained while it goes out, as
    :meth:`karma8.net.exchange.Exchange.answer` answers before a body (else Hypercorn's
    full queue of body messages would hold the connection open). A method Hypercorn would
    take for ``HEAD`` gets no body (it drops one, while h11, comparing the bytes sent,
    would wait for it)."""

    def __init__(self, method: str, status: int, code: str, message: str) -> None:
        self._method = method
        self._status = status
        self._code = code
        self._message = message

    async def __call__(self, scope: Any, receive: Any, send: Any, *args: Any) -> None:
        given = next((v for k, v in scope.get("headers", ()) if k == b"x-request-id"), None)
        request_id = accept_request_id(None if given is None else given.decode("latin-1"))
        error = {"error": {"code": self._code, "message": self._message}}
        error["error"]["request_id"] = request_id
        body = b""
        if self._method.upper() != "HEAD":
            body = json.dumps(error, separators=(",", ":"), sort_keys=True).encode() + b"\n"
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"x-request-id", request_id.encode()),
            (b"connection", b"close"),
        ]

        async def drain() -> None:
            while True:
                got = await receive()
                if got["type"] != "http.request" or not got.get("more_body"):
                    return

        async with trio.open_nursery() as nursery:
            await send({"type": "http.response.start", "status": self._status, "headers": headers})
            nursery.start_soon(drain)
            await send({"type": "http.response.body", "body": body, "more_body": False})
            nursery.cancel_scope.cancel()


def _refusal(request: h11.Request) -> _Refusal | None:
    """Why no app may see ``request``, if none should: a method not all upper case (patch
    11), a target that is not a path (patch 13)."""
    method = request.method.decode("ascii")  # h11 took it for a token: ASCII
    if method != method.upper():
        message = f"no method {method!r}: methods are case-sensitive"
        return _Refusal(method, 501, "not_implemented", message)
    target = request.target
    if target.startswith(b"/") or target.lower().startswith((b"http://", b"https://")):
        return None
    if target == b"*" and method == "OPTIONS":
        return None
    shown = target[:100].decode("ascii", "replace")  # h11 took it for visible ASCII
    message = f"the request target must be a path such as /namespace/name, not {shown!r}"
    return _Refusal(method, 400, "invalid_request", message)


def _h11_init_continue_on_ask(self: Any, *args: Any, **kwargs: Any) -> None:
    _original_h11_init(self, *args, **kwargs)
    self.connection = ContinueOnAskConnection(
        h11.SERVER, max_incomplete_event_size=self.config.h11_max_incomplete_size
    )


async def _send_continue(protocol: Any) -> None:
    connection = protocol.connection
    if not isinstance(connection, ContinueOnAskConnection) or connection.continue_asked:
        return
    connection.continue_asked = True
    if connection.they_are_waiting_for_100_continue:
        continue_ = h11.InformationalResponse(
            status_code=100, headers=protocol.config.response_headers("h11")
        )
        await protocol._send_h11_event(continue_)


async def _create_stream_continue_on_ask(self: Any, request: h11.Request) -> None:
    if isinstance(self.connection, ContinueOnAskConnection):
        self.connection.continue_asked = False
    app = self.app
    refusal = _refusal(request)
    if refusal is not None:
        self.app = refusal
    else:
        self.app = _AskForContinue(app, lambda: _send_continue(self))
    try:
        await _original_create_stream(self, request)
    finally:
        self.app = app


class ConnectionCap:
    """At most ``limit`` connections open at once on one server (patch 8)."""

    WARN_EVERY = 10.0

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a connection cap must be at least 1, not {limit}")
        self.limit = limit
        self.open = 0
        self.refused = 0
        self._warned = -math.inf

    def refusal(self) -> bytes:
        """The whole answer to a connection beyond the cap."""
        request_id = secrets.token_hex(8)
        body = (
            json.dumps(
                {
                    "error": {
                        "code": "unavailable",
                        "message": f"the server has {self.limit} connections open"
                        " (max_connections); retry later",
                        "request_id": request_id,
                    }
                },
                separators=(",", ":"),  # as every other answer is written (Exchange.answer_json)
                sort_keys=True,
            ).encode()
            + b"\n"
        )
        head = (
            "HTTP/1.1 503 \r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nretry-after: 1\r\nx-request-id: {request_id}\r\n"
            "connection: close\r\n\r\n"
        )
        return head.encode("latin-1") + body

    def note_refusal(self) -> None:
        self.refused += 1
        now = trio.current_time()
        if now - self._warned >= self.WARN_EVERY:  # an operator should know, not every time
            self._warned = now
            log.warning(
                "%d connections open (max_connections): refusing new ones (%d so far)",
                self.open,
                self.refused,
            )


REFUSAL_TIMEOUT = 1.0  # seconds to hand a refused connection its 503
REFUSAL_DRAIN = 1 << 16  # bytes of a refused connection's request read and dropped
_caps: weakref.WeakKeyDictionary[HypercornConfig, ConnectionCap] = weakref.WeakKeyDictionary()


def cap_connections(config: HypercornConfig, limit: int) -> ConnectionCap:
    """Serve at most ``limit`` connections at once with ``config`` (patch 8)."""
    cap = _caps[config] = ConnectionCap(limit)
    return cap


async def _refuse(stream: trio.SocketStream, answer: bytes) -> None:
    """Send ``answer``, then close without a reset: a socket closed with unread bytes (the
    client's request) sends RST, and the client may lose the answer. So the write side ends
    first and what the client sent is read and dropped (at most REFUSAL_DRAIN bytes, for at
    most REFUSAL_TIMEOUT) until it closes too: a lingering close."""
    with trio.move_on_after(REFUSAL_TIMEOUT), contextlib.suppress(trio.BrokenResourceError):
        await stream.send_all(answer)
        await stream.send_eof()
        drained = 0
        while drained < REFUSAL_DRAIN and (chunk := await stream.receive_some(65536)):
            drained += len(chunk)
    with trio.CancelScope(shield=True):
        await stream.aclose()


async def _capped_run(self: Any) -> None:
    cap = _caps.get(self.config)
    if cap is None:
        await _original_run(self)
        return
    if cap.open >= cap.limit:
        cap.note_refusal()
        await _refuse(self.stream, cap.refusal())
        return
    cap.open += 1
    try:
        route = _routes.get(self.config)
        if route is not None and await route(self.stream):
            return  # taken elsewhere, unread: Hypercorn must not close (or half-close) it
        await _original_run(self)
    finally:
        cap.open -= 1


Route = Callable[[trio.SocketStream], Awaitable[bool]]
_routes: weakref.WeakKeyDictionary[HypercornConfig, Route] = weakref.WeakKeyDictionary()


def route_connections(config: HypercornConfig, route: Route) -> None:
    """Ask ``route`` about each connection served with ``config`` (a capped one) before
    Hypercorn reads it; True: the route took it, and Hypercorn leaves it alone (patch 10)."""
    if config not in _caps:
        raise ValueError("route_connections needs a capped config (cap_connections)")
    _routes[config] = route


def connection_handler(
    app: Framework, config: HypercornConfig
) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """Hypercorn serving ``app`` on a stream accepted elsewhere, as it serves one its own
    listeners accept: its TCP server with ``config``, so with every patch here and the same
    connection cap (patch 10)."""
    check_versions()
    wrapped = wrap_app(app, config.wsgi_max_body_size, None)
    # A context of its own: Hypercorn's (inside its serve) counts requests for its
    # max_requests, which this server leaves unset, and marks a graceful shutdown, which a
    # cancellation (how karma8 stops) does not wait for.
    context = WorkerContext(config.max_requests)
    state = ConnectionState({})  # the lifespan state Quart-Trio's apps never write

    async def handle(stream: trio.SocketStream) -> None:
        # (Annotated as an SSL stream; its own listeners give it plain ones too.)
        server = tcp_server.TCPServer(wrapped, config, context, state, stream)  # type: ignore[arg-type]
        await server.run()

    return handle


COALESCE_MAX = 1 << 16  # body bytes sent with the head in one piece (copied once to join)
_HEAD = "_karma8_head"  # the attribute a protocol keeps a head waiting for its body in


def _h11_bytes(protocol: Any, event: Any) -> bytes | None:
    """``event`` as bytes, as Hypercorn's ``_send_h11_event`` makes them; None where it would
    send nothing (the peer already broke the protocol)."""
    try:
        data: bytes = protocol.connection.send(event)
    except h11.LocalProtocolError:
        if protocol.connection.their_state != h11.ERROR:
            raise
        return None
    return data


async def _coalescing_stream_send(self: Any, event: Any) -> None:
    if isinstance(event, stream_events.Response) and event.status_code >= 200:
        headers = [*event.headers, *self.config.response_headers("h11")]
        if self.keep_alive_requests >= self.config.keep_alive_max_requests:
            headers.append((b"connection", b"close"))
        setattr(
            self,
            _HEAD,
            _h11_bytes(self, h11.Response(headers=headers, status_code=event.status_code)),
        )
        return
    head: bytes | None = getattr(self, _HEAD, None)
    if head is not None:
        setattr(self, _HEAD, None)
        if isinstance(event, stream_events.Body) and len(event.data) <= COALESCE_MAX:
            body = _h11_bytes(self, h11.Data(data=event.data))
            await self.send(RawData(data=head + (body or b"")))
            return
        if isinstance(event, stream_events.EndBody):
            await self.send(RawData(data=head + (_h11_bytes(self, h11.EndOfMessage()) or b"")))
            return
        await self.send(RawData(data=head))
    if isinstance(event, stream_events.EndBody):
        end = _h11_bytes(self, h11.EndOfMessage())
        if end:  # a chunked body's last chunk; nothing to send after a Content-Length body
            await self.send(RawData(data=end))
        return
    await _original_stream_send(self, event)


def patch_h11() -> None:
    """Every h11 connection (Hypercorn's and httpcore's) gets the pass-through buffer."""
    check_versions()
    _replace(h11._connection, "ReceiveBuffer", PassThroughReceiveBuffer)


def patch_hypercorn() -> None:
    """Apply the connection fixes and the read size (idempotent; process-wide)."""
    check_versions()
    patch_h11()
    _replace(tcp_server, "MAX_RECV", RECEIVE_SIZE)
    _replace(tcp_server.TCPServer, "run", _capped_run)
    _replace(h11_protocol.H11Protocol, "stream_send", _coalescing_stream_send)
    _replace(tcp_server.TCPServer, "_close", _shielded_close)
    _replace(tcp_server.TCPServer, "protocol_send", _cancellable_send)
    _replace(tcp_server.TCPServer, "_read_data", _read_data_then_stop_idle_timer)
    _replace(tcp_server, "TrioSingleTask", IdleTimer)
    _replace(h11_protocol.H11Protocol, "_check_protocol", _http11_only)
    _replace(h11_protocol.H11Protocol, "__init__", _h11_init_continue_on_ask)
    _replace(h11_protocol.H11Protocol, "_create_stream", _create_stream_continue_on_ask)


def patch_httpcore() -> None:
    """Read response bodies ``RECEIVE_SIZE`` bytes at a time (idempotent; process-wide)."""
    check_versions()
    patch_h11()
    _replace(httpcore.AsyncHTTP11Connection, "READ_NUM_BYTES", RECEIVE_SIZE)
