"""Discovery's durable state: the metadata store (``karma8.metadata`` implements it, on SQLite
or PostgreSQL)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from karma8.core.access import NamespaceInfo, Right, TokenInfo
from karma8.core.layout import StripeLayout
from karma8.core.model import (
    ClusterTotals,
    FileEntry,
    FileVersion,
    MoveTicket,
    NodeArrival,
    NodeRegistration,
    NodeStatus,
    PartPlacement,
    PartReceipt,
    Repair,
)
from karma8.core.placement import NodeLoad
from karma8.core.rebalance import MovablePart, NodeFill


class MetadataStore(Protocol):
    """Discovery's durable state. Every method is one short, atomic transaction."""

    def create_namespace(self, namespace: str, now: float, *, public: bool = False) -> None: ...

    def add_namespace(
        self, namespace: str, now: float, *, public: bool, copies: int = 1, parity: int = 0
    ) -> NamespaceInfo: ...

    def namespace_info(self, namespace: str) -> NamespaceInfo: ...

    def disable_namespace(self, namespace: str) -> NamespaceInfo: ...

    def list_namespaces(self) -> list[NamespaceInfo]: ...

    def namespace_exists(self, namespace: str) -> bool: ...

    def add_token(
        self,
        *,
        token_id: str,
        namespace: str,
        read: bool,
        write: bool,
        secret_hash: str,
        now: float,
    ) -> TokenInfo: ...

    def list_tokens(self, namespace: str | None = None) -> list[TokenInfo]: ...

    def revoke_token(self, token_id: str, now: float) -> TokenInfo: ...

    def check_access(
        self, namespace: str, token_id: str | None, secret_hash: str | None, right: Right
    ) -> None: ...

    def upsert_node(
        self,
        registration: NodeRegistration,
        now: float,
        *,
        suspect_for: float = 0.0,
    ) -> NodeArrival: ...

    def mark_node_suspect(self, node_id: str, now: float) -> bool: ...

    def mark_stale_nodes(self, seen_before: float) -> list[str]: ...

    def forget_node(self, node_id: str, now: float, *, heard_before: float) -> NodeStatus:
        """See :meth:`karma8.metadata.nodes.NodeStore.forget_node`."""
        ...

    def list_nodes(self) -> list[NodeStatus]: ...

    def totals(self) -> ClusterTotals:
        """Committed files, their bytes, and pending uploads."""
        ...

    def hold_leadership(self, role: str, holder: str, *, now: float, until: float) -> bool:
        """Take or renew ``role``'s lease for ``holder`` until ``until``; True if ``holder``
        holds it (discovery instances sharing a store run a role only while they do)."""
        ...

    def begin_version(
        self,
        *,
        version_id: str,
        namespace: str,
        name: str,
        layout: StripeLayout,
        size_hint: int | None,
        now: float,
        expires_at: float,
        if_absent: bool,
        place: Callable[[Sequence[NodeLoad]], Sequence[str]],
        reserve_size: int | None = None,
    ) -> FileVersion: ...

    def extend_reservation(self, *, version_id: str, size: int) -> None: ...

    def commit_version(
        self,
        *,
        version_id: str,
        size: int,
        receipts: Sequence[PartReceipt],
        now: float,
        if_absent: bool,
    ) -> FileVersion: ...

    def abort_version(self, version_id: str, now: float) -> FileVersion: ...

    def placement_view(
        self, namespace: str, name: str, *, if_absent: bool
    ) -> list[tuple[NodeLoad, str]]: ...

    def commit_placed(
        self,
        *,
        version_id: str,
        namespace: str,
        name: str,
        layout: StripeLayout,
        nodes: Sequence[str],
        size: int,
        receipts: Sequence[PartReceipt],
        created_at: float,
        now: float,
        if_absent: bool,
    ) -> FileVersion: ...

    def replace_part(
        self,
        *,
        version_id: str,
        index: int,
        failed_node_id: str,
        place: Callable[[Sequence[NodeLoad], int], Sequence[str]],
    ) -> PartPlacement: ...

    def current_version(self, namespace: str, name: str) -> FileVersion | None: ...

    def retire_current(self, namespace: str, name: str, now: float) -> bool: ...

    def list_files(
        self, namespace: str, *, prefix: str, after: str, limit: int
    ) -> list[FileEntry]: ...

    def expire_pending(self, now: float) -> int: ...

    def garbage_for_node(self, node_id: str, *, retired_before: float, limit: int) -> list[str]: ...

    def forget_parts(self, node_id: str, keys: Sequence[str]) -> int: ...

    def part_keys_on_node(self, node_id: str) -> set[str]: ...

    def expire_moves(self, now: float) -> int: ...

    def rebalance_fills(self) -> list[NodeFill]: ...

    def movable_parts(
        self, node_id: str, *, limit: int, receivers: Sequence[str]
    ) -> list[MovablePart]: ...

    def begin_move(
        self,
        *,
        key: str,
        source: str,
        target: str,
        now: float,
        lease_until: float,
        held: int = 0,
    ) -> MoveTicket: ...

    def finish_move(self, *, key: str, target: str, checksum: str, now: float) -> None: ...

    def abort_move(self, key: str, now: float) -> bool: ...

    def move_counts(self) -> dict[str, int]: ...

    def mark_damaged(self, node_id: str, keys: Sequence[str], reason: str, now: float) -> int: ...

    def forget_present(self, node_id: str, present: Sequence[str]) -> int: ...

    def expected_parts(self, node_id: str) -> list[str]: ...

    def begin_repairs(
        self,
        *,
        lost_before: float,
        limit: int,
        now: float,
        lease_until: float,
        place: Callable[[Sequence[NodeLoad], MovablePart], str | None],
        held: Callable[[str], int],
    ) -> list[Repair]: ...

    def repair_counts(self, lost_before: float) -> dict[str, int]: ...
