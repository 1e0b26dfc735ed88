"""The data plane: one way to read and write HTTP bodies, for every role.

The gateway's object routes (:mod:`karma8.net.objects`) and a storage node's part routes
(:mod:`karma8.net.parts`) carry the bytes; both are :class:`ExchangeRoutes`, plain ASGI put
in front of their role's Quart-Trio app the way Quart documents middleware
(``app.asgi_app = ...``). Quart keeps the JSON control routes. Quart's per-request machinery
cost the event loop more than storing a small file did, and its request body buffered
(docs/architecture.md, "Net mode").

An :class:`Exchange` is one request and its answer:

- **Backpressure.** The body is read as its consumer asks for it; meanwhile Hypercorn's
  queue of a request's messages (10) fills, its reader stops and TCP slows the client.
- **A client that goes away.** Mid-body, the next read raises :class:`ClientGone`, the
  consumer cleans up, and no answer is sent. Mid-download, a watcher ends the stream. Once
  the whole body is in, nothing is cancelled: the work finishes and the answer is dropped.
- **An answer before the body was read** (an error). The rest of the body is drained while
  the answer goes out: Hypercorn hands the request its disconnect through the same queue,
  and with the queue full and nobody reading, that connection would hang.

:class:`ExchangeRoutes` matches a path, checks the cluster secret, picks the handler by
method (``OPTIONS`` and ``405`` name the others in ``Allow``) and answers a
:class:`~karma8.core.errors.Karma8Error` as its JSON error body.
"""

from __future__ import annotations

import abc
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Collection, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, TypeVar, cast
from urllib.parse import parse_qsl, unquote

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope

from karma8.core.errors import Forbidden, InvalidName, InvalidRequest, Karma8Error
from karma8.net import requestlog
from karma8.net.codec import error_body, error_headers, error_status
from karma8.net.metrics import METRICS
from karma8.net.requestlog import accept_request_id, log_access

ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
T = TypeVar("T")

SECRET_HEADER = "X-Karma8-Secret"
JSON_TYPE = (b"content-type", b"application/json")
OCTETS_TYPE = (b"content-type", b"application/octet-stream")
METHOD_NOT_ALLOWED = {"error": {"code": "method_not_allowed", "message": "method not allowed here"}}
INTERNAL_ERROR = {"error": {"code": "internal", "message": "internal error"}}

REQUEST_ID_HEADER = b"x-request-id"
CLOSE = (b"connection", b"close")
# What a client is told of a 5xx: the cause (a node's address, a peer's message) is in the
# log, under the request id. An error with a ``public`` message is told that instead (a read
# names the part, the file and the node id it could not read); a 503 not_enough_nodes is told
# as it is: its message is counts ("need 7 storage nodes with 2 bytes free, have 6 ..."),
# what a client acts on.
PUBLIC_5XX = {
    "storage_failure": "a storage node failed",
    "integrity_error": "stored data failed a check",
    "unavailable": "a cluster service did not answer",
    "disk_full": "a storage node is full",
}
TOLD_AS_IS = frozenset({"not_enough_nodes"})
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})?")
_ABSOLUTE = re.compile(rb"(?i)https?://[^/?#]*")

# HTTP responses of at most this many bytes are read whole before the status line goes out
# (one body write, and a failure is an error status rather than a body cut short); larger
# ones stream, so memory per request stays bounded either way.
WHOLE_BODY_BYTES = 64 * 1024


async def read_whole(opened: AbstractAsyncContextManager[AsyncIterator[bytes]]) -> bytes:
    """Open a stream of chunks, read it to the end and close it: a small response's body."""
    async with opened as chunks:
        return b"".join([chunk async for chunk in chunks])


class FirstThen:
    """``first``, then the rest of ``rest``: a streamed body whose first chunk was read
    before the status line, so that a read failing at once is an error status rather than
    a body cut short. (An iterator class, as the reads' own chunks are: an abandoned async
    generator would close its streams only when collected.)"""

    def __init__(self, first: bytes, rest: AsyncIterator[bytes]) -> None:
        self._first: bytes | None = first
        self._rest = rest

    def __aiter__(self) -> FirstThen:
        return self

    async def __anext__(self) -> bytes:
        if self._first is not None:
            first, self._first = self._first, None
            if first:
                return first
        return await self._rest.__anext__()


