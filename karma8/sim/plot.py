"""``karma8 sim --plot FILE``: each storage node's fill over simulated time, as SVG or PNG.

The top panel has one line per node (fill in percent of its own capacity), the faults of the
run as shaded spans, the nodes that joined later as dashed lines and the end of the load
phase as a dotted one. The bottom panel has the fill spread (max - min fill) in percentage
points, with the scenario's bound if it sets one.

matplotlib is imported by :func:`plot_fill` only, and drawn with the Agg canvas, never a
window: the simulator itself never imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from karma8.sim.fillseries import FillSeries, NodeJoin
from karma8.sim.monitor import FaultWindow
from karma8.sim.runner import SimResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes

FORMATS = (".svg", ".png")
MAX_POINTS = 600  # samples drawn per line: enough for a smooth curve, small enough an SVG
# One colour per fault kind (Tableau colours), and how a span is labelled.
FAULT_COLOURS = {
    "crash": "#d62728",
    "disk_full": "#ff7f0e",
    "fail_writes": "#8c564b",
    "partition": "#9467bd",
    "lossy_link": "#e377c2",
    "slow_link": "#bcbd22",
}
FAULT_NAMES = {
    "crash": "down",
    "disk_full": "disk full",
    "fail_writes": "write failures",
    "partition": "partition",
    "lossy_link": "lossy link",
    "slow_link": "slow link",
}


class PlotError(Exception):
    """A plot that cannot be made: a message for the user, no traceback."""


def check_path(path: str) -> Path:
    """``path`` as a :class:`Path`, if its extension is one :func:`plot_fill` can write."""
    target = Path(path)
    if target.suffix.lower() not in FORMATS:
        raise PlotError(f"{path}: cannot tell the format; the file name must end in .svg or .png")
    return target


def plot_fill(result: SimResult, path: str, *, bound_pp: float | None = None) -> Path:
    """Draw ``result``'s fill series into ``path`` (.svg or .png); returns the path."""
    target = check_path(path)
    if result.fill is None or not result.fill.samples:
        raise PlotError("this run recorded no fill series")
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - a dependency of karma8
        raise PlotError(f"drawing needs matplotlib ({exc}); pip install matplotlib") from None

    series = result.fill.downsampled(MAX_POINTS)
    # A fixed hash salt and no date: the same run draws the same SVG, byte for byte.
    with matplotlib.rc_context({"svg.hashsalt": "karma8", "svg.fonttype": "none", "font.size": 9}):
        figure = Figure(figsize=(10, 6.5), layout="constrained")
        FigureCanvasAgg(figure)
        fills, spread = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        _draw_nodes(fills, series)
        _draw_faults(fills, spread, series)
        _draw_joins(fills, series)
        load_end = result.stats.get("load_seconds")
        if isinstance(load_end, float | int) and load_end < series.samples[-1].at:
            _mark(fills, load_end, "clients stop", linestyle=":")
        _draw_spread(spread, series, bound_pp)
        verdict = "OK" if result.ok else "FAILED"
        fills.set_title(
            f"scenario {result.scenario}, seed {result.seed} ({verdict}): fill of each storage node"
        )
        metadata = {"Date": None} if target.suffix.lower() == ".svg" else {}
        try:
            figure.savefig(target, metadata=metadata, dpi=110)
        except OSError as exc:
            raise PlotError(f"{path}: cannot write: {exc.strerror or exc}") from None
    return target


def _label(join: NodeJoin) -> str:
    return f"node {join.index} ({join.node_id})"


def _draw_nodes(axes: Axes, series: FillSeries) -> None:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(series.joins) <= 10 else "tab20"]
    for join in series.joins:
        times, fills, _ = series.track(join.node_id)
        axes.plot(
            times,
            [100 * fill for fill in fills],
            label=_label(join),
            color=cmap(join.index % cmap.N),
            linewidth=1.2,
        )
    axes.set_ylabel("fill (% of the node's capacity)")
    top = max((100 * n.fill for s in series.samples for n in s.nodes), default=0.0)
    # Headroom for the faults' labels along the top.
    axes.set_ylim(0, (top or 1.0) * (1.45 if series.faults else 1.08))
    axes.grid(alpha=0.3)
    # Beside the panel, not on it: the faults' labels run along its top.
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)


def _actors(window: FaultWindow, series: FillSeries) -> str:
    names = {join.node_id: f"node {join.index}" for join in series.joins}
    return " <-> ".join(sorted(names.get(actor, actor) for actor in window.actors))


def _draw_faults(fills: Axes, spread: Axes, series: FillSeries) -> None:
    """A shaded span per fault, labelled along the top; labels of faults that start close
    together are set side by side, and the fill axis leaves them room above the lines."""
    if not series.faults:
        return
    span = max(series.samples[-1].at - series.samples[0].at, 1e-9)
    placed: list[float] = []  # start of each label set so far
    for window in sorted(series.faults, key=lambda w: w.start):
        colour = FAULT_COLOURS.get(window.kind, "#7f7f7f")
        name = FAULT_NAMES.get(window.kind, window.kind)
        for axes in (fills, spread):
            axes.axvspan(window.start, window.until, color=colour, alpha=0.12, linewidth=0)
        beside = sum(1 for at in placed if window.start - at <= 0.02 * span)
        placed.append(window.start)
        fills.annotate(
            f"{name}: {_actors(window, series)}",
            xy=(window.start, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(2 + 9 * beside, -3),
            textcoords="offset points",
            rotation=90,
            va="top",
            fontsize=7,
            color=colour,
        )


def _draw_joins(axes: Axes, series: FillSeries) -> None:
    """A dashed line where nodes joined after the start; joins close together share one."""
    start = series.samples[0].at
    later = [join for join in series.joins if join.at >= start]
    span = max(series.samples[-1].at - start, 1e-9)
    groups: list[list[NodeJoin]] = []
    for join in later:
        if groups and join.at - groups[-1][-1].at <= 0.01 * span:
            groups[-1].append(join)
        else:
            groups.append([join])
    for group in groups:
        first, last = group[0], group[-1]
        who = f"node {first.index}" if first is last else f"nodes {first.index}-{last.index}"
        _mark(axes, first.at, f"{who} joined", linestyle="--")


def _mark(axes: Axes, at: float, text: str, *, linestyle: str) -> None:
    """A vertical line at ``at``, labelled at its foot."""
    axes.axvline(at, color="#555555", linestyle=linestyle, linewidth=1)
    axes.annotate(
        text,
        xy=(at, 0.0),
        xycoords=("data", "axes fraction"),
        xytext=(3, 3),
        textcoords="offset points",
        fontsize=7,
        color="#333333",
    )


def _draw_spread(axes: Axes, series: FillSeries, bound_pp: float | None) -> None:
    axes.plot(
        [sample.at for sample in series.samples],
        [sample.spread_pp for sample in series.samples],
        color="black",
        linewidth=1.2,
        label="fill spread",
    )
    if bound_pp is not None:
        axes.axhline(
            bound_pp,
            color="#d62728",
            linestyle=":",
            linewidth=1,
            label="bound (checked at the end)",
        )
        axes.legend(loc="upper right", fontsize=7)
    axes.set_ylabel("spread (pp)")
    axes.set_xlabel("simulated time (s)")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
