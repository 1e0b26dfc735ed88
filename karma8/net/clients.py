"""HTTP clients implementing the actors' ports: discovery API and storage API.

One ``httpx.AsyncClient`` per process is shared by both (connection reuse, keep-alive).
Transport failures become :class:`Unavailable`; error responses are rebuilt into the same
karma8 error class the server raised, from the JSON body's code. A discovery client can report,
at WARNING, while it cannot reach discovery: services that depend on it must not wait silently.

Several discovery instances (sharing one metadata database) are one :class:`HttpDiscoveryClient`
that fails over between them (:mod:`karma8.net.failover`); a small upload's commit, abort and
part replacement go only to the instance whose memory holds its placement lease.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any
from urllib.parse import quote

import httpx
import trio

from karma8.core.access import NamespaceInfo, Right, TokenInfo
from karma8.core.errors import IntegrityError, Karma8Error, Unavailable, error_from_code
from karma8.core.model import (
    FileEntry,
    FileVersion,
    NodeRef,
    NodeRegistration,
    NodeStatus,
    PartPlacement,
    PartReceipt,
    PlaceRequest,
    RepairStatus,
)
from karma8.core.rebalance_report import PlanSummary, RebalanceReport
from karma8.core.status import ClusterStatus
from karma8.net.codec import decode, encode
from karma8.net.exchange import SECRET_HEADER
from karma8.net.failover import ATTEMPT_TIMEOUT, Instances, Resend
from karma8.net.http_fixes import patch_httpcore
from karma8.net.requestlog import outgoing_headers
from karma8.ports import BlockingRunner, StoredPart


def make_http_client(
    secret: str | None, *, timeout: float = 60.0, max_connections: int | None = 200
) -> httpx.AsyncClient:
    """A pool of connections; ``max_connections`` None: unbounded (a caller that bounds
    them itself, as :class:`HttpStorageClient` per node)."""
    patch_httpcore()
    headers = {SECRET_HEADER: secret} if secret else {}
    return httpx.AsyncClient(
        headers=headers,
        event_hooks={"request": [_carry_request_id]},
        timeout=httpx.Timeout(timeout, connect=5.0),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=50),
    )


async def _carry_request_id(request: httpx.Request) -> None:
    """An internal request made while serving a request carries that request's id."""
    request.headers.update(outgoing_headers())