def check_secret(given: str | None, secret: str) -> None:
    """Raise :class:`Forbidden` unless ``given`` is the cluster secret (compared in constant
    time)."""
    if not hmac.compare_digest((given or "").encode(), secret.encode()):
        raise Forbidden("missing or wrong cluster secret")


def int_value(name: str, raw: str | None, default: int | None = None) -> int:
    """Query parameter ``name`` (``raw``, None if absent) as a non-negative integer."""
    if raw is None:
        if default is None:
            raise InvalidRequest(f"query parameter {name!r} is required")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"query parameter {name!r} must be an integer") from None
    if value < 0:
        raise InvalidRequest(f"query parameter {name!r} must not be negative")
    return value


_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def query_args(
    query: bytes, known: Collection[str] | None = None, *, hint: str = ""
) -> dict[str, str]:
    """A query string's parameters, read as strictly as a path: every ``%`` starts two hex
    digits, the decoded bytes are UTF-8, and no name is given twice (which one would count
    is a guess); with ``known``, no other name (``hint`` ends that error's message). ``+``
    is a space, as in an HTML form. Raises InvalidRequest saying which rule the query
    broke."""
    if not query:
        return {}
    if _BAD_ESCAPE.search(query):
        raise InvalidRequest("the query string has a '%' that is not followed by two hex digits")
    try:
        pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise InvalidRequest("the query string is not UTF-8 text once percent-decoded") from None
    args: dict[str, str] = {}
    for name, value in pairs:
        if known is not None and name not in known:
            what = f"known: {', '.join(sorted(known))}" if known else "it takes none"
            raise InvalidRequest(f"unknown query parameter {name!r} ({what}{hint})")
        if name in args:
            raise InvalidRequest(f"query parameter {name!r} is given more than once")
        args[name] = value
    return args


def origin_form(raw_path: bytes) -> bytes:
    """The path of an absolute-form request target (``http://host/ns/name``), or
    ``raw_path`` as it is (origin-form). RFC 9112 §3.2.2: a server must accept both."""
    absolute = _ABSOLUTE.match(raw_path)
    if absolute is None:
        return raw_path
    return raw_path[absolute.end() :] or b"/"


def decode_path(raw_path: bytes) -> str:
    """Percent-decode a request path strictly (RFC 3986 §2.1): a ``%`` not followed by two
    hex digits, or bytes that are not UTF-8 once decoded, raise :class:`InvalidName`, so two
    different paths never name the same file (Hypercorn's ``unquote`` turns both into text).
    """

    def unescape(match: re.Match[bytes]) -> bytes:
        if match.group(1) is None:
            at = match.start()
            raise InvalidName(
                f"invalid percent-encoding at byte {at} of the path: '%' must be followed by"
                " two hex digits (write '%25' for '%')"
            )
        return bytes([int(match.group(1), 16)])

    decoded = _ESCAPE.sub(unescape, raw_path)
    try:
        return decoded.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidName(
            f"the path is not UTF-8 once percent-decoded (byte 0x{decoded[exc.start]:02x}"
            f" at {exc.start})"
        ) from None


def smuggling_risk(headers: Mapping[str, str]) -> bool:
    """Whether a request has both Transfer-Encoding and Content-Length: RFC 9112 §6.1 asks
    a server to reject it or close after it; h11 lets Transfer-Encoding win and keeps the
    connection, so a proxy that framed it by Content-Length would disagree on where the
    next request starts."""
    return "transfer-encoding" in headers and "content-length" in headers


class ClientGone(InvalidRequest):
    """The client closed the connection before the request body ended."""


