"""The gateway's object routes, ``PUT|GET|HEAD|DELETE /{namespace}/{name}``, as plain ASGI.

Quart gives every request an app and a request context, a routing match, request and
response objects and the hooks around them; for a small file that machinery cost the event
loop more than storing or fetching the file (measured: docs/benchmarks.md, "What limits
karma8"). These four routes are the data path, so :class:`ObjectRoutes` serves them itself,
installed the way Quart documents ASGI middleware (``app.asgi_app = ObjectRoutes(...)``).
Everything else (listing, metrics, health, an unknown route) still goes to Quart, and the app
is still a Quart-Trio app served by Hypercorn.

What Quart-Trio did for these routes that a handler of its own must do too:

- **Backpressure.** The body is read as the upload consumes it; meanwhile Hypercorn's queue
  of a request's messages (10) fills, its reader stops and TCP slows the client.
- **A client that goes away.** Mid-body, the next read fails the upload, which cleans up after
  itself, and no answer is sent. Mid-download, a watcher task ends the stream. Once the whole
  body is in, nothing is cancelled (Quart-Trio did cancel): the upload finishes, stored or
  failed, and the answer is dropped.
- **An answer before the body was read** (an error). The rest of the body is drained while the
  answer goes out: Hypercorn hands the request its disconnect through the same queue, and
  with the queue full and nobody reading, that connection would hang.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPScope,
    Scope,
)

from karma8.actors.gateway import Gateway
from karma8.core.errors import InvalidRequest, Karma8Error, RangeNotSatisfiable
from karma8.core.model import FileVersion
from karma8.core.ranges import resolve_range
from karma8.net.codec import error_body, error_status
from karma8.net.common import WHOLE_BODY_BYTES, read_whole

log = logging.getLogger("karma8.gateway")

ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

ALLOWED = b"DELETE, GET, HEAD, OPTIONS, PUT"
_JSON = (b"content-type", b"application/json")
_OCTETS = (b"content-type", b"application/octet-stream")


def object_path(path: str) -> tuple[str, str] | None:
    """``(namespace, name)`` if ``path`` is an object's (``/{namespace}/{name}``, the name
    non-empty and possibly with ``/``), else None: the request is another route's."""
    namespace, slash, name = path[1:].partition("/")
    if not (namespace and slash and name):
        return None
    return namespace, name


def etag_matches(header: str | None, etag: str | None) -> bool:
    """Whether an ``If-None-Match`` header names ``etag`` (or ``*``); weak forms match."""
    if header is None or etag is None:
        return False
    candidates = [c.strip().removeprefix("W/") for c in header.split(",")]
    return "*" in candidates or etag in candidates


def _version_headers(version: FileVersion) -> Headers:
    etag = [(b"etag", version.etag.encode())] if version.etag else []
    return [*etag, (b"accept-ranges", b"bytes"), (b"x-karma8-version", version.version_id.encode())]


class ClientGone(InvalidRequest):
    """The client closed the connection before the request body ended."""


class _Exchange:
    """One request to an object route: its headers and body, and the answer."""

    __slots__ = ("_body_done", "_receive", "_send", "gone", "headers", "started")

    def __init__(self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable):
        self._receive = receive
        self._send = send
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:  # names arrive lower-case (h11)
            name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self.headers = headers
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

    def content_length(self) -> int | None:
        raw = self.headers.get("content-length")
        if raw is None:
            return None
        if not raw.isdigit():
            raise InvalidRequest("Content-Length must be a non-negative integer")
        return int(raw)

    def __aiter__(self) -> _Exchange:
        return self

    async def __anext__(self) -> bytes:
        """The request body's next chunk, as the upload asks for it (backpressure)."""
        while not self._body_done:
            message = await self._receive()
            if message["type"] != "http.request":
                self._body_done = self.gone = True
                raise ClientGone("the client closed the connection before the body ended")
            self._body_done = not message["more_body"]
            if message["body"]:
                return message["body"]
        raise StopAsyncIteration

    async def start(self, status: int, headers: Headers) -> None:
        self.started = True
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def write(self, chunk: bytes, *, more: bool = True) -> None:
        await self._send({"type": "http.response.body", "body": chunk, "more_body": more})

    async def answer(self, status: int, headers: Headers, body: bytes = b"") -> None:
        """Send a whole answer, draining what is left of the request body meanwhile."""
        if self._body_done:
            await self.start(status, headers)
            await self.write(body, more=False)
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._drain)
            await self.start(status, headers)
            await self.write(body, more=False)
            nursery.cancel_scope.cancel()

    async def answer_json(self, status: int, value: Any, headers: Headers | None = None) -> None:
        # As Quart writes JSON (the other routes): compact, keys sorted, a newline at the end.
        body = json.dumps(value, separators=(",", ":"), sort_keys=True).encode() + b"\n"
        length = (b"content-length", str(len(body)).encode())
        await self.answer(status, [_JSON, length, *(headers or [])], body)

    async def _drain(self) -> None:
        while not self._body_done:
            message = await self._receive()
            self._body_done = message["type"] != "http.request" or not message["more_body"]

    async def until_gone(self, scope: trio.CancelScope) -> None:
        """Cancel ``scope`` once the client disconnects (a download's watcher)."""
        while (await self._receive())["type"] == "http.request":
            pass
        scope.cancel()