async def raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    await response.aread()
    try:
        error = response.json()["error"]
        raise error_from_code(str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        raise Karma8Error(f"HTTP {response.status_code} from {response.url}") from None


class _Http:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    async def send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """The response, whatever its status; a transport failure raises Unavailable, as
        does a call after this process closed its connections (it is stopping)."""
        if self._client.is_closed:
            raise Unavailable(f"{method} {url}: not sent, this process is shutting down")
        try:
            return await self._client.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise Unavailable(f"{method} {url}: {type(exc).__name__}") from None

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """The response of a request that succeeded; an error response raises its error."""
        response = await self.send(method, url, **kwargs)
        await raise_for_error(response)
        return response


def _path(*segments: str) -> str:
    return "/".join(quote(s, safe="/") for s in segments)


# Placement leases remembered per client (version id -> instance); entries leave at commit or
# abort, and the oldest go first past this many.
LEASES_REMEMBERED = 1 << 16


class HttpDiscoveryClient(_Http):
    """:class:`karma8.ports.DiscoveryAPI` over HTTP, to one discovery instance or several.

    ``urls``: one base URL, several comma-separated, or a sequence of them; the other
    arguments are :class:`karma8.net.failover.Instances`'s, which decides where each call
    goes. Without ``warn_every`` the caller reports failures (an admin command prints its one
    error line). Each call says whether it may be sent again after it may have arrived
    (:class:`karma8.net.failover.Resend`).
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        urls: str | Sequence[str],
        *,
        origin: str | None = None,
        warn_every: float | None = None,
        budget: float | None = None,
        attempt_timeout: float = ATTEMPT_TIMEOUT,
    ) -> None:
        super().__init__(client)
        self._instances = Instances(
            client,
            urls,
            origin=origin,
            warn_every=warn_every,
            budget=budget,
            attempt_timeout=attempt_timeout,
        )
        self._leases: dict[str, int] = {}  # small uploads' version id -> lease holder

    @property
    def urls(self) -> tuple[str, ...]:
        return self._instances.urls

    async def _json(
        self,
        method: str,
        path: str,
        *,
        resend: Resend = Resend.ALWAYS,
        only: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """The JSON answer of the first instance that answers (:class:`Instances`); an error
        answer raises its error."""
        response = await self._instances.call(method, path, resend=resend, only=only, **kwargs)
        await raise_for_error(response)
        return response.json() if response.content else None

    def _holder(self, version_id: str) -> int | None:
        """The instance holding a small upload's placement lease, if this client placed it."""
        return self._leases.get(version_id)

    async def begin_upload(
        self, *, namespace: str, name: str, size_hint: int | None, if_absent: bool = False
    ) -> FileVersion:
        body = {
            "namespace": namespace,
            "name": name,
            "size_hint": size_hint,
            "if_absent": if_absent,
        }
        return decode(await self._json("POST", "/v1/uploads", json=body), FileVersion)

    async def place_upload(
        self, *, namespace: str, name: str, size: int, if_absent: bool = False
    ) -> FileVersion:
        body = encode(PlaceRequest(namespace=namespace, name=name, size=size, if_absent=if_absent))
        version = decode(await self._json("POST", "/v1/placements", json=body), FileVersion)
        # The lease lives in the memory of the instance that answered: commit there.
        self._leases[version.version_id] = self._instances.current
        while len(self._leases) > LEASES_REMEMBERED:
            del self._leases[next(iter(self._leases))]
        return version

    async def commit_upload(
        self,
        *,
        version_id: str,
        size: int,
        receipts: Sequence[PartReceipt],
        if_absent: bool = False,
    ) -> FileVersion:
        body = {
            "size": size,
            "receipts": [encode(r) for r in receipts],
            "if_absent": if_absent,
        }
        path = f"/v1/uploads/{_path(version_id)}/commit"
        answer = await self._json("POST", path, only=self._holder(version_id), json=body)
        self._leases.pop(version_id, None)
        return decode(answer, FileVersion)

    async def abort_upload(self, *, version_id: str) -> FileVersion:
        path = f"/v1/uploads/{_path(version_id)}/abort"
        try:
            answer = await self._json("POST", path, only=self._holder(version_id))
        finally:
            self._leases.pop(version_id, None)
        return decode(answer, FileVersion)

    async def resolve(self, *, namespace: str, name: str) -> FileVersion:
        return decode(await self._json("GET", f"/v1/files/{_path(namespace, name)}"), FileVersion)

    async def delete_file(self, *, namespace: str, name: str) -> bool:
        result = await self._json("DELETE", f"/v1/files/{_path(namespace, name)}")
        return bool(result["deleted"])

    async def list_files(
        self, *, namespace: str, prefix: str, after: str, limit: int
    ) -> list[FileEntry]:
        result = await self._json(
            "GET",
            f"/v1/files/{_path(namespace)}",
            params={"prefix": prefix, "after": after, "limit": limit},
        )
        return [decode(e, FileEntry) for e in result["files"]]

    async def create_namespace(
        self,
        *,
        namespace: str,
        public: bool = False,
        engine: str = "raid0",
        copies: int | None = None,
        parity: int | None = None,
    ) -> NamespaceInfo:
        body: dict[str, object] = {"public": public, "engine": engine}
        if copies is not None:
            body["copies"] = copies
        if parity is not None:
            body["parity"] = parity
        path = f"/v1/namespaces/{_path(namespace)}"
        answer = await self._json("PUT", path, resend=Resend.UNSENT, json=body)
        return decode(answer, NamespaceInfo)

    async def list_namespaces(self) -> list[NamespaceInfo]:
        result = await self._json("GET", "/v1/namespaces")
        return [decode(n, NamespaceInfo) for n in result["namespaces"]]

    async def disable_namespace(self, *, namespace: str) -> NamespaceInfo:
        path = f"/v1/namespaces/{_path(namespace)}/disable"
        return decode(await self._json("POST", path), NamespaceInfo)

    async def create_token(
        self, *, namespace: str, read: bool, write: bool
    ) -> tuple[str, TokenInfo]:
        body = {"namespace": namespace, "read": read, "write": write}
        result = await self._json("POST", "/v1/tokens", resend=Resend.UNSENT, json=body)
        token = result.pop("token")
        return str(token), decode(result, TokenInfo)

    async def list_tokens(self, *, namespace: str | None = None) -> list[TokenInfo]:
        params = {"namespace": namespace} if namespace is not None else {}
        result = await self._json("GET", "/v1/tokens", params=params)
        return [decode(t, TokenInfo) for t in result["tokens"]]

    async def revoke_token(self, *, token_id: str) -> TokenInfo:
        return decode(await self._json("POST", f"/v1/tokens/{_path(token_id)}/revoke"), TokenInfo)

    async def check_access(self, *, namespace: str, token: str | None, right: Right) -> None:
        body = {"namespace": namespace, "token": token, "right": right.value}
        await self._json("POST", "/v1/access", json=body)

    async def register_node(self, registration: NodeRegistration) -> None:
        await self._json("POST", "/v1/nodes", json=encode(registration))

    async def heartbeat(
        self, registration: NodeRegistration, *, deleted: Sequence[str]
    ) -> list[str]:
        body = {"registration": encode(registration), "deleted": list(deleted)}
        path = f"/v1/nodes/{_path(registration.node_id)}/heartbeat"
        result = await self._json("POST", path, json=body)
        return [str(k) for k in result["garbage"]]

    async def list_nodes(self) -> list[NodeStatus]:
        result = await self._json("GET", "/v1/nodes")
        return [decode(n, NodeStatus) for n in result["nodes"]]

    async def forget_node(self, *, node_id: str) -> NodeStatus:
        """``karma8 nodes forget``: the node, forgotten (see :meth:`Discovery.forget_node`)."""
        return decode(await self._json("POST", f"/v1/nodes/{_path(node_id)}/forget"), NodeStatus)

    async def unknown_parts(self, *, node_id: str, keys: Sequence[str]) -> list[str]:
        path = f"/v1/nodes/{_path(node_id)}/unknown-parts"
        result = await self._json("POST", path, json={"keys": list(keys)})
        return [str(k) for k in result["unknown"]]

    async def report_node_failure(self, *, node_id: str, reason: str) -> None:
        path = f"/v1/nodes/{_path(node_id)}/failures"
        await self._json("POST", path, json={"reason": reason})

    async def report_lost_parts(self, *, node_id: str, keys: Sequence[str], reason: str) -> None:
        path = f"/v1/nodes/{_path(node_id)}/lost-parts"
        await self._json("POST", path, json={"keys": list(keys), "reason": reason})

    async def expected_parts(self, *, node_id: str) -> list[str]:
        result = await self._json("GET", f"/v1/nodes/{_path(node_id)}/parts")
        return [str(k) for k in result["keys"]]

    async def replace_part(
        self, *, version_id: str, index: int, failed_node_id: str
    ) -> PartPlacement:
        path = f"/v1/uploads/{_path(version_id)}/parts/{index}/replace"
        body = {"failed_node_id": failed_node_id}
        result = await self._json("POST", path, only=self._holder(version_id), json=body)
        return decode(result, PartPlacement)

    async def extend_upload(self, *, version_id: str, size: int) -> None:
        path = f"/v1/uploads/{_path(version_id)}/extend"
        await self._json("POST", path, json={"size": size})

    async def repair_status(self) -> RepairStatus:
        return decode(await self._json("GET", "/v1/repair"), RepairStatus)

    async def rebalance_report(self) -> RebalanceReport:
        return decode(await self._json("GET", "/v1/rebalance"), RebalanceReport)

    async def start_rebalance(self) -> RebalanceReport:
        return decode(await self._json("POST", "/v1/rebalance"), RebalanceReport)

    async def rebalance_plan(self) -> tuple[PlanSummary, RebalanceReport]:
        """The next round's plan (a dry run: nothing moves) and the status with it."""
        result = await self._json("POST", "/v1/rebalance", params={"dry_run": "1"})
        return decode(result, PlanSummary), decode(result.get("status"), RebalanceReport)

    async def cluster_status(self) -> ClusterStatus:
        """The cluster at a glance (``karma8 status``)."""
        return decode(await self._json("GET", "/v1/status"), ClusterStatus)


class HttpStorageClient(_Http):
    """:class:`karma8.ports.StorageAPI` over HTTP; nodes are addressed by their URL.

    A part goes out hashed (sha256, big chunks in ``blocking``'s worker threads), and the
    node's answer must name the same size and checksum: bytes damaged between this process's
    memory and the node's are an :class:`IntegrityError`, not a stored part.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        blocking: BlockingRunner,
        node_connections: int | None = None,
    ) -> None:
        super().__init__(client)
        self._blocking = blocking
        # Requests in flight per node (a connection each): uploads that hold one node's
        # connections do not take those of the others, nor discovery's (its own pool).
        self._node_connections = node_connections
        self._per_node: dict[str, trio.Semaphore] = {}

    @asynccontextmanager
    async def _connection(self, node: NodeRef) -> AsyncIterator[None]:
        if self._node_connections is None:
            yield
            return
        limit = self._per_node.get(node.url)
        if limit is None:
            limit = self._per_node[node.url] = trio.Semaphore(self._node_connections)
        async with limit:
            yield

    def _url(self, node: NodeRef, key: str) -> str:
        if not node.url:  # another node took its address (karma8.ports.MetadataStore)
            raise Unavailable(
                f"node {node.node_id} is unavailable: another node answers at the address it"
                " had, and it has not registered from one of its own since"
            )
        return f"{node.url.rstrip('/')}/v1/parts/{_path(key)}"

    async def put_part(
        self, node: NodeRef, key: str, chunks: AsyncIterable[bytes], *, size: int | None = None
    ) -> StoredPart:
        # With a known size the body goes out with a Content-Length: chunked framing would copy
        # every chunk once more to glue its size line on.
        headers = {"Content-Length": str(size)} if size is not None else None
        sent = _HashedChunks(chunks, self._blocking)
        async with self._connection(node):
            response = await self.request(
                "PUT", self._url(node, key), content=sent, headers=headers
            )
        stored = decode(response.json(), StoredPart)
        checksum = sent.digest.hexdigest()
        if stored.size != sent.size or stored.checksum != checksum:
            raise IntegrityError(
                f"node {node.node_id} stored part {key} as {stored.size} bytes with checksum"
                f" {stored.checksum}; {sent.size} bytes with checksum {checksum} were sent"
            )
        return stored

    @asynccontextmanager
    async def read_part(
        self, node: NodeRef, key: str, *, offset: int, length: int, checksum: str | None = None
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        url = self._url(node, key)
        try:
            async with (
                self._connection(node),
                self._client.stream(
                    "GET", url, params={"offset": offset, "length": length}
                ) as response,
            ):
                await raise_for_error(response)
                raw = response.aiter_raw()
                chunks = _RawChunks(raw, url)
                if checksum is None:
                    yield chunks
                else:
                    yield _CheckedChunks(
                        chunks, self._blocking, key=key, length=length, checksum=checksum
                    )
                # Readers stop at the exact length; reading the (empty) end of the stream
                # lets httpx finish its generators and keep the connection for reuse.
                async for _ in raw:
                    pass
        except httpx.TransportError as exc:
            raise Unavailable(f"GET {url}: {type(exc).__name__}") from None

    async def delete_part(self, node: NodeRef, key: str) -> None:
        async with self._connection(node):
            await self.request("DELETE", self._url(node, key))


# Chunks at least this big are hashed in a worker thread (hashlib releases the GIL, so the
# hash runs on another core while the loop moves bytes); smaller ones in place, where the
# hop would cost more than the hash.
OFFLOAD_BYTES = 1 << 16


class _HashedChunks:
    """Chunks on their way through the transport, hashed (sha256) and counted as they go."""

    def __init__(self, chunks: AsyncIterable[bytes], blocking: BlockingRunner) -> None:
        self._chunks = aiter(chunks)
        self._blocking = blocking
        self.digest = hashlib.sha256()
        self.size = 0

    def __aiter__(self) -> _HashedChunks:
        return self

    async def __anext__(self) -> bytes:
        chunk = await anext(self._chunks)
        if len(chunk) >= OFFLOAD_BYTES:
            await self._blocking(partial(self.digest.update, chunk))
        else:
            self.digest.update(chunk)
        self.size += len(chunk)
        return chunk


class _CheckedChunks(_HashedChunks):
    """A whole part arriving from a node: a mismatch with the part's checksum raises
    :class:`IntegrityError` instead of handing out the last chunk."""

    def __init__(
        self,
        chunks: AsyncIterable[bytes],
        blocking: BlockingRunner,
        *,
        key: str,
        length: int,
        checksum: str,
    ) -> None:
        super().__init__(chunks, blocking)
        self._key = key
        self._length = length
        self._checksum = checksum

    async def __anext__(self) -> bytes:
        chunk = await super().__anext__()
        if self.size >= self._length and self.digest.hexdigest() != self._checksum:
            raise IntegrityError(f"part {self._key} arrived damaged: not its checksum")
        return chunk


class _RawChunks:
    """A response body as an async iterator; transport errors become Unavailable."""

    def __init__(self, chunks: AsyncIterator[bytes], url: str) -> None:
        self._chunks = chunks
        self._url = url

    def __aiter__(self) -> _RawChunks:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await anext(self._chunks)
        except httpx.TransportError as exc:
            raise Unavailable(f"reading {self._url}: {type(exc).__name__}") from None