class Exchange:
    """One request on a data-plane route: its headers and body, and the answer.

    Iterating over it yields the request body's chunks as they arrive.
    """

    __slots__ = (
        "_body_done",
        "_query",
        "_receive",
        "_scope",
        "_send",
        "gone",
        "headers",
        "received",
        "request_id",
        "sent",
        "started",
        "status",
    )

    def __init__(
        self,
        scope: HTTPScope,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
        request_id: str = "",
    ):
        self._scope = scope
        self._receive = receive
        self._send = send
        self._query: dict[str, str] | None = None
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:  # names arrive lower-case (h11)
            name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self.headers = headers
        # The client's X-Request-Id if sane, else a new one (karma8.net.requestlog); of
        # several, the first (as the control routes take it: a sane id has no comma).
        given = headers.get("x-request-id")
        first = None if given is None else given.split(",", 1)[0].strip()
        self.request_id = request_id or accept_request_id(first)
        # Whether every message of the request body has been received. An HTTP/1 request
        # without a body (most GETs) has one message, which the queue always has room for;
        # elsewhere (HTTP/2 frames a body of unknown size without either header) the
        # messages tell.
        self._body_done = (
            scope["http_version"].startswith("1")
            and headers.get("content-length", "0") == "0"
            and "transfer-encoding" not in headers
        )
        self.gone = False  # the client closed the connection mid-body
        self.started = False  # the status line is on its way: errors can no longer be answered
        self.status: int | None = None  # of the answer, once started
        self.sent = 0  # body bytes handed to the server
        self.received = 0  # body bytes read

    def content_length(self) -> int | None:
        raw = self.headers.get("content-length")
        if raw is None:
            return None
        if not raw.isdigit():
            raise InvalidRequest("Content-Length must be a non-negative integer")
        return int(raw)

    @property
    def query_string(self) -> bytes:
        """The request target's query, as sent (without the ``?``)."""
        query: bytes = self._scope.get("query_string", b"")
        return query

    def int_arg(self, name: str, default: int | None = None) -> int:
        """Query parameter ``name`` as a non-negative integer (``default`` if absent)."""
        if self._query is None:
            self._query = {}
            raw = self._scope.get("query_string", b"").decode("latin-1")
            for key, value in parse_qsl(raw, keep_blank_values=True):
                self._query.setdefault(key, value)  # the first one counts, as in Quart
        return int_value(name, self._query.get(name), default)

    def __aiter__(self) -> Exchange:
        return self

    async def __anext__(self) -> bytes:
        """The request body's next chunk, as the consumer asks for it (backpressure).

        Raises:
            ClientGone: the client closed the connection before the body ended.
        """
        while not self._body_done:
            message = await self._receive()
            if message["type"] != "http.request":
                self._body_done = self.gone = True
                raise ClientGone("the client closed the connection before the body ended")
            self._body_done = not message["more_body"]
            if message["body"]:
                self.received += len(message["body"])
                return message["body"]
        raise StopAsyncIteration

    async def start(self, status: int, headers: Headers) -> None:
        self.started = True
        self.status = status
        headers = [*headers, (REQUEST_ID_HEADER, self.request_id.encode())]
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def write(self, chunk: bytes, *, more: bool = True) -> None:
        self.sent += len(chunk)
        await self._send({"type": "http.response.body", "body": chunk, "more_body": more})

    async def answer(self, status: int, headers: Headers, body: bytes = b"") -> None:
        """Send a whole answer. Before the request body ended (an error), the answer says
        ``Connection: close`` and goes out at once: the rest of the body is not waited for,
        only drained while the answer is written, so that Hypercorn's queue of messages
        has room for the disconnect (with the queue full and nobody reading, the
        connection would hang). The drain starts after the status line, so it never
        calls for a ``100 Continue``."""
        if self._body_done:
            await self.start(status, headers)
            await self.write(body, more=False)
            return
        async with trio.open_nursery() as nursery:
            await self.start(status, [*headers, CLOSE])
            nursery.start_soon(self._drain)
            await self.write(body, more=False)
            nursery.cancel_scope.cancel()

    async def answer_json(self, status: int, value: Any, headers: Headers | None = None) -> None:
        # As Quart writes JSON (the control routes): compact, keys sorted, a newline at the end.
        body = json.dumps(value, separators=(",", ":"), sort_keys=True).encode() + b"\n"
        length = (b"content-length", str(len(body)).encode())
        await self.answer(status, [JSON_TYPE, length, *(headers or [])], body)

    async def stream(self, chunks: AsyncIterable[bytes]) -> bool:
        """After :meth:`start`, send ``chunks`` as the body, until they end (True) or the
        client goes away (False: it returns early, and the chunks are not read further).

        Raises:
            Karma8Error: reading a chunk failed. The body's last message was not sent, so
                Hypercorn closes the connection and the client gets a short body.
        """
        failure: Karma8Error | None = None
        ended = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._until_gone, nursery.cancel_scope)
            try:
                async for chunk in chunks:
                    await self.write(chunk)
                ended = True
            except Karma8Error as exc:
                failure = exc
            nursery.cancel_scope.cancel()
        if ended:
            # The last message outside the watch on the client: sending it ends the stream,
            # which tells the app "disconnect", and the watch, woken by it, would cancel the
            # rest of this send, Hypercorn's close of a `Connection: close` connection
            # included (the client then waits for an end that never comes).
            await self.write(b"", more=False)
        if failure is not None:
            raise failure
        return ended

    async def _drain(self) -> None:
        while not self._body_done:
            message = await self._receive()
            self._body_done = message["type"] != "http.request" or not message["more_body"]

    async def _until_gone(self, scope: trio.CancelScope) -> None:
        while (await self._receive())["type"] == "http.request":
            pass
        scope.cancel()


