"""The cluster at a glance: what ``karma8 status`` and discovery's status page show. Pure."""

from __future__ import annotations

import attrs

from karma8.core.access import NamespaceInfo
from karma8.core.model import ClusterTotals, NodeState, NodeStatus, RepairStatus
from karma8.core.rebalance_report import RebalanceReport
from karma8.core.units import format_size

# Nodes that take no parts and whose capacity counts in no total.
DOWN = frozenset({NodeState.UNAVAILABLE, NodeState.FORGOTTEN})


@attrs.frozen(kw_only=True)
class LoggedError:
    """A warning or error a process logged (discovery keeps the latest few)."""

    time: float
    level: str
    logger: str
    message: str
    request_id: str

    @property
    def shown_message(self) -> str:
        """The message without the `` [request ID]`` a log line carries, for a screen that
        shows the id on its own."""
        return self.message.replace(f" [request {self.request_id}]", "")


@attrs.frozen(kw_only=True)
class ClusterStatus:
    """``GET /v1/status`` at discovery."""

    time: float
    nodes: tuple[NodeStatus, ...]
    namespaces: tuple[NamespaceInfo, ...]
    totals: ClusterTotals
    rebalance: RebalanceReport
    repair: RepairStatus
    recent_errors: tuple[LoggedError, ...]

    @property
    def capacity_bytes(self) -> int:
        """Capacity of the nodes that take parts (available or suspect)."""
        return sum(n.capacity_bytes for n in self.nodes if n.state not in DOWN)

    @property
    def used_bytes(self) -> int:
        """Bytes on the nodes, but those the operator forgot (gone for good)."""
        return sum(n.used_bytes for n in self.nodes if n.state is not NodeState.FORGOTTEN)

    @property
    def kept_nodes(self) -> int:
        """The nodes but those the operator forgot."""
        return sum(1 for n in self.nodes if n.state is not NodeState.FORGOTTEN)

    def nodes_summary(self) -> str:
        """``15 nodes (13 available)``, and ``, 1 forgotten`` when the operator forgot some
        (they count in neither number)."""
        forgotten = self.count(NodeState.FORGOTTEN)
        return f"{self.kept_nodes} nodes ({self.count(NodeState.AVAILABLE)} available)" + (
            f", {forgotten} forgotten" if forgotten else ""
        )

    def count(self, state: NodeState) -> int:
        return sum(1 for n in self.nodes if n.state is state)


def fill(node: NodeStatus) -> float:
    """The part of a node's capacity in use, 0 to 1 (0 for a node without capacity)."""
    if node.capacity_bytes <= 0:
        return 0.0
    return min(1.0, node.used_bytes / node.capacity_bytes)


def seen_ago(node: NodeStatus, now: float) -> float:
    """Seconds since the node's last heartbeat."""
    return max(0.0, now - node.last_seen)


def repair_line(repair: RepairStatus) -> str:
    """One line on redundancy and its repair, for ``karma8 nodes``, ``status`` and the page."""
    rate = (
        f", {format_size(repair.rate_bytes_per_s)}/s"
        if repair.repairing_parts and repair.rate_bytes_per_s > 0
        else ""
    )
    waiting = (
        f", {repair.waiting_parts} waiting for a node that holds no part of their file"
        if repair.waiting_parts
        else ""
    )
    stuck = (
        f", {repair.unrebuildable_parts} cannot be rebuilt: too few readable parts of their"
        " file; they wait for a node to return"
        if repair.unrebuildable_parts
        else ""
    )
    return (
        f"repair: {repair.degraded_files} files below full redundancy,"
        f" {repair.lost_parts} lost parts ({repair.due_parts} due{waiting}{stuck}),"
        f" {repair.repairing_parts} rebuilding, {repair.repaired_parts} rebuilt"
        f" ({format_size(repair.repaired_bytes)}){rate}"
    )
