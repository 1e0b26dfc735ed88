"""The actors' services to one another: what gateways and nodes ask of discovery, what the
rebalancer asks of it, and what a gateway asks of any storage node."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Protocol, runtime_checkable

import attrs

from karma8.core.access import NamespaceInfo, Right, TokenInfo
from karma8.core.errors import Karma8Error
from karma8.core.model import (
    FileEntry,
    FileVersion,
    MoveTicket,
    NodeRef,
    NodeRegistration,
    NodeStatus,
    PartPlacement,
    PartReceipt,
    RebalanceStatus,
    Repair,
    RepairStatus,
)
from karma8.core.rebalance import Move, RebalancePlan


@attrs.frozen(kw_only=True)
class StoredPart:
    """A part as a storage node holds it."""

    key: str
    size: int
    checksum: str


class DiscoveryAPI(Protocol):
    """What gateways and storage nodes ask of discovery."""

    async def begin_upload(
        self, *, namespace: str, name: str, size_hint: int | None, if_absent: bool = False
    ) -> FileVersion:
        """Create a pending version and place its parts. Raises NotFound, NotEnoughNodes,
        PreconditionFailed (``if_absent`` and the name exists), TooLarge."""
        ...

    async def place_upload(
        self, *, namespace: str, name: str, size: int, if_absent: bool = False
    ) -> FileVersion:
        """Place a small upload whose ``size`` is known, without writing anything down: the
        placement is a lease in discovery's memory (``placement_lease`` seconds), its bytes
        reserved there. The answer is a PENDING version that no store holds; commit it with
        :meth:`commit_upload` (one transaction), drop it with :meth:`abort_upload`, move a
        part with :meth:`replace_part`. Raises NotFound, NotEnoughNodes, PreconditionFailed,
        TooLarge, InvalidRequest."""
        ...

    async def commit_upload(
        self,
        *,
        version_id: str,
        size: int,
        receipts: Sequence[PartReceipt],
        if_absent: bool = False,
    ) -> FileVersion:
        """Atomically make the version current and retire the previous one.

        For a placement lease (:meth:`place_upload`) this is the upload's one transaction: the
        version is written COMMITTED with its parts, and the lease released.

        Raises UploadConflict if the version is no longer pending (or its lease expired or
        is unknown), PreconditionFailed if ``if_absent`` and another version became current
        meanwhile, IntegrityError if the receipts do not match the layout.
        """
        ...

    async def abort_upload(self, *, version_id: str) -> FileVersion:
        """Abort a pending version or drop a placement lease. Returns the version's state
        afterwards: if the version had already committed (a commit whose answer was lost), it
        stays committed. Raises NotFound if the version is unknown (never written down, or
        already collected): it cannot commit any more."""
        ...

    async def resolve(self, *, namespace: str, name: str) -> FileVersion:
        """The committed version of a file. Raises NotFound."""
        ...

    async def delete_file(self, *, namespace: str, name: str) -> bool:
        """Retire the committed version; True if there was one."""
        ...

    async def list_files(
        self, *, namespace: str, prefix: str, after: str, limit: int
    ) -> list[FileEntry]: ...

    async def create_namespace(
        self,
        *,
        namespace: str,
        public: bool = False,
        engine: str = "raid0",
        copies: int | None = None,
        parity: int | None = None,
    ) -> NamespaceInfo:
        """Create a namespace (idempotent; enables a disabled one) whose new files are written
        with ``engine`` (raid0, raid1 with ``copies``, parity with ``parity`` parts; see
        :func:`karma8.core.layout.engine_redundancy`). Raises InvalidName,
        InvalidRequest if it exists with the other ``public``."""
        ...

    async def list_namespaces(self) -> list[NamespaceInfo]: ...

    async def disable_namespace(self, *, namespace: str) -> NamespaceInfo:
        """No more reads or writes there (404); files and tokens are kept. Raises NotFound."""
        ...

    async def create_token(
        self, *, namespace: str, read: bool, write: bool
    ) -> tuple[str, TokenInfo]:
        """A new token and what it grants; the token text is returned only here."""
        ...

    async def list_tokens(self, *, namespace: str | None = None) -> list[TokenInfo]:
        """Every token, or ``namespace``'s; raises NotFound for a namespace never created."""
        ...

    async def revoke_token(self, *, token_id: str) -> TokenInfo: ...

    async def check_access(self, *, namespace: str, token: str | None, right: Right) -> None:
        """Raise unless ``token`` (None: anonymous) may ``right`` in ``namespace``: NotFound
        (no such namespace, or disabled), Unauthorized (no token, an unknown, wrong or
        revoked one), Forbidden (another namespace's token, or one without the right)."""
        ...

    async def register_node(self, registration: NodeRegistration) -> None: ...

    async def heartbeat(
        self, registration: NodeRegistration, *, deleted: Sequence[str]
    ) -> list[str]:
        """Report liveness and the garbage keys deleted since the last heartbeat; returns the
        keys of garbage parts this node should delete now."""
        ...

    async def list_nodes(self) -> list[NodeStatus]: ...

    async def unknown_parts(self, *, node_id: str, keys: Sequence[str]) -> list[str]:
        """Those of ``keys``, every part ``node_id`` holds, that discovery has no record of
        on it (orphans). Those among them its parts check reported missing are no longer
        marked lost."""
        ...

    async def report_node_failure(self, *, node_id: str, reason: str) -> None:
        """A write to ``node_id`` failed because of the node (unreachable, disk full, a
        storage failure): it gets no new parts until a heartbeat proves it healthy."""
        ...

    async def report_lost_parts(self, *, node_id: str, keys: Sequence[str], reason: str) -> None:
        """``node_id`` lost these parts (they failed their checksum, or are missing): the
        redundant ones are rebuilt elsewhere. Keys it does not hold are ignored."""
        ...

    async def expected_parts(self, *, node_id: str) -> list[str]:
        """Keys of the current versions' parts that discovery knows on ``node_id``: a node
        that lists its own keys after asking finds those it lost."""
        ...

    async def replace_part(
        self, *, version_id: str, index: int, failed_node_id: str
    ) -> PartPlacement:
        """Move part ``index`` of a pending upload (or of a placement lease), and its
        reservation, off a node that failed (before taking any of its bytes, or at any point
        for a body the gateway holds whole), onto an available node that holds no other part
        of it.

        Raises UploadConflict (not pending, or the part is not on that node), NotEnoughNodes.
        """
        ...

    async def extend_upload(self, *, version_id: str, size: int) -> None:
        """Reserve room on the parts' nodes for a ``size``-byte file: at begin, only the
        first ``reserve_step`` bytes of the size hint are reserved, and the gateway extends the
        reservation as the body's bytes arrive.

        Raises UploadConflict (not pending), DiskFull (a node has no room; nothing reserved).
        """
        ...


