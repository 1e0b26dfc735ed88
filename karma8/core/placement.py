"""Placement: which storage nodes receive the parts of a new file version.

Theory of operation
-------------------
Candidates are available nodes with room for one part (``capacity - used - reserved``, all that
is on the disk and promised to it). They are ranked by fill fraction ``(live + reserved) /
capacity``, where *live* counts the bytes of current files only (not garbage or copies a part
move left behind, which go soon) and *reserved* counts bytes promised to uploads and part moves
in flight, so concurrent uploads see each other. The ``count`` lowest win; one node never holds
two parts of a version. Equal fills are common (a fresh cluster, nodes joining empty), so ties
break by a rendezvous hash of (salt, node id) where the salt is the version id: every upload
gets its own deterministic order over the tied nodes instead of all herding onto the same five.

A node with a fill gap can take at most one part per file, i.e. 1/k of the incoming bytes, so
writes alone close gaps slowly; that is a property of the layout, not of this policy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import attrs

from karma8.core.errors import NotEnoughNodes


@attrs.frozen(kw_only=True)
class NodeLoad:
    """What placement needs to know about one node."""

    node_id: str
    capacity: int
    used: int
    reserved: int = 0
    available: bool = True
    live: int | None = None  # bytes of current files; None: all of ``used``

    @property
    def free(self) -> int:
        return self.capacity - self.used - self.reserved

    @property
    def fill(self) -> float:
        held = self.used if self.live is None else self.live
        return (held + self.reserved) / self.capacity if self.capacity > 0 else 1.0


def rendezvous(salt: str, node_id: str) -> int:
    """A stable pseudo-random rank of ``node_id`` for ``salt`` (same on every machine)."""
    digest = hashlib.blake2b(f"{salt}\x00{node_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def place_parts(
    nodes: Sequence[NodeLoad], *, count: int, part_size: int, salt: str
) -> tuple[str, ...]:
    """Pick ``count`` distinct node ids for parts of ``part_size`` bytes, emptiest first.

    Raises:
        NotEnoughNodes: fewer than ``count`` available nodes have room.
    """
    candidates = [n for n in nodes if n.available and n.free >= part_size]
    if len(candidates) < count:
        available = sum(1 for n in nodes if n.available)
        raise NotEnoughNodes(
            f"need {count} storage nodes with {part_size} bytes free,"
            f" have {len(candidates)} ({available} available of {len(nodes)})"
        )
    ranked = sorted(candidates, key=lambda n: (n.fill, rendezvous(salt, n.node_id), n.node_id))
    return tuple(n.node_id for n in ranked[:count])


def usable_capacity(capacities: Sequence[int], *, parts: int = 5) -> int:
    """Bytes of files the nodes can hold together when every file puts ``parts`` equal parts on
    ``parts`` distinct nodes.

    A node then holds at most ``1/parts`` of all stored bytes, so a node bigger than that share
    can never fill. For the total ``T``: with the ``k`` largest nodes capped at ``T/parts``, the
    rest must hold ``T - k*T/parts``, so ``T <= parts * S_k / (parts - k)`` with ``S_k`` the
    sum of all but the ``k`` largest; the smallest of these bounds (k < parts) is reached.
    Fewer than ``parts`` nodes hold nothing.
    """
    if len(capacities) < parts:
        return 0
    ordered = sorted(capacities, reverse=True)
    rest = sum(ordered)
    bounds = []
    for k in range(parts):
        bounds.append(parts * rest // (parts - k))
        rest -= ordered[k]
    return min(bounds)
