"""What each role adds to its process's metrics when scraped (:mod:`karma8.net.metrics`):
states read from the objects that serve it, and the counts its actors keep."""

from __future__ import annotations

import os
from collections.abc import Iterable

from karma8.actors.discovery import Discovery
from karma8.actors.gateway import Gateway
from karma8.actors.rebalancer import Rebalancer
from karma8.actors.repair import Repairer
from karma8.actors.storage import StorageNode
from karma8.core.model import NodeState
from karma8.core.status import fill
from karma8.net.bounds import UploadGate
from karma8.net.metrics import Sample, Source


def gateway_source(gateway: Gateway, stats: dict[str, int], uploads: UploadGate) -> Source:
    async def read() -> Iterable[Sample]:
        failures: list[Sample] = [
            (
                "karma8_gateway_part_failures",
                "counter",
                "Part reads and writes that failed because of their node",
                {"node": node_id, "op": op},
                count,
            )
            for (node_id, op), count in sorted(gateway.part_failures.items())
        ]
        return [
            *failures,
            ("karma8_gateway_puts", "counter", "Files stored", {}, stats["puts"]),
            ("karma8_gateway_gets", "counter", "Reads begun", {}, stats["gets"]),
            (
                "karma8_gateway_read_failures",
                "counter",
                "Reads cut short by a part that failed mid-stream",
                {},
                stats["read_errors"],
            ),
            (
                "karma8_gateway_uploads_in_flight",
                "gauge",
                "Uploads in flight",
                {},
                uploads.in_flight,
            ),
            (
                "karma8_gateway_uploads_refused",
                "counter",
                "Uploads refused at max_uploads",
                {},
                uploads.refused,
            ),
            # Gateway workers share a port: this says which process answered the scrape.
            (
                "karma8_gateway_process",
                "gauge",
                "The gateway process that answered (pid); each counts its own requests",
                {"pid": str(os.getpid())},
                1,
            ),
        ]

    return read


def discovery_source(discovery: Discovery, rebalancer: Rebalancer, repairer: Repairer) -> Source:
    async def read() -> Iterable[Sample]:
        samples: list[Sample] = []
        for node in await discovery.list_nodes():
            labels = {"node": node.node_id}
            samples += [
                (
                    "karma8_node_capacity_bytes",
                    "gauge",
                    "A node's capacity",
                    labels,
                    node.capacity_bytes,
                ),
                ("karma8_node_used_bytes", "gauge", "Bytes a node stores", labels, node.used_bytes),
                (
                    "karma8_node_reserved_bytes",
                    "gauge",
                    "Bytes reserved for uploads",
                    labels,
                    node.reserved_bytes,
                ),
                ("karma8_node_fill_ratio", "gauge", "used / capacity", labels, fill(node)),
                ("karma8_node_parts", "gauge", "Parts a node holds", labels, node.parts),
                (
                    "karma8_node_last_seen_timestamp_seconds",
                    "gauge",
                    "A node's last heartbeat",
                    labels,
                    node.last_seen,
                ),
            ]
            for state in NodeState:
                samples.append(
                    (
                        "karma8_node_state",
                        "gauge",
                        "1 for the node's state",
                        {**labels, "state": state.value},
                        float(node.state is state),
                    )
                )
        totals = await discovery.totals()
        status = await rebalancer.status()
        repair = await repairer.status()
        samples += [
            ("karma8_files", "gauge", "Current (committed) files", {}, totals.files),
            ("karma8_file_bytes", "gauge", "Bytes of the current files", {}, totals.bytes),
            (
                "karma8_pending_uploads",
                "gauge",
                "Uploads begun, not committed or aborted",
                {},
                totals.pending_uploads,
            ),
            (
                "karma8_degraded_files",
                "gauge",
                "Current files with a part lost or on an unavailable node (below full redundancy)",
                {},
                totals.degraded_files,
            ),
            (
                "karma8_rebalance_moved_parts",
                "counter",
                "Parts moved by the rebalancer",
                {},
                status.moved_parts,
            ),
            (
                "karma8_rebalance_moved_bytes",
                "counter",
                "Bytes moved by the rebalancer",
                {},
                status.moved_bytes,
            ),
            (
                "karma8_rebalance_moving_parts",
                "gauge",
                "Part moves under way",
                {},
                status.moving_parts,
            ),
            (
                "karma8_rebalance_remaining_bytes",
                "gauge",
                "Bytes still to move to even the fill",
                {},
                status.remaining_bytes,
            ),
            (
                "karma8_fill_spread_pp",
                "gauge",
                "Max - min fill of the nodes, percentage points",
                {},
                status.spread_pp,
            ),
        ]
        samples += [
            (
                "karma8_repair_lost_parts",
                "gauge",
                "Parts of redundant files lost or on an unavailable node",
                {},
                repair.lost_parts,
            ),
            (
                "karma8_repair_due_parts",
                "gauge",
                "Lost parts due for repair (reported lost, or away repair_after), not rebuilding",
                {},
                repair.due_parts,
            ),
            (
                "karma8_repair_waiting_parts",
                "gauge",
                "Due parts no node may take now (each holds a part of their file)",
                {},
                repair.waiting_parts,
            ),
            (
                "karma8_repair_unrebuildable_parts",
                "gauge",
                "Lost parts that cannot be rebuilt now (too few readable parts of their file)",
                {},
                repair.unrebuildable_parts,
            ),
            (
                "karma8_repair_repairing_parts",
                "gauge",
                "Rebuilds under way",
                {},
                repair.repairing_parts,
            ),
            (
                "karma8_repair_repaired_parts",
                "counter",
                "Lost parts rebuilt on other nodes",
                {},
                repair.repaired_parts,
            ),
            (
                "karma8_repair_repaired_bytes",
                "counter",
                "Bytes of lost parts rebuilt on other nodes",
                {},
                repair.repaired_bytes,
            ),
        ]
        samples += _counts("karma8_discovery", discovery.counts, {})
        return samples

    return read


def storage_source(node: StorageNode) -> Source:
    async def read() -> Iterable[Sample]:
        return _counts("karma8_storage", node.counts, {"node": node.node_id})

    return read


# What the actors count, and how each count is shown.
_COUNTS: dict[str, str] = {
    "sweeps": "Sweeper passes",
    "expired_uploads": "Uploads the sweeper aborted (their gateway went away)",
    "expired_placements": "Placement leases of small uploads that expired uncommitted",
    "scrubbed_parts": "Parts the scrubber verified",
    "corrupt_parts": "Parts the scrubber found corrupt (quarantined)",
    "garbage_deleted": "Parts deleted as garbage (retired, aborted, moved away)",
    "orphans_deleted": "Parts deleted as orphans (no version names them)",
}


def _counts(prefix: str, counts: dict[str, int], labels: dict[str, str]) -> list[Sample]:
    return [
        (f"{prefix}_{name}", "counter", _COUNTS.get(name, name), labels, value)
        for name, value in sorted(counts.items())
    ]
