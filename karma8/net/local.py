"""In-process calls between roles that share a process (the embedded cluster).

``karma8 serve --role all`` runs discovery, the storage nodes and the gateway in one process.
Every role still serves its own HTTP socket (admin tools, nodes and gateways started later
use them), but the co-located gateway reaches its own discovery and nodes by calling the actors
directly: the actors already satisfy the ports, so no bytes are framed, parsed and copied
through loopback TCP for a hop that never leaves the process. A node that joined over HTTP is
not local and is reached through :class:`~karma8.net.clients.HttpStorageClient`.

Errors cross unchanged (the same :class:`~karma8.core.errors.Karma8Error` classes the HTTP
client rebuilds from codes) and cancellation reaches the node's handler directly, where the
HTTP path would deliver it as a disconnect: both end in the node discarding the partial part.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager

from karma8.actors.storage import StorageNode
from karma8.core.model import NodeRef
from karma8.ports import StorageAPI, StoredPart


class LocalFirstStorageClient:
    """:class:`karma8.ports.StorageAPI` that calls nodes of this process directly."""

    def __init__(self, local: Mapping[str, StorageNode], remote: StorageAPI) -> None:
        self._local = local
        self._remote = remote

    async def put_part(
        self, node: NodeRef, key: str, chunks: AsyncIterable[bytes], *, size: int | None = None
    ) -> StoredPart:
        local = self._local.get(node.node_id)
        if local is None:
            return await self._remote.put_part(node, key, chunks, size=size)
        return await local.put_part(key, chunks)

    def read_part(
        self, node: NodeRef, key: str, *, offset: int, length: int, checksum: str | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        local = self._local.get(node.node_id)
        if local is None:
            return self._remote.read_part(
                node, key, offset=offset, length=length, checksum=checksum
            )
        return local.read_part(key, offset=offset, length=length)

    async def delete_part(self, node: NodeRef, key: str) -> None:
        local = self._local.get(node.node_id)
        if local is None:
            await self._remote.delete_part(node, key)
        else:
            await local.delete_part(key)
