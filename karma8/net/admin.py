"""Admin views of a running cluster: ``karma8 nodes`` and ``karma8 stat``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from karma8.core.errors import Karma8Error
from karma8.core.model import FileVersion, NodeState, NodeStatus
from karma8.core.placement import usable_capacity
from karma8.core.units import format_size
from karma8.net.clients import HttpDiscoveryClient, make_http_client, raise_for_error
from karma8.net.codec import encode_node, encode_version


async def fetch_nodes(discovery_url: str, secret: str | None) -> list[NodeStatus]:
    async with make_http_client(secret, timeout=10.0) as http:
        return await HttpDiscoveryClient(http, discovery_url).list_nodes()


async def fetch_version(
    discovery_url: str, secret: str | None, namespace: str, name: str
) -> FileVersion:
    async with make_http_client(secret, timeout=10.0) as http:
        return await HttpDiscoveryClient(http, discovery_url).resolve(
            namespace=namespace, name=name
        )


def fill_percent(node: NodeStatus) -> float:
    """Used over capacity; a node of capacity 0 (its disk is full) is full."""
    return 100 * node.used_bytes / node.capacity_bytes if node.capacity_bytes > 0 else 100.0


def nodes_json(nodes: list[NodeStatus]) -> list[dict[str, Any]]:
    return [{**encode_node(n), "fill_percent": round(fill_percent(n), 3)} for n in nodes]


def nodes_table(nodes: list[NodeStatus]) -> str:
    rows = [("ID", "URL", "STATE", "CAPACITY", "USED", "FILL", "PARTS")]
    for n in nodes:
        rows.append(
            (
                n.node_id,
                n.url,
                n.state.value,
                format_size(n.capacity_bytes),
                format_size(n.used_bytes),
                f"{fill_percent(n):.2f}%",
                str(n.parts),
            )
        )
    raw = sum(n.capacity_bytes for n in nodes)
    usable = usable_capacity([n.capacity_bytes for n in nodes])
    return (
        _table(rows)
        + f"\nusable capacity {format_size(usable)} of {format_size(raw)}"
        + " (5 parts of a file on 5 distinct nodes: a node can hold at most a fifth)"
    )


def version_json(version: FileVersion) -> dict[str, Any]:
    return encode_version(version)


def version_table(version: FileVersion) -> str:
    head = [
        f"{version.namespace}/{version.name}",
        f"  version   {version.version_id} ({version.state.value})",
        f"  size      {version.size} bytes",
        f"  layout    {version.layout.parts} parts, stripe unit {version.layout.unit} bytes",
        f"  etag      {version.etag}",
        "",
    ]
    rows = [("PART", "NODE", "SIZE", "CHECKSUM (sha256)")]
    for p in version.parts:
        rows.append((str(p.index), p.node.node_id, str(p.size), p.checksum or "-"))
    return "\n".join(head) + _table(rows)


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


async def scrub_all(discovery_url: str, secret: str | None) -> list[dict[str, Any]]:
    """Ask every available storage node to scrub now; one result per node."""
    async with make_http_client(secret, timeout=3600.0) as http:
        nodes = await HttpDiscoveryClient(http, discovery_url).list_nodes()
        results: list[dict[str, Any]] = []
        for node in nodes:
            if node.state is not NodeState.AVAILABLE:
                results.append({"node_id": node.node_id, "error": "unavailable"})
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
        if "error" in r:
            rows.append((r["node_id"], "-", f"error: {r['error']}"))
        else:
            rows.append((r["node_id"], str(r["checked"]), ", ".join(r["corrupt"]) or "none"))
    return _table(rows)
