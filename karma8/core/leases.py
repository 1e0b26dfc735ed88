"""Placement leases: where the parts of a small upload go, held in discovery's memory.

Theory of operation
-------------------
A small upload (its whole body in the gateway's hands) costs one metadata transaction: the
commit. Its placement is not written down; discovery grants a *lease* instead, kept here: the
version id, the name, the 5 nodes, the bytes reserved on each, and when the lease ends. Until
then the lease counts as a reservation (placement, the rebalancer's room checks and
``karma8 nodes`` add :meth:`PlacementLeases.reserved_on` to what the metadata reserves) and
its part keys count as known on their nodes, so a node's orphan check never takes a part
written for a commit still in flight. The commit takes the lease and writes the version, its
parts and their bytes in one transaction; an abort drops it; an expired lease is refused at
commit and dropped by the sweeper. Once a lease is gone its parts are unknown, and any a
gateway did not delete (it died, or its node was unreachable) are orphans the nodes collect.

Leases live in one process's memory: a discovery that restarts forgets them, so commits of the
uploads in flight are refused and their parts become orphans, as above. Time is passed in
(``now``), never read here. Discovery may call in from worker threads (its metadata calls on
PostgreSQL run there), so each method holds a lock: a running sum is never half updated.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import attrs

from karma8.core.layout import StripeLayout
from karma8.core.model import FileVersion, NodeRef, PartPlacement, VersionState, part_key
from karma8.core.placement import NodeLoad
from karma8.core.rebalance import NodeFill


@attrs.frozen(kw_only=True)
class Lease:
    """One small upload's placement: node ``nodes[i]`` takes part ``i`` (``reserved[i]``
    bytes) until ``expires_at``."""

    version_id: str
    namespace: str
    name: str
    layout: StripeLayout
    size: int
    nodes: tuple[str, ...]
    urls: tuple[str, ...]
    reserved: tuple[int, ...]
    created_at: float
    expires_at: float

    def placed_keys(self) -> Iterator[tuple[str, str]]:
        """(node id, part key) of every part the lease placed."""
        for index, node in enumerate(self.nodes):
            yield node, part_key(self.version_id, index)

    def keys_on(self, node_id: str) -> Iterator[str]:
        for index, node in enumerate(self.nodes):
            if node == node_id:
                yield part_key(self.version_id, index)

    def pending_version(self) -> FileVersion:
        """The PENDING version the lease stands for (no store holds it)."""
        return FileVersion(
            version_id=self.version_id,
            namespace=self.namespace,
            name=self.name,
            state=VersionState.PENDING,
            size=None,
            layout=self.layout,
            parts=tuple(
                PartPlacement(
                    index=index,
                    key=part_key(self.version_id, index),
                    node=NodeRef(node_id=node_id, url=url),
                )
                for index, (node_id, url) in enumerate(zip(self.nodes, self.urls, strict=True))
            ),
            created_at=self.created_at,
        )


class PlacementLeases:
    """The leases of one discovery process (see the module docstring).

    Each node's leased bytes are kept as a running sum, so asking costs a lookup.
    """

    def __init__(self) -> None:
        self._leases: dict[str, Lease] = {}
        self._by_node: dict[str, int] = {}
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._leases)

    def grant(self, lease: Lease) -> None:
        """Hold ``lease``; its version id must be new."""
        with self._lock:
            assert lease.version_id not in self._leases
            self._leases[lease.version_id] = lease
            self._count(lease, +1)

    def get(self, version_id: str, now: float) -> Lease | None:
        """The lease of ``version_id`` if held and not expired at ``now``."""
        lease = self._leases.get(version_id)
        return lease if lease is not None and lease.expires_at > now else None

    def holds(self, version_id: str) -> bool:
        """Whether ``version_id``'s lease is held, expired or not (it reserves until dropped)."""
        return version_id in self._leases

    def move(self, version_id: str, index: int, node_id: str, url: str) -> Lease:
        """Part ``index`` of a held lease goes to ``node_id``, its reservation with it."""
        with self._lock:
            lease = self._leases[version_id]
            nodes, urls = list(lease.nodes), list(lease.urls)
            nodes[index], urls[index] = node_id, url
            moved = attrs.evolve(lease, nodes=tuple(nodes), urls=tuple(urls))
            self._count(lease, -1)
            self._leases[version_id] = moved
            self._count(moved, +1)
            return moved

    def drop(self, version_id: str) -> Lease | None:
        """Release a lease (committed, aborted or expired); None if it was not held."""
        with self._lock:
            lease = self._leases.pop(version_id, None)
            if lease is not None:
                self._count(lease, -1)
            return lease

    def expire(self, now: float) -> list[str]:
        """Drop every lease that ended at or before ``now``; their version ids, sorted."""
        return [lease.version_id for lease in self.expire_leases(now)]

    def expire_leases(self, now: float) -> list[Lease]:
        """Drop every lease that ended at or before ``now``; the leases, by version id."""
        with self._lock:
            ended = sorted(v for v, lease in self._leases.items() if lease.expires_at <= now)
            return [lease for v in ended if (lease := self.drop(v)) is not None]

    def reserved_on(self, node_id: str) -> int:
        """Bytes the held leases reserve on ``node_id`` (expired ones until dropped)."""
        return self._by_node.get(node_id, 0)

    def with_held(self, loads: Sequence[NodeLoad]) -> list[NodeLoad]:
        """``loads`` with the bytes the leases hold added to each node's reserved bytes."""
        return [
            attrs.evolve(load, reserved=load.reserved + held)
            if (held := self.reserved_on(load.node_id))
            else load
            for load in loads
        ]

    def less_held(self, fills: Sequence[NodeFill]) -> list[NodeFill]:
        """``fills`` with the room the leases hold taken from each node's free bytes."""
        return [
            attrs.evolve(fill, free=fill.free - held)
            if (held := self.reserved_on(fill.node_id))
            else fill
            for fill in fills
        ]

    def keys_on(self, node_id: str, now: float) -> set[str]:
        """Part keys of unexpired leases on ``node_id``: known, never orphans."""
        with self._lock:
            return {
                key
                for lease in self._leases.values()
                if lease.expires_at > now
                for key in lease.keys_on(node_id)
            }

    def _count(self, lease: Lease, sign: int) -> None:
        for node, size in zip(lease.nodes, lease.reserved, strict=True):
            left = self._by_node.get(node, 0) + sign * size
            if left:
                self._by_node[node] = left
            else:
                self._by_node.pop(node, None)
