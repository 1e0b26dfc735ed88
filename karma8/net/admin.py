"""Admin views of a running cluster: ``karma8 nodes`` (and ``nodes forget``), ``stat``,
``scrub``, ``rebalance``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from karma8.core.errors import Karma8Error
from karma8.core.layout import StripeLayout
from karma8.core.model import FileVersion, NodeState, NodeStatus, RepairStatus
from karma8.core.placement import usable_capacity
from karma8.core.rebalance_report import IDLE, REBALANCING, PlanSummary, RebalanceReport
from karma8.core.units import format_size
from karma8.net.clients import HttpDiscoveryClient, make_http_client, raise_for_error
from karma8.net.codec import encode


async def fetch_nodes(discovery_url: str, secret: str | None) -> list[NodeStatus]:
    async with make_http_client(secret, timeout=10.0) as http:
        return await HttpDiscoveryClient(http, discovery_url).list_nodes()


async def fetch_nodes_and_movers(
    discovery_url: str, secret: str | None
) -> tuple[list[NodeStatus], RebalanceReport, RepairStatus]:
    async with make_http_client(secret, timeout=10.0) as http:
        discovery = HttpDiscoveryClient(http, discovery_url)
        return (
            await discovery.list_nodes(),
            await discovery.rebalance_report(),
            await discovery.repair_status(),
        )


async def forget_node(discovery_url: str, secret: str | None, node_id: str) -> NodeStatus:
    async with make_http_client(secret, timeout=30.0) as http:
        return await HttpDiscoveryClient(http, discovery_url).forget_node(node_id=node_id)


def forgotten_text(node: NodeStatus) -> str:
    """What ``karma8 nodes forget`` prints."""
    return (
        f"node {node.node_id} is forgotten: the parts still on it ({node.parts} now) are lost"
        " there; repair rebuilds those of raid1 and parity files on other nodes now (karma8"
        " nodes shows the progress); raid0 files with a part there are lost. The id is"
        " refused from now on: a node restarted on its directory must be wiped and start as"
        " a new node."
    )


async def fetch_plan(discovery_url: str, secret: str | None) -> tuple[PlanSummary, RebalanceReport]:
    async with make_http_client(secret, timeout=60.0) as http:
        return await HttpDiscoveryClient(http, discovery_url).rebalance_plan()


async def start_rebalance(discovery_url: str, secret: str | None) -> RebalanceReport:
    async with make_http_client(secret, timeout=10.0) as http:
        return await HttpDiscoveryClient(http, discovery_url).start_rebalance()


async def fetch_version(
    discovery_url: str, secret: str | None, namespace: str, name: str
) -> tuple[FileVersion, dict[str, NodeState]]:
    """A file's current version, and the state of every node (for its redundancy)."""
    async with make_http_client(secret, timeout=10.0) as http:
        discovery = HttpDiscoveryClient(http, discovery_url)
        version = await discovery.resolve(namespace=namespace, name=name)
        nodes = await discovery.list_nodes()
    return version, {n.node_id: n.state for n in nodes}


def redundancy(version: FileVersion, states: dict[str, NodeState]) -> str:
    """``full``, ``degraded``, ``unreadable`` or ``lost``, and the node losses the file still
    survives (a part on an unavailable or forgotten node, or reported corrupt or missing,
    counts as lost; one on a forgotten node never comes back)."""
    down = (NodeState.UNAVAILABLE, NodeState.FORGOTTEN)
    readable = {
        p.index
        for p in version.parts
        if states.get(p.node.node_id) not in down and p.reported_lost is None
    }
    spare = version.layout.spare(readable)
    if spare < 0:
        kept = {
            p.index
            for p in version.parts
            if p.reported_lost is None and states.get(p.node.node_id) is not NodeState.FORGOTTEN
        }
        if version.layout.spare(kept) >= 0:  # what is missing is only on nodes that are down
            return "unreadable until a node is back"
        if any(states.get(p.node.node_id) is NodeState.FORGOTTEN for p in version.parts):
            return "lost: a part was on a node the operator forgot, none to rebuild from"
        return "unreadable: a part is lost on its node (corrupt or missing), none to rebuild from"
    if spare == version.layout.tolerates:
        return f"full (survives {spare} lost node{'' if spare == 1 else 's'})"
    return f"degraded: survives {spare} more lost node{'' if spare == 1 else 's'}"


