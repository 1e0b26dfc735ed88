"""The gateway's object routes, ``PUT|GET|HEAD|DELETE /{namespace}/{name}``, on the data
plane (:mod:`karma8.net.exchange`) in front of the gateway's Quart app.

Each route first asks the gateway whether the request's token may read (GET, HEAD) or write
(PUT, DELETE) in the namespace, before any byte of the body is read.

Everything else (listing, metrics, health, an unknown route) still goes to Quart.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterable
from contextlib import suppress

from karma8.actors.gateway import Gateway
from karma8.core.access import Right, bearer_token
from karma8.core.errors import InvalidRequest, Karma8Error, RangeNotSatisfiable
from karma8.core.model import FileVersion, StoredVersion
from karma8.core.names import check_name, check_namespace
from karma8.core.ranges import if_range_allows, resolve_range
from karma8.net.bounds import RETRY_AFTER, UploadGate
from karma8.net.codec import error_body, error_status
from karma8.net.exchange import (
    OCTETS_TYPE,
    WHOLE_BODY_BYTES,
    ASGIApp,
    Exchange,
    ExchangeRoutes,
    FirstThen,
    Headers,
)
from karma8.net.writepipe import ParentUnreachable, SmallWrites
from karma8.store.tiered import OneChunk

log = logging.getLogger("karma8.gateway")


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


def _version_headers(version: FileVersion | StoredVersion) -> Headers:
    etag = [(b"etag", version.etag.encode())] if version.etag else []
    return [*etag, (b"accept-ranges", b"bytes"), (b"x-karma8-version", version.version_id.encode())]


Target = tuple[str, str]  # (namespace, name)


def new_stats() -> dict[str, int]:
    """The counts :class:`ObjectRoutes` keeps."""
    return {"gets": 0, "puts": 0, "read_errors": 0}


class _Abandoned(Exception):
    """Leaves a read whose answer will not be completed: raised through the read, so that
    its part streams are given up, not read to their end (an HTTP part stream closed
    normally drains the rest of its part, to keep its connection)."""


class ObjectRoutes(ExchangeRoutes[Target]):
    """The object routes; every other request goes to ``app``. ``stats`` counts PUTs, GETs
    and GETs that failed mid-stream (``/metrics``)."""

    def __init__(
        self,
        gateway: Gateway,
        stats: dict[str, int],
        app: ASGIApp,
        uploads: UploadGate | None = None,
        parent: SmallWrites | None = None,
    ) -> None:
        handlers = {"PUT": self._put, "GET": self._get, "HEAD": self._head, "DELETE": self._delete}
        super().__init__(app, handlers, log=log, public=True)
        self._gateway = gateway
        self._stats = stats
        self._uploads = uploads or UploadGate(max_uploads=1 << 30, idle_timeout=math.inf)
        self._parent = parent  # a gateway worker's parent, which stores its small uploads

    role = "gateway"
    route = "/{namespace}/{name}"
    # None: a typo such as ?dryrun=1 must not pass unseen, nor a name's unescaped '?' (the
    # rest of the name taken for a query: PUT a?b would store "a").
    known_args = frozenset[str]()
    args_hint = "; a '?' in a name is sent as %3F"

    def match(self, path: str) -> Target | None:
        return object_path(path)

    async def _authorize(self, exchange: Exchange, namespace: str, right: Right) -> None:
        token = bearer_token(exchange.headers.get("authorization"))
        await self._gateway.authorize(namespace, token, right)

    async def _put(self, exchange: Exchange, target: Target) -> None:
        namespace, name = target
        await self._authorize(exchange, namespace, Right.WRITE)
        if_none_match = exchange.headers.get("if-none-match")
        if if_none_match is not None and if_none_match.strip() != "*":
            raise InvalidRequest("on PUT, If-None-Match supports only '*'")
        content_length = exchange.content_length()
        busy = self._uploads.busy()
        if busy is not None:  # answered at once, the body unread
            body = error_body(busy, exchange.request_id)
            await exchange.answer_json(error_status(busy), body, [RETRY_AFTER])
            return
        failed = True
        try:
            version = await self._store(
                namespace,
                name,
                self._uploads.body(exchange),
                content_length=content_length,
                if_absent=if_none_match is not None,
            )
            failed = False
        finally:
            self._uploads.done(failed=failed)
        self._stats["puts"] += 1
        body = {
            "namespace": version.namespace,
            "name": version.name,
            "version": version.version_id,
            "size": version.size,
            "etag": version.etag,
        }
        await exchange.answer_json(201, body, _version_headers(version))

    async def _store(
        self,
        namespace: str,
        name: str,
        body: AsyncIterable[bytes],
        *,
        content_length: int | None,
        if_absent: bool,
    ) -> StoredVersion:
        """A worker has a small upload, read whole here, stored through its parent: sent to
        it (:mod:`karma8.net.writepipe`), or its parts written here and committed there
        (:mod:`karma8.net.loanwrites`); it stores it itself only if the parent is
        unreachable, and everything else always."""
        gateway = self._gateway
        if self._parent is None or not gateway.holds_whole(content_length):
            version = await gateway.put(
                namespace, name, body, content_length=content_length, if_absent=if_absent
            )
            return StoredVersion.of(version)
        assert content_length is not None
        check_namespace(namespace)
        check_name(name)
        data = await gateway.read_held(body, content_length)
        try:
            return await self._parent.put(namespace, name, data, if_absent=if_absent)
        except ParentUnreachable as exc:
            log.warning("storing an upload without the gateway that started this one: %s", exc)
            version = await gateway.put(
                namespace, name, OneChunk(data), content_length=len(data), if_absent=if_absent
            )
            return StoredVersion.of(version)

    async def _get(self, exchange: Exchange, target: Target) -> None:
        await self._read(exchange, target, head=False)

    async def _head(self, exchange: Exchange, target: Target) -> None:
        await self._read(exchange, target, head=True)

    async def _read(self, exchange: Exchange, target: Target, *, head: bool) -> None:
        await self._authorize(exchange, target[0], Right.READ)
        version = await self._gateway.stat(*target)
        assert version.size is not None
        if etag_matches(exchange.headers.get("if-none-match"), version.etag):
            await exchange.answer(304, _version_headers(version))
            return
        wanted = exchange.headers.get("range")
        if not if_range_allows(exchange.headers.get("if-range"), version.etag):
            wanted = None
        try:
            span = resolve_range(wanted, version.size)
        except RangeNotSatisfiable as exc:
            unsatisfied = [
                (b"content-range", f"bytes */{version.size}".encode()),
                *_version_headers(version),
            ]
            refused = error_body(exc, exchange.request_id)
            await exchange.answer_json(error_status(exc), refused, unsatisfied)
            return
        start, stop = span if span is not None else (0, version.size)
        headers = [OCTETS_TYPE, (b"content-length", str(stop - start).encode())]
        if span is not None:
            headers.append((b"content-range", f"bytes {start}-{stop - 1}/{version.size}".encode()))
        headers += _version_headers(version)
        status = 200 if span is None else 206
        if head or stop - start <= WHOLE_BODY_BYTES:
            # Small: read it all first. One body write instead of one per part piece, and any
            # failure, a checksum too, is an error status rather than a body cut short.
            body = b"" if head else await self._gateway.read_bytes(version, start=start, stop=stop)
            self._stats["gets"] += 1
            await exchange.answer(status, headers, body)
            return
        # The part streams are opened, and the first chunk read, before the status line goes
        # out, so that a node that is down, a missing part, or a parity file missing more
        # parts than it survives is a 502/503 with a JSON body, not a 200 cut short.
        with suppress(_Abandoned):
            async with self._gateway.open_read(version, start=start, stop=stop) as chunks:
                first = await anext(chunks, b"")
                self._stats["gets"] += 1
                await exchange.start(status, headers)
                try:
                    if not await exchange.stream(FirstThen(first, chunks)):
                        raise _Abandoned("the client went away")
                except Karma8Error as exc:
                    self._stats["read_errors"] += 1
                    log.error(
                        "GET %s/%s failed mid-stream [request %s]: %s",
                        *target,
                        exchange.request_id,
                        exc.message,
                    )
                    raise _Abandoned(exc.message) from None

    async def _delete(self, exchange: Exchange, target: Target) -> None:
        await self._authorize(exchange, target[0], Right.WRITE)
        await self._gateway.delete(*target)
        await exchange.answer(204, [])
