"""Invariants checked at the end of a simulated run, after the quiet phase.

Each check returns a list of violations (empty = holds). They look at the world from outside
the actors: the reference history, the metadata store and every node's disk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from karma8.core.leases import PlacementLeases
from karma8.core.model import NodeState, VersionState
from karma8.core.rebalance import NodeFill, bytes_over_target, fill_targets, spread_pp
from karma8.sim.cluster import SimCluster
from karma8.sim.workload import History, Op, read_violation


def reads_consistent(history: History, reads: list[Op]) -> list[str]:
    return [v for op in reads if (v := read_violation(history, op)) is not None]


def final_reads(history: History, finals: list[Op]) -> list[str]:
    """Every name reads back, without error, as the last acknowledged write left it."""
    problems = [f"final read of {op.name} failed: {op.error}" for op in finals if not op.ok]
    return problems + reads_consistent(history, [op for op in finals if op.ok])


def layout_holds(cluster: SimCluster) -> list[str]:
    """Committed versions: every stored part (data parts, copies, parity parts) on its own
    node, sizes per layout, bytes per checksum."""
    problems = []
    disks = {node.node_id: node.disk for node in cluster.nodes}
    for version in cluster.store.versions(VersionState.COMMITTED):
        assert version.size is not None
        expected = version.layout.slot_sizes(version.size)
        nodes = [p.node.node_id for p in version.parts]
        where = f"{version.namespace}/{version.name} ({version.version_id})"
        if len(version.parts) != version.layout.slots or len(set(nodes)) != len(nodes):
            problems.append(f"{where}: parts on nodes {nodes}")
        for part in version.parts:
            if part.key in cluster.lost_keys:
                continue  # wiped or damaged by a fault event: its loss is the event's
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
            for p in version.parts[: version.layout.parts]
            if p.key in disks[p.node.node_id].parts
        ]
        if sizes and max(sizes) - min(sizes) > 1:
            problems.append(f"{where}: part sizes {sizes} differ by more than one byte")
    return problems


def fully_redundant(cluster: SimCluster) -> list[str]:
    """Every current file of a redundant engine has every stored part intact on an
    available node: what faults took, repair rebuilt (no exemption for lost parts here)."""
    problems = []
    disks = {node.node_id: node.disk for node in cluster.nodes}
    available = {n.node_id for n in cluster.store.list_nodes() if n.state is NodeState.AVAILABLE}
    for version in cluster.store.versions(VersionState.COMMITTED):
        if not version.layout.tolerates:
            continue
        where = f"{version.namespace}/{version.name} ({version.version_id})"
        for part in version.parts:
            node = part.node.node_id
            stored = disks[node].parts.get(part.key)
            if node not in available:
                problems.append(f"{where}: part {part.index} is on unavailable node {node}")
            elif stored is None or hashlib.sha256(stored.data).hexdigest() != part.checksum:
                problems.append(f"{where}: part {part.index} is lost on {node}")
    counts = cluster.store.repair_counts(lost_before=float("inf"))
    if counts["repairing_parts"]:
        problems.append(f"{counts['repairing_parts']} repairs are still under way")
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
    # A node lost for good (wiped and not back) never deletes its share of garbage: versions
    # with a part there stay, rightly, until it returns.
    down = {n.node_id for n in cluster.nodes if not cluster.network.endpoint(n.node_id).up}
    for state in (VersionState.PENDING, VersionState.ABORTED, VersionState.RETIRED):
        left = [
            v for v in cluster.store.versions(state) if not {p.node.node_id for p in v.parts} & down
        ]
        if left:
            problems.append(f"{len(left)} {state.value} versions remain after the quiet phase")
    counts = cluster.store.move_counts()
    moving = counts["moving_parts"] + cluster.store.repair_counts(0.0)["repairing_parts"]
    if moving:
        problems.append(f"{moving} part moves are still under way")
    # Copies left on a node lost for good wait for it, like its other garbage; a part lost
    # by a fault event fails every move of it, each leaving a (missing) copy to forget.
    stale = [
        (key, node)
        for key, node in cluster.store.stale_copies()
        if node not in down and key not in cluster.lost_keys
    ]
    if stale:
        problems.append(f"{len(stale)} copies left by moves are not deleted")
    return problems


def reservations_released(cluster: SimCluster) -> list[str]:
    """With no upload in flight, no node has bytes reserved, in the metadata or by a
    placement lease."""
    leases = cluster.discovery.leases if cluster.discovery is not None else PlacementLeases()
    problems = [
        f"{node.node_id} still has {node.reserved_bytes} bytes reserved after the quiet phase"
        for node in cluster.store.list_nodes()
        if node.reserved_bytes != 0
    ]
    if len(leases):
        problems.append(f"{len(leases)} placement leases are still held after the quiet phase")
    return problems


def _fills(cluster: SimCluster) -> list[NodeFill]:
    return [
        NodeFill(node_id=n.node_id, capacity=n.disk.capacity_bytes, live=n.disk.used, free=0)
        for n in cluster.nodes
    ]


def fill_spread(cluster: SimCluster) -> float:
    """The nodes' fill spread now, in percentage points: max - min of used / capacity among
    the nodes that can fill (a node bigger than a fifth of the cluster's bytes cannot)."""
    return spread_pp(_fills(cluster))


def fill_within(cluster: SimCluster, bound_pp: float) -> list[str]:
    spread = fill_spread(cluster)
    if spread <= bound_pp:
        return []
    return [f"fill spread {spread:.3f} pp exceeds the bound {bound_pp} pp"]


def refused_puts(history: History) -> int:
    return sum(1 for op in history.ops if op.kind == "put" and op.error == "not_enough_nodes")


def refusals_within(history: History, bound: int) -> list[str]:
    refused = refused_puts(history)
    return [] if refused <= bound else [f"{refused} PUTs refused (not_enough_nodes), bound {bound}"]


def least_to_move(cluster: SimCluster, moves: Sequence[tuple[str, str, str, int]]) -> int:
    """The least any rebalancer must have moved to reach the end state: the bytes each node
    would hold had nothing moved, above its target for the bytes stored at the end."""
    live: dict[str, int] = {node.node_id: 0 for node in cluster.nodes}
    live_keys = set()
    for version in cluster.store.versions(VersionState.COMMITTED):
        for part in version.parts:
            live[part.node.node_id] += part.size or 0
            live_keys.add(part.key)
    unmoved = dict(live)
    for key, source, target, size in moves:
        if key in live_keys:
            unmoved[target] -= size
            unmoved[source] += size
    fills = [
        NodeFill(node_id=n.node_id, capacity=n.disk.capacity_bytes, live=live[n.node_id], free=0)
        for n in cluster.nodes
    ]
    return bytes_over_target(unmoved, fill_targets(fills))


def move_ratio(moved: int, least: int) -> float:
    """Bytes moved over the least needed (1.0 when neither moved nor needed anything)."""
    if least == 0:
        return 1.0 if moved == 0 else float("inf")
    return moved / least


def moves_within(moved: int, least: int, bound: float) -> list[str]:
    ratio = move_ratio(moved, least)
    if ratio <= bound:
        return []
    return [f"moved {moved} bytes, {ratio:.3f} x the least needed ({least}); bound {bound}"]