def fill_percent(node: NodeStatus) -> float:
    """Used over capacity; a node of capacity 0 (its disk is full) is full."""
    return 100 * node.used_bytes / node.capacity_bytes if node.capacity_bytes > 0 else 100.0


def nodes_json(
    nodes: list[NodeStatus], report: RebalanceReport, repair: RepairStatus
) -> dict[str, Any]:
    """``karma8 nodes --json``: the nodes (as ``GET /v1/nodes``, with their fill), the
    rebalancing (as ``GET /v1/rebalance``) and repair (as ``GET /v1/repair``)."""
    return {
        "nodes": [{**encode(n), "fill_percent": round(fill_percent(n), 3)} for n in nodes],
        "rebalance": encode(report),
        "repair": encode(repair),
    }


def report_json(report: RebalanceReport) -> dict[str, Any]:
    return encode(report)


def rebalance_lines(report: RebalanceReport) -> str:
    """The footer of ``karma8 nodes`` (and of ``karma8 rebalance``): spread, state, progress."""
    s, settings = report.status, report.settings
    state = report.state
    if state == IDLE and not settings.enabled:
        state += "; rebalancing on its own is off"
    throttle = format_rate(settings.bandwidth) if settings.bandwidth > 0 else "unthrottled"
    # The rate of the last moves decays once none are made: shown only while parts move.
    moving = report.state == REBALANCING and (s.active or s.moving_parts > 0)
    rate = format_rate(s.rate_bytes_per_s) if moving else "-"
    eta = format_eta(s.eta_seconds) if moving else "-"
    return "\n".join(
        (
            f"fill spread {s.spread_pp:.2f} pp ({state})",
            f"moved {format_size(s.moved_bytes)} ({s.moved_parts} parts),"
            f" moving now {format_size(s.moving_bytes)} ({s.moving_parts} parts),"
            f" remaining {format_size(s.remaining_bytes)}",
            f"rate {rate} (throttle {throttle}), ETA {eta}",
        )
    )


def format_rate(bytes_per_s: float) -> str:
    return f"{format_size(bytes_per_s)}/s" if bytes_per_s > 0 else "-"


def format_eta(seconds: float | None) -> str:
    """``None`` (no rate to estimate from) -> ``-``; else seconds, minutes or hours."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:.0f} s"
    return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:.0f} min"


def plan_json(plan: PlanSummary, report: RebalanceReport) -> dict[str, Any]:
    """What ``POST /v1/rebalance?dry_run=1`` answers."""
    return {"dry_run": True, **encode(plan), "status": encode(report)}


def plan_text(plan: PlanSummary, report: RebalanceReport) -> str:
    """``karma8 rebalance --dry-run``: each node now and after the next round, the round,
    what remains, then the status."""
    rows = [("NODE", "CAPACITY", "LIVE", "TARGET", "FILL", "AFTER")]
    for n in plan.nodes:
        rows.append(
            (
                n.node_id,
                format_size(n.capacity),
                format_size(n.live),
                format_size(n.target),
                f"{n.fill_percent:.2f}%",
                f"{n.after_percent:.2f}%",
            )
        )
    return "\n".join(
        (
            "dry run: nothing moved",
            table(rows),
            f"next round: {plan.moves} moves, {format_size(plan.move_bytes)};"
            f" fill spread {plan.spread_pp:.2f} pp now, {plan.spread_after_pp:.2f} pp after",
            f"remaining {format_size(plan.remaining_bytes)}"
            " (the least that must still move to reach every target)",
            rebalance_lines(report),
        )
    )


def nodes_table(nodes: list[NodeStatus]) -> str:
    """The nodes, their usable capacity, then apart those the operator forgot (they count in
    no total)."""
    forgotten = [n for n in nodes if n.state is NodeState.FORGOTTEN]
    nodes = [n for n in nodes if n.state is not NodeState.FORGOTTEN]
    rows = [("ID", "URL", "STATE", "CAPACITY", "USED", "FILL", "PARTS")]
    for n in nodes:
        rows.append(
            (
                n.node_id,
                n.url or "-",  # none: another node took its address
                n.state.value,
                format_size(n.capacity_bytes),
                format_size(n.used_bytes),
                f"{fill_percent(n):.2f}%",
                str(n.parts),
            )
        )
    raw = sum(n.capacity_bytes for n in nodes)
    up = [n.capacity_bytes for n in nodes if n.state is not NodeState.UNAVAILABLE]
    down = len(nodes) - len(up)
    gone = (
        f"\n{len(forgotten)} forgotten (gone for good, in no total; parts left on them:"
        f" lost, or rebuilt elsewhere): "
        + ", ".join(f"{n.node_id} ({n.parts} parts)" for n in forgotten)
        if forgotten
        else ""
    )
    return (
        table(rows)
        + f"\nusable capacity {format_size(usable_capacity(up))} of {format_size(raw)}"
        + " (5 parts of a file on 5 distinct nodes: a node can hold at most a fifth"
        + (f"; without the {down} unavailable)" if down else ")")
        + gone
    )


def version_json(version: FileVersion, states: dict[str, NodeState]) -> dict[str, Any]:
    return {**encode(version), "redundancy": redundancy(version, states)}


def engine_of(layout: StripeLayout) -> str:
    """A layout's engine and the node losses it survives."""
    if layout.engine == "raid1":
        return f"raid1, {layout.copies} copies of each part (survives {layout.tolerates} lost)"
    if layout.engine == "parity":
        return f"parity, 5+{layout.parity} (survives {layout.tolerates} lost)"
    return "raid0 (no redundancy)"


