"""The storage node's internal HTTP API (authenticated with the cluster secret).

PUT    /v1/parts/{key}                    stream a part in; 201 + {"key","size","checksum"}
GET    /v1/parts/{key}?offset=&length=    bytes out (streamed above 64 KiB), Content-Length exact
HEAD   /v1/parts/{key}                    size and checksum headers
DELETE /v1/parts/{key}                    204, idempotent
GET    /v1/parts                          {"keys": [...]}
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager

from quart import Response, jsonify, request
from quart_trio import QuartTrio

from karma8.actors.storage import StorageNode
from karma8.core.errors import InvalidRequest, NotFound
from karma8.net.codec import encode_stored
from karma8.net.common import WHOLE_BODY_BYTES, create_app, int_arg, read_whole


class _OpenedBody:
    """A part stream opened before the response starts; Quart's ``aclose()`` closes it."""

    def __init__(
        self,
        opened: AbstractAsyncContextManager[AsyncIterator[bytes]],
        chunks: AsyncIterator[bytes],
    ) -> None:
        self._opened = opened
        self._chunks = chunks

    @classmethod
    async def open(cls, opened: AbstractAsyncContextManager[AsyncIterator[bytes]]) -> _OpenedBody:
        return cls(opened, await opened.__aenter__())

    def __aiter__(self) -> _OpenedBody:
        return self

    async def __anext__(self) -> bytes:
        return await anext(self._chunks)

    async def aclose(self) -> None:
        await self._opened.__aexit__(None, None, None)


def storage_app(node: StorageNode, *, secret: str | None) -> QuartTrio:
    app = create_app("storage", secret=secret)

    @app.route("/v1/parts/<key>", methods=["PUT"])
    async def put_part(key: str) -> tuple[Response, int]:
        stored = await node.put_part(key, request.body)
        return jsonify(encode_stored(stored)), 201

    @app.route("/v1/parts/<key>", methods=["HEAD"])
    async def head_part(key: str) -> Response:
        stored = await node.stat_part(key)
        if stored is None:
            raise NotFound(f"part {key} is not on this node")
        response = Response(b"", status=200)
        response.headers["Content-Length"] = str(stored.size)
        response.headers["X-Karma8-Checksum"] = stored.checksum
        return response

    @app.route("/v1/parts/<key>", methods=["GET"])
    async def get_part(key: str) -> Response:
        stored = await node.stat_part(key)
        if stored is None:
            raise NotFound(f"part {key} is not on this node")
        offset = int_arg("offset", 0)
        length = int_arg("length", max(stored.size - offset, 0))
        if offset + length > stored.size:
            raise InvalidRequest(f"bytes [{offset}, {offset + length}) are beyond the part")

        body: bytes | _OpenedBody
        if length <= WHOLE_BODY_BYTES:
            # Read whole first: a block that fails its check is a JSON error, not a cut.
            body = await read_whole(node.read_part(key, offset=offset, length=length))
        else:
            # Opened before the status line, so a damaged or truncated part is a JSON error.
            body = await _OpenedBody.open(node.read_part(key, offset=offset, length=length))
        response = Response(body, status=200, mimetype="application/octet-stream")
        response.headers["Content-Length"] = str(length)
        response.timeout = None
        return response

    @app.route("/v1/parts/<key>", methods=["DELETE"])
    async def delete_part(key: str) -> tuple[str, int]:
        await node.delete_part(key)
        return "", 204

    @app.route("/v1/scrub", methods=["POST"])
    async def scrub() -> Response:
        report = await node.scrub()
        return jsonify(
            {"node_id": report.node_id, "checked": report.checked, "corrupt": list(report.corrupt)}
        )

    @app.route("/v1/parts", methods=["GET"])
    async def list_parts() -> Response:
        return jsonify({"keys": await node.part_keys()})

    return app