class RebalanceAPI(Protocol):
    """What the rebalancer asks of discovery: plans, and the steps of each part move."""

    async def plan_rebalance(
        self,
        *,
        tolerance_pp: float,
        batch: int,
        max_bytes: int | None = None,
        no_donors: frozenset[str] = frozenset(),
        no_receivers: frozenset[str] = frozenset(),
    ) -> RebalancePlan: ...

    async def rebalance_status(self) -> RebalanceStatus: ...

    async def begin_move(self, move: Move, *, lease: float) -> MoveTicket:
        """Record the move, reserve its bytes on the target. Raises MoveConflict."""
        ...

    async def finish_move(self, *, key: str, target: str, checksum: str) -> None:
        """Switch the part to the target's copy. Raises MoveConflict or IntegrityError
        (the move is then aborted)."""
        ...

    async def abort_move(self, *, key: str) -> None: ...

    async def begin_repairs(self, *, repair_after: float, limit: int, lease: float) -> list[Repair]:
        """Record moves that rebuild up to ``limit`` lost parts of redundant versions (reported
        lost, or on a node unavailable for ``repair_after`` seconds), each onto an available
        node holding no part of its version; finished or aborted like any move."""
        ...

    async def repair_status(self, *, repair_after: float) -> RepairStatus: ...


