"""The gateway's public HTTP API.

    PUT    /{namespace}/{name}     store (streaming; chunked or Content-Length); 201
    GET    /{namespace}/{name}     stream back; Range (single), If-None-Match; 200/206/304
    HEAD   /{namespace}/{name}     headers only
    DELETE /{namespace}/{name}     204 (idempotent)
    GET    /{namespace}/?prefix=&after=&limit=    JSON listing, paginated
    GET    /healthz
    GET    /metrics                counters: puts, gets, read_errors (JSON)

Names may contain ``/``. Errors are JSON: ``{"error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

from quart import Response, jsonify, request
from quart_trio import QuartTrio

from karma8.actors.gateway import Gateway
from karma8.core.errors import InvalidRequest, Karma8Error
from karma8.core.model import FileVersion
from karma8.core.ranges import resolve_range
from karma8.net.codec import encode_entry
from karma8.net.common import WHOLE_BODY_BYTES, create_app, int_arg, read_whole

log = logging.getLogger("karma8.gateway")


def _content_length() -> int | None:
    raw = request.headers.get("Content-Length")
    if raw is None:
        return None
    if not raw.isdigit():
        raise InvalidRequest("Content-Length must be a non-negative integer")
    return int(raw)


def _etag_matches(header: str | None, etag: str | None) -> bool:
    if header is None or etag is None:
        return False
    candidates = [c.strip().removeprefix("W/") for c in header.split(",")]
    return "*" in candidates or etag in candidates


def _headers(version: FileVersion, response: Response) -> None:
    if version.etag:
        response.headers["ETag"] = version.etag
    response.headers["Accept-Ranges"] = "bytes"
    response.headers["X-Karma8-Version"] = version.version_id


class _PartsBody:
    """A GET body: the stitched part streams, opened before the response starts.

    Quart closes the body with ``aclose()`` when the response ends, however it ends (also
    when the body was never iterated), which closes the part streams.
    """

    def __init__(
        self, stack: AsyncExitStack, chunks: AsyncIterator[bytes], where: str, stats: dict[str, int]
    ) -> None:
        self._stack = stack
        self._chunks = chunks
        self._where = where
        self._stats = stats

    @classmethod
    async def open(
        cls,
        gateway: Gateway,
        version: FileVersion,
        start: int,
        stop: int,
        stats: dict[str, int],
    ) -> _PartsBody:
        stack = AsyncExitStack()
        try:
            chunks = await stack.enter_async_context(
                gateway.open_read(version, start=start, stop=stop)
            )
        except BaseException:
            await stack.aclose()
            raise
        return cls(stack, chunks, f"{version.namespace}/{version.name}", stats)

    def __aiter__(self) -> _PartsBody:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await anext(self._chunks)
        except Karma8Error as exc:
            # Headers are gone; failing the stream is the only honest answer left.
            self._stats["read_errors"] += 1
            log.error("GET %s failed mid-stream: %s", self._where, exc.message)
            raise

    async def aclose(self) -> None:
        await self._stack.aclose()


def gateway_app(gateway: Gateway) -> QuartTrio:
    app = create_app("gateway", secret=None)
    stats = {"gets": 0, "puts": 0, "read_errors": 0}

    @app.route("/metrics", methods=["GET"])
    async def metrics() -> Response:
        """Counters since start: successful PUTs, GETs begun, GETs that failed mid-stream."""
        return jsonify(stats)

    @app.route("/<namespace>/<path:name>", methods=["PUT"])
    async def put(namespace: str, name: str) -> tuple[Response, int]:
        if_none_match = request.headers.get("If-None-Match")
        if if_none_match is not None and if_none_match.strip() != "*":
            raise InvalidRequest("on PUT, If-None-Match supports only '*'")
        version = await gateway.put(
            namespace,
            name,
            request.body,
            content_length=_content_length(),
            if_absent=if_none_match is not None,
        )
        stats["puts"] += 1
        response = jsonify(
            {
                "namespace": version.namespace,
                "name": version.name,
                "version": version.version_id,
                "size": version.size,
                "etag": version.etag,
            }
        )
        _headers(version, response)
        return response, 201

    async def _read(namespace: str, name: str, *, head: bool) -> Response:
        version = await gateway.stat(namespace, name)
        assert version.size is not None
        if _etag_matches(request.headers.get("If-None-Match"), version.etag):
            response = Response(b"", status=304)
            _headers(version, response)
            return response
        span = resolve_range(request.headers.get("Range"), version.size)
        start, stop = span if span is not None else (0, version.size)
        body: bytes | _PartsBody = b""
        if not head and stop - start <= WHOLE_BODY_BYTES:
            # Small: read it all first. One body write instead of one per part piece, and any
            # failure, a checksum too, is an error status rather than a body cut short.
            body = await read_whole(gateway.open_read(version, start=start, stop=stop))
        elif not head:
            # Open the part streams before the status line goes out, so that a node that is
            # down or a missing part is a 502/503 with a JSON body, not a truncated 200.
            body = await _PartsBody.open(gateway, version, start, stop, stats)
        response = Response(
            body, status=200 if span is None else 206, mimetype="application/octet-stream"
        )
        response.headers["Content-Length"] = str(stop - start)
        if span is not None:
            response.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{version.size}"
        _headers(version, response)
        response.timeout = None
        stats["gets"] += 1
        return response

    @app.route("/<namespace>/<path:name>", methods=["GET"])
    async def get(namespace: str, name: str) -> Response:
        return await _read(namespace, name, head=False)

    @app.route("/<namespace>/<path:name>", methods=["HEAD"])
    async def head(namespace: str, name: str) -> Response:
        return await _read(namespace, name, head=True)

    @app.route("/<namespace>/<path:name>", methods=["DELETE"])
    async def delete(namespace: str, name: str) -> tuple[str, int]:
        await gateway.delete(namespace, name)
        return "", 204

    @app.route("/<namespace>/", methods=["GET"])
    async def listing(namespace: str) -> Response:
        limit = int_arg("limit", 1000)
        entries = await gateway.list(
            namespace,
            prefix=request.args.get("prefix", ""),
            after=request.args.get("after", ""),
            limit=limit,
        )
        files = [encode_entry(e) for e in entries]
        next_after = entries[-1].name if len(entries) == limit else None
        return jsonify({"namespace": namespace, "files": files, "next_after": next_after})

    return app
