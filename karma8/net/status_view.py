"""``karma8 status``: one screen for the cluster, rendered with rich; ``--watch`` redraws it
every few seconds, ``--json`` prints discovery's ``GET /v1/status`` for scripts."""

from __future__ import annotations

import time
from typing import Any

from karma8.core.model import NodeState
from karma8.core.status import ClusterStatus, fill, repair_line, seen_ago
from karma8.core.units import format_size
from karma8.net.clients import HttpDiscoveryClient, make_http_client

_STATE_STYLE = {
    NodeState.AVAILABLE: "green",
    NodeState.SUSPECT: "yellow",
    NodeState.UNAVAILABLE: "red",
    NodeState.FORGOTTEN: "dim",
}
BAR = 8  # characters of a fill bar
ERRORS_SHOWN = 5


async def fetch_status(discovery_url: str, secret: str | None) -> ClusterStatus:
    async with make_http_client(secret, timeout=10.0) as http:
        return await HttpDiscoveryClient(http, discovery_url).cluster_status()


PIPED_WIDTH = 1000  # columns the screen is laid out in when not on a terminal


def make_console() -> Any:
    """A rich console for the screen: on a terminal as rich makes it; into a pipe or a file,
    whole lines never cut to a width. A reader that leaves (``| head``) is a BrokenPipeError
    for the command to end on (exit 141, as every karma8 command), where rich exits 1."""
    from rich.console import Console

    class _Console(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            raise BrokenPipeError

    console = _Console()
    if not console.is_terminal:
        console = _Console(soft_wrap=True, width=PIPED_WIDTH)
    return console


def fill_bar(share: float) -> str:
    full = round(share * BAR)
    return "█" * full + "░" * (BAR - full)


def render(status: ClusterStatus) -> Any:
    """The screen: a summary, the nodes, and the latest errors."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    t, r = status.totals, status.rebalance
    summary = Text.assemble(
        ("karma8", "bold"),
        f"  {status.nodes_summary()},"
        f" {format_size(status.used_bytes)} of {format_size(status.capacity_bytes)} used\n",
        f"{t.files} files, {format_size(t.bytes)}; {t.pending_uploads} uploads pending;"
        f" {t.degraded_files} below full redundancy",
    )
    repair = repair_line(status.repair)
    moving = (
        f"rebalancing: {r.state}, spread {r.status.spread_pp:.2f} pp,"
        f" {r.status.moved_parts} parts moved ({format_size(r.status.moved_bytes)}),"
        f" {r.status.moving_parts} moving, {format_size(r.status.remaining_bytes)} to move"
    )
    nodes = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("NODE", "STATE", "FILL"):
        nodes.add_column(column, no_wrap=True)
    for column in ("USED", "CAPACITY", "PARTS", "SEEN"):
        nodes.add_column(column, justify="right", no_wrap=True)
    for node in status.nodes:
        share = fill(node)
        nodes.add_row(
            node.node_id,
            Text(node.state.value, style=_STATE_STYLE.get(node.state, "")),
            f"{fill_bar(share)}{share * 100:6.1f}%",
            format_size(node.used_bytes),
            format_size(node.capacity_bytes),
            str(node.parts),
            f"{seen_ago(node, status.time):.0f}s",
        )
    parts: list[Any] = [summary, Text(moving), Text(repair), Text(""), nodes]
    if status.recent_errors:
        parts.append(Text(f"\nlatest errors ({len(status.recent_errors)} kept):", style="bold"))
        for e in status.recent_errors[:ERRORS_SHOWN]:
            at = time.strftime("%H:%M:%S", time.gmtime(e.time))
            parts.append(Text(f"{at} {e.level} [{e.request_id}] {e.shown_message}", style="red"))
    return Group(*parts)