Handler = Callable[[Exchange, T], Awaitable[None]]


async def _refuse_websocket(
    scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
) -> None:
    """A request to upgrade to WebSocket: ``400`` with the usual JSON error, where the server
    lets an app answer one with HTTP (Hypercorn does), else the handshake is refused."""
    await receive()  # websocket.connect
    extensions = cast(dict[str, Any], scope.get("extensions") or {})
    if "websocket.http.response" not in extensions:
        await send({"type": "websocket.close", "code": 1003, "reason": ""})
        return
    request_id = requestlog.accept_request_id(None)
    error = InvalidRequest(
        "karma8 does not speak WebSocket: send the request without 'Upgrade: websocket'"
    )
    body = json.dumps(
        {"error": {**error_body(error)["error"], "request_id": request_id}}, separators=(",", ":")
    )
    data = (body + "\n").encode()
    await send(
        {
            "type": "websocket.http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                (b"x-request-id", request_id.encode()),
            ],
        }
    )
    await send({"type": "websocket.http.response.body", "body": data, "more_body": False})
    log_access("GET", str(scope.get("path", "")), 400, len(data), time.perf_counter(), request_id)


class ExchangeRoutes(abc.ABC, Generic[T]):
    """ASGI middleware: serves the requests whose path :meth:`match` claims, hands every
    other request to ``app``.

    ``handlers`` maps a method to its handler, called with the exchange and what
    :meth:`match` returned. With ``secret``, every claimed request must carry it in
    ``X-Karma8-Secret`` (checked before the method, as the Quart routes do).

    The edge is strict (docs/http-api.md, "Requests"): an absolute-form target is served
    as its path; a path that is not strictly percent-encoded UTF-8, or a request with both
    Transfer-Encoding and Content-Length, is a 400 that closes the connection. Every answer
    carries ``X-Request-Id``; a 5xx is logged with it and the cause, and with ``public``
    the client gets the id and a generic message instead of the cause.
    """

    def __init__(
        self,
        app: ASGIApp,
        handlers: Mapping[str, Handler[T]],
        *,
        log: logging.Logger,
        secret: str | None = None,
        public: bool = False,
    ) -> None:
        self._app = app
        self._handlers = dict(handlers)
        self._allow = (b"allow", ", ".join(sorted({*handlers, "OPTIONS"})).encode())
        self._log = log
        self._secret = secret
        self._public = public

    # The metrics' labels: the serving role, and the route's pattern.
    role: str = ""
    route: str = ""
    # The query parameters the routes take, checked before any handler (query_args); None:
    # the handlers read what they need. args_hint ends the message of an unknown one.
    known_args: frozenset[str] | None = None
    args_hint: str = ""

    @abc.abstractmethod
    def match(self, path: str) -> T | None:
        """What a handler needs from ``path`` (e.g. a name), or None: another route's."""

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "websocket":
            await _refuse_websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        raw_path = scope.get("raw_path") or scope["path"].encode()
        if raw_path == b"*" and scope["method"] == "OPTIONS":
            # The server as a whole (RFC 9110 §9.3.7): what its routes allow, no body.
            exchange = Exchange(scope, receive, send)
            await exchange.answer(204, [self._allow])
            log_access("OPTIONS", "*", exchange.status, 0, time.perf_counter(), exchange.request_id)
            return
        origin = origin_form(raw_path)
        if origin is not raw_path:  # absolute-form: every route sees the path alone
            scope = cast(
                HTTPScope,
                {**scope, "raw_path": origin, "path": unquote(origin.decode("latin-1"))},
            )
        bad_path: InvalidName | None = None
        try:
            path = decode_path(origin)
        except InvalidName as exc:
            path, bad_path = scope["path"], exc
        target = self.match(path)
        if target is None:
            await self._app(scope, receive, send)
            return
        exchange = Exchange(scope, receive, send)
        method, where = scope["method"], origin.decode("latin-1")
        began = time.perf_counter()
        token = requestlog.current.set(exchange.request_id)
        try:
            await self._serve(exchange, target, method, where, bad_path)
        finally:
            requestlog.current.reset(token)
            log_access(method, where, exchange.status, exchange.sent, began, exchange.request_id)
            METRICS.observe(
                role=self.role,
                route=self.route,
                method=method,
                status=exchange.status,
                sent=exchange.sent,
                received=exchange.received,
                started=began,
            )

    async def _serve(
        self, exchange: Exchange, target: T, method: str, where: str, bad_path: InvalidName | None
    ) -> None:
        try:
            if smuggling_risk(exchange.headers):
                raise InvalidRequest(
                    "a request must not have both Transfer-Encoding and Content-Length"
                )
            if bad_path is not None:
                raise bad_path
            if self.known_args is not None:
                query_args(exchange.query_string, self.known_args, hint=self.args_hint)
            if self._secret is not None:
                check_secret(exchange.headers.get(SECRET_HEADER.lower()), self._secret)
            # Checks that need only the headers (the cluster secret above; a namespace's
            # access) belong here or at the start of a handler: before anything reads the
            # body, which is what sends "100 Continue" (karma8.net.http_fixes, fix 6).
            handler = self._handlers.get(method)
            if handler is not None:
                await handler(exchange, target)
            elif method == "OPTIONS":
                await exchange.answer(204, [self._allow])
            else:
                body = {"error": {**METHOD_NOT_ALLOWED["error"], "request_id": exchange.request_id}}
                await exchange.answer_json(405, body, [self._allow])
        except Karma8Error as exc:
            status = error_status(exc)
            if status >= 500:
                self._log.error(
                    "%s %s failed with %d [request %s]: %s",
                    *(method, where, status, exchange.request_id, exc.message),
                )
            if exchange.gone or exchange.started:
                self._log.info("%s %s ended early: %s", method, where, exc.message)
                return
            body = error_body(exc, exchange.request_id)
            if self._public and status >= 500 and exc.code not in TOLD_AS_IS:
                body["error"]["message"] = exc.public or PUBLIC_5XX.get(exc.code, "internal error")
            await exchange.answer_json(status, body, error_headers(exc))
        except Exception:
            self._log.exception(
                "unhandled error in %s %s [request %s]", method, where, exchange.request_id
            )
            if not exchange.started:
                body = {"error": {**INTERNAL_ERROR["error"], "request_id": exchange.request_id}}
                await exchange.answer_json(500, body)
