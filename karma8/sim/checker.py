"""Invariants checked at the end of a simulated run, after the quiet phase.

Each check returns a list of violations (empty = holds). They look at the world from outside
the actors: the reference history, the metadata store and every node's disk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from karma8.core.model import VersionState
from karma8.sim.cluster import SimCluster
from karma8.sim.workload import History, Op, read_violation


def reads_consistent(history: History, reads: list[Op]) -> list[str]:
    return [v for op in reads if (v := read_violation(history, op)) is not None]


def final_reads(history: History, finals: list[Op]) -> list[str]:
    """Every name reads back, without error, as the last acknowledged write left it."""
    problems = [f"final read of {op.name} failed: {op.error}" for op in finals if not op.ok]
    return problems + reads_consistent(history, [op for op in finals if op.ok])


def layout_holds(cluster: SimCluster) -> list[str]:
    """Committed versions: k parts on k distinct nodes, sizes per layout, bytes per checksum."""
    problems = []
    disks = {node.node_id: node.disk for node in cluster.nodes}
    for version in cluster.store.versions(VersionState.COMMITTED):
        assert version.size is not None
        expected = version.layout.part_sizes(version.size)
        nodes = [p.node.node_id for p in version.parts]
        where = f"{version.namespace}/{version.name} ({version.version_id})"
        if len(version.parts) != version.layout.parts or len(set(nodes)) != len(nodes):
            problems.append(f"{where}: parts on nodes {nodes}")
        for part in version.parts:
            stored = disks[part.node.node_id].parts.get(part.key)
            if stored is None:
                problems.append(f"{where}: part {part.index} missing on {part.node.node_id}")
                continue
            if len(stored.data) != expected[part.index] or part.size != expected[part.index]:
                problems.append(
                    f"{where}: part {part.index} has {len(stored.data)} bytes,"
                    f" layout says {expected[part.index]}"
                )
            if hashlib.sha256(stored.data).hexdigest() != part.checksum:
                problems.append(f"{where}: part {part.index} does not match its checksum")
        sizes = [
            len(disks[p.node.node_id].parts[p.key].data)
            for p in version.parts
            if p.key in disks[p.node.node_id].parts
        ]
        if sizes and max(sizes) - min(sizes) > 1:
            problems.append(f"{where}: part sizes {sizes} differ by more than one byte")
    return problems


def no_orphans(cluster: SimCluster) -> list[str]:
    """Only parts of committed versions are on disk, and metadata holds no garbage."""
    live = {
        part.key
        for version in cluster.store.versions(VersionState.COMMITTED)
        for part in version.parts
    }
    problems = [
        f"orphan part {key} on {node.node_id}"
        for node in cluster.nodes
        for key in sorted(node.disk.parts)
        if key not in live
    ]
    for state in (VersionState.PENDING, VersionState.ABORTED, VersionState.RETIRED):
        left = cluster.store.versions(state)
        if left:
            problems.append(f"{len(left)} {state.value} versions remain after the quiet phase")
    return problems


def reservations_released(cluster: SimCluster) -> list[str]:
    """With no upload in flight, no node has bytes reserved."""
    return [
        f"{node.node_id} still has {node.reserved_bytes} bytes reserved after the quiet phase"
        for node in cluster.store.list_nodes()
        if node.reserved_bytes != 0
    ]


def spread_pp(disks: Iterable[tuple[int, int]]) -> float:
    """Fill spread of ``(used, capacity)`` disks: max - min of used/capacity, in percentage points.

    Fill is relative to each disk's own capacity, so a cluster of mixed capacities that fills
    evenly spreads by 0, whatever its bytes per node.
    """
    fills = [100 * used / capacity for used, capacity in disks]
    return max(fills) - min(fills) if fills else 0.0


def fill_spread(cluster: SimCluster) -> float:
    """The nodes' fill spread at this moment, in percentage points (see :func:`spread_pp`)."""
    return spread_pp((node.disk.used, node.disk.capacity_bytes) for node in cluster.nodes)


def fill_within(cluster: SimCluster, bound_pp: float) -> list[str]:
    spread = fill_spread(cluster)
    if spread <= bound_pp:
        return []
    return [f"fill spread {spread:.3f} pp exceeds the bound {bound_pp} pp"]
