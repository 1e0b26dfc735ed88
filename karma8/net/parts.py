"""A storage node's part routes, ``PUT|GET|HEAD|DELETE /v1/parts/{key}``, on the data plane
(:mod:`karma8.net.exchange`) in front of the node's Quart app, behind the cluster secret.

Everything else (the part listing, scrub, health, an unknown route) still goes to Quart.
"""

from __future__ import annotations

import logging

from karma8.actors.storage import StorageNode
from karma8.core.errors import InvalidRequest, Karma8Error, NotFound
from karma8.net.codec import encode
from karma8.net.exchange import (
    OCTETS_TYPE,
    WHOLE_BODY_BYTES,
    ASGIApp,
    Exchange,
    ExchangeRoutes,
    FirstThen,
    read_whole,
)

log = logging.getLogger("karma8.storage")

PREFIX = "/v1/parts/"


def part_path(path: str) -> str | None:
    """The key if ``path`` is a part's (``/v1/parts/{key}``, the key one non-empty path
    segment), else None. The node checks the key itself (400 if it is not a part key)."""
    if not path.startswith(PREFIX):
        return None
    key = path[len(PREFIX) :]
    return key if key and "/" not in key else None


class PartRoutes(ExchangeRoutes[str]):
    """The part routes of ``node``; every other request goes to ``app``. With ``secret``,
    a part route without it is ``403 forbidden``, whatever its method."""

    def __init__(self, node: StorageNode, app: ASGIApp, *, secret: str | None) -> None:
        handlers = {"PUT": self._put, "GET": self._get, "HEAD": self._head, "DELETE": self._delete}
        super().__init__(app, handlers, log=log, secret=secret)
        self._node = node

    role = "storage"
    route = "/v1/parts/{key}"

    def match(self, path: str) -> str | None:
        return part_path(path)

    async def _put(self, exchange: Exchange, key: str) -> None:
        stored = await self._node.put_part(key, exchange)
        await exchange.answer_json(201, encode(stored))

    async def _head(self, exchange: Exchange, key: str) -> None:
        stored = await self._node.stat_part(key)
        if stored is None:
            raise NotFound(f"part {key} is not on this node")
        headers = [
            OCTETS_TYPE,
            (b"content-length", str(stored.size).encode()),
            (b"x-karma8-checksum", stored.checksum.encode()),
        ]
        await exchange.answer(200, headers)

    async def _get(self, exchange: Exchange, key: str) -> None:
        stored = await self._node.stat_part(key)
        if stored is None:
            raise NotFound(f"part {key} is not on this node")
        offset = exchange.int_arg("offset", 0)
        length = exchange.int_arg("length", max(stored.size - offset, 0))
        if offset + length > stored.size:
            raise InvalidRequest(f"bytes [{offset}, {offset + length}) are beyond the part")
        headers = [OCTETS_TYPE, (b"content-length", str(length).encode())]
        if length <= WHOLE_BODY_BYTES:
            # Read whole first: a block that fails its check is a JSON error, not a cut.
            body = await read_whole(self._node.read_part(key, offset=offset, length=length))
            await exchange.answer(200, headers, body)
            return
        # Opened, and its first chunk read (every block of it checked), before the status
        # line, so a damaged or truncated part, or a damaged first block, is a JSON error:
        # a gateway told so answers 502 integrity_error, where a cut before any byte would
        # have looked to it like a node gone (503).
        async with self._node.read_part(key, offset=offset, length=length) as chunks:
            first = await anext(chunks, b"")
            await exchange.start(200, headers)
            try:
                await exchange.stream(FirstThen(first, chunks))
            except Karma8Error as exc:
                log.error("GET part %s failed mid-stream: %s", key, exc.message)

    async def _delete(self, exchange: Exchange, key: str) -> None:
        await self._node.delete_part(key)
        await exchange.answer(204, [])
