"""The simulated world's implementations of the actor ports that cross the network.

Each adapter is bound to the endpoint it speaks *from*, so the network knows who calls whom.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from contextlib import asynccontextmanager

from karma8.actors.discovery import Discovery
from karma8.actors.storage import StorageNode
from karma8.core.access import NamespaceInfo, Right, TokenInfo
from karma8.core.errors import Karma8Error, error_from_code
from karma8.core.model import (
    FileEntry,
    FileVersion,
    NodeRef,
    NodeRegistration,
    NodeStatus,
    PartPlacement,
    PartReceipt,
)
from karma8.ports import StoredPart
from karma8.sim.network import SimNetwork

DISCOVERY = "discovery"


class SimDiscoveryClient:
    """:class:`karma8.ports.DiscoveryAPI` over the simulated network."""

    def __init__(self, network: SimNetwork, src: str) -> None:
        self._net = network
        self._src = src

    async def begin_upload(
        self, *, namespace: str, name: str, size_hint: int | None, if_absent: bool = False
    ) -> FileVersion:
        async def op(d: Discovery) -> FileVersion:
            return await d.begin_upload(
                namespace=namespace, name=name, size_hint=size_hint, if_absent=if_absent
            )

        return await self._net.call(self._src, DISCOVERY, "begin_upload", op)

    async def place_upload(
        self, *, namespace: str, name: str, size: int, if_absent: bool = False
    ) -> FileVersion:
        async def op(d: Discovery) -> FileVersion:
            return await d.place_upload(
                namespace=namespace, name=name, size=size, if_absent=if_absent
            )

        return await self._net.call(self._src, DISCOVERY, "place_upload", op)

    async def commit_upload(
        self,
        *,
        version_id: str,
        size: int,
        receipts: Sequence[PartReceipt],
        if_absent: bool = False,
    ) -> FileVersion:
        async def op(d: Discovery) -> FileVersion:
            return await d.commit_upload(
                version_id=version_id, size=size, receipts=receipts, if_absent=if_absent
            )

        return await self._net.call(self._src, DISCOVERY, "commit_upload", op)

    async def abort_upload(self, *, version_id: str) -> FileVersion:
        async def op(d: Discovery) -> FileVersion:
            return await d.abort_upload(version_id=version_id)

        return await self._net.call(self._src, DISCOVERY, "abort_upload", op)

    async def resolve(self, *, namespace: str, name: str) -> FileVersion:
        async def op(d: Discovery) -> FileVersion:
            return await d.resolve(namespace=namespace, name=name)

        return await self._net.call(self._src, DISCOVERY, "resolve", op)

    async def delete_file(self, *, namespace: str, name: str) -> bool:
        async def op(d: Discovery) -> bool:
            return await d.delete_file(namespace=namespace, name=name)

        return await self._net.call(self._src, DISCOVERY, "delete_file", op)

    async def list_files(
        self, *, namespace: str, prefix: str, after: str, limit: int
    ) -> list[FileEntry]:
        async def op(d: Discovery) -> list[FileEntry]:
            return await d.list_files(namespace=namespace, prefix=prefix, after=after, limit=limit)

        return await self._net.call(self._src, DISCOVERY, "list_files", op)

    async def create_namespace(
        self,
        *,
        namespace: str,
        public: bool = False,
        engine: str = "raid0",
        copies: int | None = None,
        parity: int | None = None,
    ) -> NamespaceInfo:
        async def op(d: Discovery) -> NamespaceInfo:
            return await d.create_namespace(
                namespace=namespace, public=public, engine=engine, copies=copies, parity=parity
            )

        return await self._net.call(self._src, DISCOVERY, "create_namespace", op)

    async def list_namespaces(self) -> list[NamespaceInfo]:
        async def op(d: Discovery) -> list[NamespaceInfo]:
            return await d.list_namespaces()

        return await self._net.call(self._src, DISCOVERY, "list_namespaces", op)

    async def disable_namespace(self, *, namespace: str) -> NamespaceInfo:
        async def op(d: Discovery) -> NamespaceInfo:
            return await d.disable_namespace(namespace=namespace)

        return await self._net.call(self._src, DISCOVERY, "disable_namespace", op)

    async def create_token(
        self, *, namespace: str, read: bool, write: bool
    ) -> tuple[str, TokenInfo]:
        async def op(d: Discovery) -> tuple[str, TokenInfo]:
            return await d.create_token(namespace=namespace, read=read, write=write)

        return await self._net.call(self._src, DISCOVERY, "create_token", op)

    async def list_tokens(self, *, namespace: str | None = None) -> list[TokenInfo]:
        async def op(d: Discovery) -> list[TokenInfo]:
            return await d.list_tokens(namespace=namespace)

        return await self._net.call(self._src, DISCOVERY, "list_tokens", op)

    async def revoke_token(self, *, token_id: str) -> TokenInfo:
        async def op(d: Discovery) -> TokenInfo:
            return await d.revoke_token(token_id=token_id)

        return await self._net.call(self._src, DISCOVERY, "revoke_token", op)

    async def check_access(self, *, namespace: str, token: str | None, right: Right) -> None:
        async def op(d: Discovery) -> None:
            await d.check_access(namespace=namespace, token=token, right=right)

        await self._net.call(self._src, DISCOVERY, "check_access", op)

    async def register_node(self, registration: NodeRegistration) -> None:
        async def op(d: Discovery) -> None:
            await d.register_node(registration)

        await self._net.call(self._src, DISCOVERY, "register_node", op)

    async def heartbeat(
        self, registration: NodeRegistration, *, deleted: Sequence[str]
    ) -> list[str]:
        sent = list(deleted)

        async def op(d: Discovery) -> list[str]:
            return await d.heartbeat(registration, deleted=sent)

        return await self._net.call(self._src, DISCOVERY, "heartbeat", op)

    async def list_nodes(self) -> list[NodeStatus]:
        async def op(d: Discovery) -> list[NodeStatus]:
            return await d.list_nodes()

        return await self._net.call(self._src, DISCOVERY, "list_nodes", op)

    async def unknown_parts(self, *, node_id: str, keys: Sequence[str]) -> list[str]:
        asked = list(keys)

        async def op(d: Discovery) -> list[str]:
            return await d.unknown_parts(node_id=node_id, keys=asked)

        return await self._net.call(self._src, DISCOVERY, "unknown_parts", op)

    async def report_node_failure(self, *, node_id: str, reason: str) -> None:
        async def op(d: Discovery) -> None:
            await d.report_node_failure(node_id=node_id, reason=reason)

        await self._net.call(self._src, DISCOVERY, f"report_node_failure {node_id}", op)

    async def report_lost_parts(self, *, node_id: str, keys: Sequence[str], reason: str) -> None:
        asked = list(keys)

        async def op(d: Discovery) -> None:
            await d.report_lost_parts(node_id=node_id, keys=asked, reason=reason)

        await self._net.call(self._src, DISCOVERY, f"report_lost_parts {node_id}", op)

    async def expected_parts(self, *, node_id: str) -> list[str]:
        async def op(d: Discovery) -> list[str]:
            return await d.expected_parts(node_id=node_id)

        return await self._net.call(self._src, DISCOVERY, "expected_parts", op)

    async def replace_part(
        self, *, version_id: str, index: int, failed_node_id: str
    ) -> PartPlacement:
        async def op(d: Discovery) -> PartPlacement:
            return await d.replace_part(
                version_id=version_id, index=index, failed_node_id=failed_node_id
            )

        return await self._net.call(self._src, DISCOVERY, f"replace_part {version_id}.{index}", op)

    async def extend_upload(self, *, version_id: str, size: int) -> None:
        async def op(d: Discovery) -> None:
            await d.extend_upload(version_id=version_id, size=size)

        await self._net.call(self._src, DISCOVERY, f"extend_upload {version_id}", op)


class SimStorageClient:
    """:class:`karma8.ports.StorageAPI` over the simulated network (node id = endpoint)."""

    def __init__(self, network: SimNetwork, src: str) -> None:
        self._net = network
        self._src = src

    async def put_part(
        self, node: NodeRef, key: str, chunks: AsyncIterable[bytes], *, size: int | None = None
    ) -> StoredPart:
        dst = node.node_id
        body = self._net.stream(self._src, dst, chunks)

        async def op(s: StorageNode) -> StoredPart:
            return await s.put_part(key, body)

        return await self._net.call(self._src, dst, f"put_part {key}", op)

    @asynccontextmanager
    async def read_part(
        self, node: NodeRef, key: str, *, offset: int, length: int, checksum: str | None = None
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        # ``checksum`` is unused: the simulated network delivers bytes as they were sent (the
        # node's disk checks them).
        dst = node.node_id

        # Opening is a call (so it pays latency and can fail like one); the stream then flows
        # back over the link and breaks if the node goes down.
        async def op(s: StorageNode) -> StorageNode:
            return s

        storage = await self._net.call(self._src, dst, f"read_part {key}", op)
        try:
            opened = storage.read_part(key, offset=offset, length=length)
            stream = await opened.__aenter__()
        except Karma8Error as exc:  # as if it came over the wire
            raise error_from_code(exc.code, exc.message) from None
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_exit(opened)
            yield self._net.stream(dst, self._src, stream, peer=dst)

    async def delete_part(self, node: NodeRef, key: str) -> None:
        async def op(s: StorageNode) -> None:
            await s.delete_part(key)

        await self._net.call(self._src, node.node_id, f"delete_part {key}", op)
