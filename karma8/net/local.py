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

from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, suppress

import trio

from karma8.actors.storage import StorageNode
from karma8.core.errors import Karma8Error, Unavailable
from karma8.core.model import NodeRef
from karma8.ports import Appended, Loan, PendingWrite, StepRunner, StorageAPI, StoredPart


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

    async def put_whole_parts(
        self, parts: Sequence[tuple[NodeRef, str, bytes]]
    ) -> list[StoredPart | Karma8Error] | None:
        """:class:`karma8.ports.WholePartWriter`: the parts' writes in one round of the sync
        their nodes share, if every node is in this process and packs its part; else None."""
        nodes: list[StorageNode] = []
        runner: StepRunner | None = None
        for node, _, data in parts:
            local = self._local.get(node.node_id)
            found = None if local is None else local.whole_runner(len(data))
            if local is None or found is None or runner not in (None, found):
                return None  # a node elsewhere, a part it would not pack, or two disks
            nodes.append(local)
            runner = found
        if runner is None:  # no parts
            return None
        results: list[StoredPart | Karma8Error | None] = [None] * len(parts)
        begun: list[tuple[int, PendingWrite]] = []
        errors: list[BaseException | None] = []
        try:
            for slot, (local, (_, key, data)) in enumerate(zip(nodes, parts, strict=True)):
                try:
                    begun.append((slot, await local.begin_whole(key, data)))
                except Karma8Error as exc:  # refused before any write (a conflict, no room)
                    results[slot] = exc
            if begun:
                try:
                    errors = await runner.run_steps([pending.step for _, pending in begun])
                except OSError as exc:  # the round failed: fail-stop, every write with it
                    errors = [exc] * len(begun)
        except BaseException as exc:  # cancelled (or a bug): what was begun ends as garbage
            for _, pending in begun:
                with suppress(BaseException):  # each raises exc, or what it maps it to
                    pending.end(exc)
            raise
        unexpected: BaseException | None = None
        for (slot, pending), error in zip(begun, errors, strict=True):
            try:
                results[slot] = pending.end(error)
            except Karma8Error as exc:
                results[slot] = exc
            except BaseException as exc:  # every write is ended before this is raised
                unexpected = unexpected or exc
        if unexpected is not None:
            raise unexpected
        stored = [result for result in results if result is not None]
        assert len(stored) == len(parts)
        return stored

    def _here(self, node: NodeRef) -> StorageNode:
        local = self._local.get(node.node_id)
        if local is None:
            raise Unavailable(f"node {node.node_id} is not in this process")
        return local

    async def lend_volume(self, node: NodeRef, borrower: str) -> Loan:
        """:class:`karma8.ports.LendingStorage`, for the nodes of this process."""
        return await self._here(node).lend_volume(borrower)

    async def adopt_parts(
        self, borrower: str, parts: Sequence[tuple[NodeRef, Appended]]
    ) -> list[StoredPart | Karma8Error]:
        await trio.lowlevel.checkpoint_if_cancelled()  # then all at once, no pass per part
        results: list[StoredPart | Karma8Error] = []
        for node, appended in parts:
            try:
                results.append(self._here(node).adopt_part(borrower, appended))
            except Karma8Error as exc:
                results.append(exc)
        return results

    async def give_back_volume(self, node: NodeRef, borrower: str, volume: int, end: int) -> None:
        await self._here(node).give_back_volume(borrower, volume, end)

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