def layout_line(layout: StripeLayout) -> str:
    """``5 parts, stripe unit …``, with the parts stored when copies or parity add some."""
    stored = "" if layout.slots == layout.parts else f" ({layout.slots} stored)"
    return f"{layout.parts} data parts{stored}, stripe unit {layout.unit} bytes"


def holds(layout: StripeLayout, slot: int) -> str:
    """What a stored part is: ``data 3``, ``copy 2 of 3``, ``parity 1``."""
    part = layout.data_part(slot)
    if part is None:
        return f"parity {slot - layout.parts * layout.copies + 1}"
    copy = slot // layout.parts
    return f"data {part}" if copy == 0 else f"copy {copy + 1} of {part}"


def version_table(version: FileVersion, states: dict[str, NodeState]) -> str:
    head = [
        f"{version.namespace}/{version.name}",
        f"  version   {version.version_id} ({version.state.value})",
        f"  size      {version.size} bytes",
        f"  layout    {layout_line(version.layout)}",
        f"  engine    {engine_of(version.layout)}",
        f"  redundancy {redundancy(version, states)}",
        f"  etag      {version.etag}",
        "",
    ]
    rows = [("PART", "KEY", "HOLDS", "NODE", "NODE STATE", "SIZE", "CHECKSUM (sha256)")]
    for p in version.parts:
        state = states.get(p.node.node_id)
        rows.append(
            (
                str(p.index),
                p.key,
                holds(version.layout, p.index)
                + ("" if p.reported_lost is None else f", reported lost ({p.reported_lost})"),
                p.node.node_id,
                "-" if state is None else state.value,
                str(p.size),
                p.checksum or "-",
            )
        )
    return "\n".join(head) + table(rows)


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


async def scrub_all(discovery_url: str, secret: str | None) -> list[dict[str, Any]]:
    """Ask every available storage node to scrub now; one result per node: what it checked
    and found corrupt, an ``error`` (it could not be asked), or ``skipped`` (discovery has it
    unavailable or forgotten: nodes are never removed, so a dead one is no failure here; a
    suspect one, alive after a failed write, is the first worth scrubbing)."""
    async with make_http_client(secret, timeout=3600.0) as http:
        nodes = await HttpDiscoveryClient(http, discovery_url).list_nodes()
        results: list[dict[str, Any]] = []
        for node in nodes:
            if node.state in (NodeState.UNAVAILABLE, NodeState.FORGOTTEN):
                results.append({"node_id": node.node_id, "skipped": node.state.value})
                continue
            try:
                response = await http.post(f"{node.url}/v1/scrub")
                await raise_for_error(response)
                results.append(response.json())
            except (httpx.TransportError, Karma8Error) as exc:
                results.append({"node_id": node.node_id, "error": str(exc) or type(exc).__name__})
        return results


def scrub_table(results: list[dict[str, Any]]) -> str:
    rows = [("NODE", "CHECKED", "CORRUPT (quarantined)")]
    for r in results:
        if "skipped" in r:
            rows.append((r["node_id"], "-", f"skipped: the node is {r['skipped']}"))
        elif "error" in r:
            rows.append((r["node_id"], "-", f"error: {r['error']}"))
        else:
            rows.append((r["node_id"], str(r["checked"]), ", ".join(r["corrupt"]) or "none"))
    return table(rows)
