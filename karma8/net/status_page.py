"""Discovery's status page (``GET /status``): the cluster at a glance, as HTML rendered on
the server. No script, no framework: it refreshes itself (``<meta http-equiv="refresh">``).
Every text from the cluster is escaped."""

from __future__ import annotations

import time
from html import escape

from karma8.core.status import ClusterStatus, fill, repair_line, seen_ago
from karma8.core.units import format_size

REFRESH_SECONDS = 5

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .3em} h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff} td,th{padding:.25em .7em;text-align:left;
border-bottom:1px solid #e4e4e4;white-space:nowrap} th{background:#f0f0f0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:inline-block;width:12em;height:.8em;background:#e6e6e6;vertical-align:middle}
.bar span{display:block;height:100%;background:#3a7bd5} .hot span{background:#d9822b}
.full span{background:#c0392b} .state-available{color:#1e7e34} .state-suspect{color:#b8860b}
.state-unavailable{color:#c0392b} .state-forgotten{color:#777}
.summary span{margin-right:1.6em} .muted{color:#777}
"""


def render_status(status: ClusterStatus) -> str:
    """The whole page for ``status``."""
    at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(status.time))
    return "".join(
        [
            "<!doctype html><html lang=en><head><meta charset=utf-8>",
            f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
            "<title>karma8 status</title>",
            f"<style>{_STYLE}</style></head><body>",
            "<h1>karma8</h1>",
            f"<p class=muted id=updated>as of {at}; refreshes every {REFRESH_SECONDS} s</p>",
            _summary(status),
            _nodes(status),
            _namespaces(status),
            _errors(status),
            "</body></html>",
        ]
    )


def _summary(status: ClusterStatus) -> str:
    t, r = status.totals, status.rebalance
    items = [
        f"<span id=nodes-count>{escape(status.nodes_summary())}</span>",
        f"<span id=used>{format_size(status.used_bytes)} of"
        f" {format_size(status.capacity_bytes)} used</span>",
        f"<span id=files>{t.files} files, {format_size(t.bytes)}</span>",
        f"<span id=uploads>{t.pending_uploads} uploads pending</span>",
        f"<span id=rebalance>rebalancing: {escape(r.state)},"
        f" spread {r.status.spread_pp:.2f} pp</span>",
        f"<span id=repair>{escape(repair_line(status.repair))}</span>",
    ]
    return f"<p class=summary>{''.join(items)}</p>"


def _nodes(status: ClusterStatus) -> str:
    rows = []
    for node in status.nodes:
        share = fill(node)
        heat = " full" if share >= 0.95 else " hot" if share >= 0.8 else ""
        state = escape(node.state.value)
        rows.append(
            f"<tr id='node-{escape(node.node_id)}'><td>{escape(node.node_id)}</td>"
            f"<td>{escape(node.url or '-')}</td><td class='state-{state}'>{state}</td>"
            f"<td><span class='bar{heat}'><span style='width:{share * 100:.1f}%'></span></span>"
            f" <span class=fill>{share * 100:.1f}%</span></td>"
            f"<td class=num>{format_size(node.used_bytes)}</td>"
            f"<td class=num>{format_size(node.capacity_bytes)}</td>"
            f"<td class=num>{node.parts}</td>"
            f"<td class=num>{seen_ago(node, status.time):.0f} s ago</td></tr>"
        )
    head = (
        "<tr><th>node</th><th>url</th><th>state</th><th>fill</th><th>used</th>"
        "<th>capacity</th><th>parts</th><th>last heartbeat</th></tr>"
    )
    return f"<h2>Storage nodes</h2><table id=node-table>{head}{''.join(rows)}</table>"


def _namespaces(status: ClusterStatus) -> str:
    rows = "".join(
        f"<tr><td>{escape(ns.name)}</td><td>{'public' if ns.public else 'private'}</td>"
        f"<td>{'enabled' if ns.enabled else 'disabled'}</td></tr>"
        for ns in status.namespaces
    )
    head = "<tr><th>namespace</th><th>access</th><th>state</th></tr>"
    return f"<h2>Namespaces</h2><table id=namespace-table>{head}{rows}</table>"


def _errors(status: ClusterStatus) -> str:
    if not status.recent_errors:
        return "<h2>Recent errors</h2><p class=muted id=no-errors>none logged</p>"
    rows = "".join(
        f"<tr><td>{time.strftime('%H:%M:%S', time.gmtime(e.time))}</td>"
        f"<td>{escape(e.level)}</td><td>{escape(e.logger)}</td><td>{escape(e.request_id)}</td>"
        f"<td style='white-space:normal'>{escape(e.shown_message)}</td></tr>"
        for e in status.recent_errors
    )
    head = "<tr><th>time</th><th>level</th><th>logger</th><th>request</th><th>message</th></tr>"
    return f"<h2>Recent errors</h2><table id=error-table>{head}{rows}</table>"