class StorageAPI(Protocol):
    """What a gateway asks of any storage node, addressed by :class:`NodeRef`."""

    async def put_part(
        self, node: NodeRef, key: str, chunks: AsyncIterable[bytes], *, size: int | None = None
    ) -> StoredPart:
        """Stream a part to ``node``; returns once it is durable there.

        ``size``, when the caller knows it, is the exact byte count the chunks add up to (a
        transport may announce it, e.g. as a Content-Length, instead of framing chunks).

        The returned size and checksum are of the bytes the node stored, as the node computed
        them. A transport that can damage bytes on the way checks them against what it sent
        and raises :class:`IntegrityError` on a mismatch (the HTTP client does); an
        in-process call hands the node the caller's own ``bytes`` and has nothing to check.
        """
        ...

    def read_part(
        self, node: NodeRef, key: str, *, offset: int, length: int, checksum: str | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Open ``length`` bytes of a part from ``offset`` as a stream of chunks.

        The node checks what it reads from its disk (the file store: every block's CRC
        before any byte of it is handed out). ``checksum`` (the part's sha256, given for a
        whole-part read) is for a transport that can damage bytes on the way: it hashes what
        arrives and raises :class:`IntegrityError` before the last chunk on a mismatch (the
        HTTP client does). An in-process read hands on the node's own bytes.
        """
        ...

    async def delete_part(self, node: NodeRef, key: str) -> None:
        """Delete a part; deleting a missing part is not an error."""
        ...


@runtime_checkable
class WholePartWriter(Protocol):
    """A :class:`StorageAPI` that can store the parts of a body held whole together: their
    writes run in one sync round, for one wait, instead of one writer each (the embedded
    cluster's nodes in the gateway's own process)."""

    async def put_whole_parts(
        self, parts: Sequence[tuple[NodeRef, str, bytes]]
    ) -> list[StoredPart | Karma8Error] | None:
        """Store each ``(node, key, bytes)``; per part what it stored or why it did not (as
        :meth:`StorageAPI.put_part` would have raised). None, having done nothing, if these
        parts cannot be stored that way (a node elsewhere, a part too large to pack): the
        caller writes them one by one. Cancelled, the parts written are garbage, as a
        cancelled ``put_part``'s."""
        ...


@runtime_checkable
class WholeParts(Protocol):
    """A :class:`StorageAPI` that can hand some parts over whole at once, without opening a
    stream (a gateway worker's reads of packed parts from its nodes' files)."""

    def parts_now(self, parts: Sequence[PartPlacement]) -> list[bytes] | None:
        """Every one of ``parts`` whole, if each can be read at once here and is intact (its
        CRC, and its placement's checksum, the sha256); else None, and the caller reads them
        the usual way, which finds out why. Blocking, but brief (one read of each small
        part)."""
        ...


@attrs.frozen(kw_only=True)
class Loan:
    """A volume a node lent to another process on its host to append small parts to
    (:mod:`karma8.store.packed.loans`).

    Attributes:
        volume: The volume's id in the node's packed store.
        salt: What the needles' header checks are keyed with (the volume's).
        path: The volume's file.
        borrower: Who it is lent to (the name the borrower gave).
        start: Where the borrower's first append goes (the end of what the volume holds).
    """

    volume: int
    salt: bytes
    path: Path
    borrower: str
    start: int = 0


@attrs.frozen(kw_only=True)
class Appended:
    """A needle a borrower appended to a lent volume and made durable: what the node is asked
    to adopt as a part.

    Attributes:
        volume: The lent volume's id.
        offset: Where the needle starts.
        key: The part's key.
        length: Payload bytes.
        sha256: The payload's sha256 (hex): the part's checksum.
    """

    volume: int
    offset: int
    key: str
    length: int
    sha256: str


@runtime_checkable
class LendingStorage(Protocol):
    """A :class:`StorageAPI` whose nodes lend volumes to other processes on their host, so
    that those append small parts themselves and the nodes only adopt them (the embedded
    cluster's nodes, for its gateway workers)."""

    async def lend_volume(self, node: NodeRef, borrower: str) -> Loan:
        """A new volume of ``node`` for ``borrower``.

        Raises:
            Unavailable: The node is not in this process, or does not pack small parts.
            DiskFull, StorageFailure: The volume could not be created.
        """
        ...

    async def adopt_parts(
        self, borrower: str, parts: Sequence[tuple[NodeRef, Appended]]
    ) -> list[StoredPart | Karma8Error]:
        """Each needle made a part of its node, once read back and checked; per part what
        was stored or why not (NotFound: no such loan; IntegrityError: not that needle,
        whole; UploadConflict; DiskFull; Unavailable: the node is not here)."""
        ...

    async def give_back_volume(self, node: NodeRef, borrower: str, volume: int, end: int) -> None:
        """End a loan (no append of the borrower's in flight; ``end``: where its next one
        would have gone). Raises NotFound if it is not lent to ``borrower``."""
        ...