class ObjectRoutes:
    """ASGI middleware: serves the object routes, hands every other request to ``app``."""

    def __init__(self, gateway: Gateway, stats: dict[str, int], app: ASGIApp) -> None:
        self._gateway = gateway
        self._stats = stats
        self._app = app
        self._routes: dict[str, Callable[[_Exchange, str, str], Awaitable[None]]] = {
            "PUT": self._put,
            "GET": self._get,
            "HEAD": self._head,
            "DELETE": self._delete,
            "OPTIONS": _options,
        }

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        target = object_path(scope["path"]) if scope["type"] == "http" else None
        if target is None:
            await self._app(scope, receive, send)
            return
        assert scope["type"] == "http"
        exchange = _Exchange(scope, receive, send)
        try:
            await self._routes.get(scope["method"], _not_allowed)(exchange, *target)
        except Karma8Error as exc:
            if exchange.gone or exchange.started:
                log.info("%s %s ended early: %s", scope["method"], scope["path"], exc.message)
            else:
                await exchange.answer_json(error_status(exc), error_body(exc))
        except Exception:
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if not exchange.started:
                error = {"error": {"code": "internal", "message": "internal error"}}
                await exchange.answer_json(500, error)

    async def _put(self, exchange: _Exchange, namespace: str, name: str) -> None:
        if_none_match = exchange.headers.get("if-none-match")
        if if_none_match is not None and if_none_match.strip() != "*":
            raise InvalidRequest("on PUT, If-None-Match supports only '*'")
        version = await self._gateway.put(
            namespace,
            name,
            exchange,
            content_length=exchange.content_length(),
            if_absent=if_none_match is not None,
        )
        self._stats["puts"] += 1
        body = {
            "namespace": version.namespace,
            "name": version.name,
            "version": version.version_id,
            "size": version.size,
            "etag": version.etag,
        }
        await exchange.answer_json(201, body, _version_headers(version))

    async def _get(self, exchange: _Exchange, namespace: str, name: str) -> None:
        await self._read(exchange, namespace, name, head=False)

    async def _head(self, exchange: _Exchange, namespace: str, name: str) -> None:
        await self._read(exchange, namespace, name, head=True)

    async def _read(self, exchange: _Exchange, namespace: str, name: str, *, head: bool) -> None:
        version = await self._gateway.stat(namespace, name)
        assert version.size is not None
        if etag_matches(exchange.headers.get("if-none-match"), version.etag):
            await exchange.answer(304, _version_headers(version))
            return
        try:
            span = resolve_range(exchange.headers.get("range"), version.size)
        except RangeNotSatisfiable as exc:
            unsatisfied = [(b"content-range", f"bytes */{version.size}".encode())]
            await exchange.answer_json(error_status(exc), error_body(exc), unsatisfied)
            return
        start, stop = span if span is not None else (0, version.size)
        headers = [_OCTETS, (b"content-length", str(stop - start).encode())]
        if span is not None:
            headers.append((b"content-range", f"bytes {start}-{stop - 1}/{version.size}".encode()))
        headers += _version_headers(version)
        status = 200 if span is None else 206
        if head or stop - start <= WHOLE_BODY_BYTES:
            # Small: read it all first. One body write instead of one per part piece, and any
            # failure, a checksum too, is an error status rather than a body cut short.
            body = (
                b""
                if head
                else await read_whole(self._gateway.open_read(version, start=start, stop=stop))
            )
            self._stats["gets"] += 1
            await exchange.answer(status, headers, body)
            return
        # The part streams are opened before the status line goes out, so that a node that
        # is down or a missing part is a 502/503 with a JSON body, not a 200 cut short.
        async with self._gateway.open_read(version, start=start, stop=stop) as chunks:
            self._stats["gets"] += 1
            await exchange.start(status, headers)
            await self._stream(exchange, chunks, f"{namespace}/{name}")

    async def _stream(self, exchange: _Exchange, chunks: AsyncIterator[bytes], where: str) -> None:
        """Send a download's body, until its end or until the client goes away. A read that
        fails ends it without its last message: Hypercorn then closes the connection, and
        the client sees a body shorter than its Content-Length."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(exchange.until_gone, nursery.cancel_scope)
            try:
                async for chunk in chunks:
                    await exchange.write(chunk)
            except Karma8Error as exc:
                self._stats["read_errors"] += 1
                log.error("GET %s failed mid-stream: %s", where, exc.message)
            else:
                await exchange.write(b"", more=False)
            nursery.cancel_scope.cancel()

    async def _delete(self, exchange: _Exchange, namespace: str, name: str) -> None:
        await self._gateway.delete(namespace, name)
        await exchange.answer(204, [])


async def _options(exchange: _Exchange, namespace: str, name: str) -> None:
    await exchange.answer(204, [(b"allow", ALLOWED)])


async def _not_allowed(exchange: _Exchange, namespace: str, name: str) -> None:
    error = {"error": {"code": "method_not_allowed", "message": "method not allowed here"}}
    await exchange.answer_json(405, error, [(b"allow", ALLOWED)])
