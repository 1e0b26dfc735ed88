"""Rendering a :class:`SimResult` for people (a short report) and for programs (JSON)."""

from __future__ import annotations

from typing import Any

import attrs

from karma8.core.units import format_size
from karma8.sim import fillseries
from karma8.sim.runner import SimResult

BAR = 30


def to_json(result: SimResult) -> dict[str, Any]:
    return {
        "scenario": result.scenario,
        "seed": result.seed,
        "ok": result.ok,
        "trace_sha256": result.trace_sha256,
        "invariants": result.invariants,
        "violations": result.violations,
        "stats": result.stats,
        "nodes": [attrs.asdict(node) for node in result.nodes],
        **({"fill_series": fillseries.to_json(result.fill)} if result.fill is not None else {}),
    }


def render_json(result: SimResult) -> str:
    # json.dumps(indent=2), except that the series' lists of numbers stay on one line each.
    return fillseries.json_text(to_json(result))


def render_text(result: SimResult, *, replay: str) -> str:
    s = result.stats
    lines = [
        f"scenario {result.scenario}  seed {result.seed}  {'OK' if result.ok else 'FAILED'}",
        f"  simulated {s['sim_seconds']:.1f} s (load {s['load_seconds']:.1f} s)"
        f" in {s['wall_seconds']:.2f} s wall;"
        f" load phase {s['puts_per_wall_second']:.0f} PUTs per wall-second",
        f"  trace {result.trace_sha256[:16]}… ({s['trace_events']} events)",
        "",
        "operations        total  succeeded",
    ]
    for kind in ("put", "get", "delete"):
        lines.append(f"  {kind:<14}{s['ops'][kind]:>7}  {s['succeeded'][kind]:>9}")
    lines.append(f"  bytes stored by PUTs: {format_size(s['bytes_put'])}")
    if s["failures"]:
        lines.append("failures by cause")
        for cause, count in s["failures"].items():
            lines.append(f"  {cause:<30}{count:>7}")
    if s["injected_write_failures"]:
        lines.append(f"  injected disk write failures: {s['injected_write_failures']}")
    lines += ["", "node            capacity        used   parts  fill"]
    top = max((n.fill for n in result.nodes), default=0.0) or 1.0
    for node in result.nodes:
        bar = "#" * round(BAR * node.fill / top)
        lines.append(
            f"  {node.id:<13}{format_size(node.capacity_bytes):>10}"
            f"{format_size(node.used_bytes):>12}"
            f"{node.parts:>8}  {100 * node.fill:5.2f}% {bar}"
        )
    lines.append(f"  fill spread (max - min fill): {s['fill_spread_pp']:.2f} pp")
    lines.append(
        f"  usable capacity {format_size(s['usable_capacity_bytes'])}"
        f" of {format_size(s['capacity_bytes'])} (5 parts of a file on 5 distinct nodes)"
    )
    if s.get("refused_puts"):
        lines.append(f"  PUTs refused for want of nodes with room: {s['refused_puts']}")
    moves = s.get("rebalance")
    if moves is not None:
        lines.append(
            f"  rebalancer moved {format_size(moves['moved_bytes'])} ({moves['moved_parts']}"
            f" parts), {moves['ratio']:.3f} x the least needed"
            f" ({format_size(moves['least_bytes'])}); {format_size(moves['remaining_bytes'])}"
            f" left, furthest node {moves['imbalance_pp']:.2f} pp off its target"
        )
    repairs = s.get("repair")
    if repairs is not None:
        lines.append(
            f"  repair rebuilt {repairs['repaired_parts']} lost parts"
            f" ({format_size(repairs['repaired_bytes'])}) on other nodes"
        )
    lines += ["", "invariants"]
    for name, holds in result.invariants.items():
        lines.append(f"  {'ok  ' if holds else 'FAIL'} {name}")
        for violation in result.violations.get(name, [])[:5]:
            lines.append(f"         {violation}")
        extra = len(result.violations.get(name, [])) - 5
        if extra > 0:
            lines.append(f"         … and {extra} more")
    if not result.ok:
        lines += ["", f"replay: {replay}"]
    return "\n".join(lines)
