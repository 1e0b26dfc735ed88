"""The fill series of a simulated run (karma8/sim/fillseries.py) and ``karma8 sim --plot``."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from karma8.cli import main
from karma8.core import rebalance
from karma8.sim import fillseries
from karma8.sim.fillseries import FillSample, FillSampler, FillSeries
from karma8.sim.monitor import FaultTimeline
from karma8.sim.report import render_json, to_json
from karma8.sim.runner import SimResult, run_scenario
from karma8.sim.scenario import parse_scenario

# A few simulated seconds: 6 nodes, one crashes at t=1 s for 1 s, two join at t=2 s.
TINY = """
name = "tiny"
seed = 3
duration = 3.0
quiet = 2.0

[cluster]
storage_nodes = 6
capacity = ["1 MiB", "1 MiB", "1 MiB", "2 MiB", "2 MiB", "2 MiB"]
stripe_unit = "4 KiB"
heartbeat_interval = 0.5
node_timeout = 2.0
retire_grace = 0.5
sweep_interval = 0.5
orphan_check_interval = 1.0
orphan_grace = 1.0

[workload]
clients = 3
names = 30
file_size = [0, "16 KiB"]
mix = { put = 6, get = 3, delete = 1 }

[checks]
max_fill_spread_pp = 50.0

[[events]]
at = 1.0
action = "crash"
target = "node:2"
duration = 1.0

[[events]]
at = 2.0
action = "add_nodes"
count = 2
capacity = "1 MiB"
"""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny() -> SimResult:
    return run_scenario(parse_scenario(TINY), fill_interval=0.1)


def _core_spread(sample: FillSample) -> float:
    return rebalance.spread_pp(
        [
            rebalance.NodeFill(
                node_id=n.node_id, capacity=n.capacity_bytes, live=n.used_bytes, free=0
            )
            for n in sample.nodes
        ]
    )


def _series(result: SimResult) -> FillSeries:
    assert result.fill is not None
    return result.fill


def test_every_sample_holds_every_joined_node_with_its_fill_and_spread(tiny: SimResult) -> None:
    series = _series(tiny)
    joined = {join.node_id: join.at for join in series.joins}
    assert len(series.joins) == 8
    assert [join.index for join in series.joins] == list(range(8))
    times = [sample.at for sample in series.samples]
    assert times == sorted(set(times))
    # A regular grid (0.1 s), then one last sample at the end of the run.
    grid = times[:-1]
    assert all(abs(t / series.interval - round(t / series.interval)) < 1e-6 for t in grid)
    assert all(abs(b - a - series.interval) < 1e-6 for a, b in itertools.pairwise(grid))
    assert times[-1] == tiny.stats["sim_seconds"]
    assert len(series.samples) >= 45
    for sample in series.samples:
        # The nodes that had joined, in join order (one that joins at the very time of a
        # sample may or may not be in it: its join and the sample share a virtual instant).
        ids = [node.node_id for node in sample.nodes]
        assert ids == series.node_ids[: len(ids)]
        assert {i for i in ids if joined[i] < sample.at} == {
            i for i in series.node_ids if joined[i] < sample.at
        }
        assert all(joined[i] <= sample.at for i in ids)
        fills = [node.fill for node in sample.nodes]
        assert all(0.0 <= fill <= 1.0 for fill in fills)
        # The spread of the nodes that can fill: not those capped at a fifth of the bytes.
        assert sample.spread_pp == pytest.approx(_core_spread(sample), abs=1e-4)
        assert sample.spread_pp <= 100 * (max(fills) - min(fills)) + 1e-4
    assert len(series.samples[0].nodes) == 6
    assert len(series.samples[-1].nodes) == 8
    # The last sample is the report's final table.
    assert [(n.node_id, n.used_bytes, n.capacity_bytes) for n in series.samples[-1].nodes] == [
        (n.id, n.used_bytes, n.capacity_bytes) for n in tiny.nodes
    ]
    assert series.samples[-1].spread_pp == tiny.stats["fill_spread_pp"]
    assert max(s.spread_pp for s in series.samples) > 0  # something was written


def test_a_crashed_node_is_down_during_its_crash_window_only(tiny: SimResult) -> None:
    series = _series(tiny)
    crashed = series.joins[2].node_id
    assert [(w.kind, w.start, w.until, w.actors) for w in series.faults] == [
        ("crash", 1.0, 2.0, frozenset({crashed}))
    ]
    times, fills, up = series.track(crashed)
    down = [t for t, is_up in zip(times, up, strict=True) if not is_up]
    assert down
    assert all(1.0 <= t <= 2.0 for t in down)
    assert all(is_up for t, is_up in zip(times, up, strict=True) if t < 1.0 or t > 2.05)
    assert len(fills) == len(times)


def test_same_seed_same_series_and_sampling_does_not_touch_the_trace(tiny: SimResult) -> None:
    scenario = parse_scenario(TINY)
    again = run_scenario(scenario, fill_interval=0.1)
    assert again.fill == tiny.fill
    assert again.trace_sha256 == tiny.trace_sha256
    # Another sampling period observes the same run: the trace is the same.
    coarse = run_scenario(scenario, fill_interval=1.0)
    assert coarse.trace_sha256 == tiny.trace_sha256
    assert _series(coarse).interval == 1.0
    assert len(_series(coarse).samples) == 6  # t = 1..5, and the end of the run


def _sampler(used: dict[str, int], max_samples: int = 8) -> FillSampler:
    return FillSampler(
        nodes=lambda: [(node, size, 100, True) for node, size in used.items()],
        joins=lambda: [(node, 0.0) for node in used],
        timeline=FaultTimeline(),
        start=0.05,
        interval=0.5,
        max_samples=max_samples,
    )


def test_the_sampler_records_each_grid_time_passed_and_thins_a_long_run() -> None:
    # Six nodes, so that none is too big to fill (a node holds at most a fifth of the bytes).
    used = dict.fromkeys("abcdef", 0)
    sampler = _sampler(used)
    sampler.observe(0.4)  # before the first grid point (0.5)
    used["a"] = 10
    sampler.observe(1.7)  # 0.5, 1.0 and 1.5 pass at once: the disks held this all along
    used["b"] = 30
    series = sampler.finish(1.8)
    assert [s.at for s in series.samples] == [0.5, 1.0, 1.5, 1.8]
    assert [[n.used_bytes for n in s.nodes][:3] for s in series.samples] == [
        [10, 0, 0],
        [10, 0, 0],
        [10, 0, 0],
        [10, 30, 0],
    ]
    assert [s.spread_pp for s in series.samples] == [10.0, 10.0, 10.0, 30.0]

    long = _sampler({"a": 1})
    for step in range(1, 200):
        long.observe(step * 0.25)
    thinned = long.finish(50.0)
    assert len(thinned.samples) <= 9  # at most max_samples on the grid, and the end
    assert thinned.interval == 0.5 * 2**4
    grid = [s.at for s in thinned.samples[:-1]]
    assert all(t % thinned.interval == 0 for t in grid)
    assert grid == [thinned.interval * k for k in range(1, len(grid) + 1)]
    assert thinned.samples[-1].at == 50.0


def test_a_sample_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="> 0"):
        FillSampler(nodes=list, joins=list, timeline=FaultTimeline(), start=0.0, interval=0.0)


def test_json_has_the_series_downsampled_with_one_line_per_list(tiny: SimResult) -> None:
    text = render_json(tiny)
    assert json.loads(text) == to_json(tiny)
    series = json.loads(text)["fill_series"]
    assert len(series["t"]) <= fillseries.JSON_POINTS
    assert len(series["t"]) == len(series["spread_pp"])
    assert series["t"][-1] == tiny.stats["sim_seconds"]
    nodes = series["nodes"]
    assert [node["index"] for node in nodes] == list(range(8))
    assert all(len(node["used_bytes"]) == len(series["t"]) for node in nodes)
    assert nodes[0]["used_bytes"][0] is not None
    assert nodes[7]["used_bytes"][0] is None  # not joined yet
    assert nodes[2]["down"]
    assert all(1.0 <= t <= 2.0 for span in nodes[2]["down"] for t in span)
    assert series["faults"][0]["kind"] == "crash"
    # One line per list of numbers, not one per number.
    assert any(line.strip().startswith('"t": [') for line in text.splitlines())
    assert not [line for line in text.splitlines() if re.fullmatch(r"\s*(-?[\d.e]+|null),?", line)]


def test_json_text_is_json_dumps_but_for_lists_of_numbers() -> None:
    value = {"a": [1, 2.5, None], "b": {"c": ["x", "y"], "d": {}, "e": []}, "f": "é"}
    text = fillseries.json_text(value)
    assert json.loads(text) == value
    assert '"a": [1, 2.5, null]' in text
    no_numbers = {"b": value["b"], "f": "é"}
    assert fillseries.json_text(no_numbers) == json.dumps(no_numbers, indent=2)


def test_downsampling_keeps_the_first_and_last_sample(tiny: SimResult) -> None:
    series = _series(tiny)
    small = series.downsampled(10)
    assert len(small.samples) <= 10
    assert small.samples[0] == series.samples[0]
    assert small.samples[-1] == series.samples[-1]
    assert series.downsampled(len(series.samples)) is series


# -- karma8 sim --plot ---------------------------------------------------------------------


@pytest.fixture
def tiny_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def test_plot_svg_is_an_svg_document(
    tiny_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fill.svg"
    assert main(["sim", str(tiny_file), "--plot", str(out)]) == 0
    captured = capsys.readouterr()
    assert "scenario tiny  seed 3  OK" in captured.out
    assert f"fill plot written to {out}" in captured.err
    root = ET.parse(out).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    text = out.read_text()
    assert "scenario tiny, seed 3" in text  # the title, kept as text
    assert "node 7 (" in text
    assert "down: node 2" in text
    assert "nodes 6-7 joined" in text


def test_plot_png_is_a_png(
    tiny_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fill.png"
    assert main(["sim", str(tiny_file), "--plot", str(out), "--json"]) == 0
    json.loads(capsys.readouterr().out)  # stdout is still one JSON object
    assert out.read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--plot", "fill.jpg"], "must end in .svg or .png"),
        (["--plot", "fill"], "must end in .svg or .png"),
        (["--sample-interval", "0"], "--sample-interval must be >= 0.001"),
        (["--sample-interval", "nan"], "--sample-interval must be >= 0.001"),
    ],
)
def test_bad_plot_options_exit_2_before_running(
    tiny_file: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    assert main(["sim", str(tiny_file), *args]) == 2
    captured = capsys.readouterr()
    assert needle in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""  # nothing was simulated


def test_plot_is_not_for_a_swarm(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "--swarm", "1", "--plot", "x.svg"]) == 2
    assert "not with --swarm" in capsys.readouterr().err


def test_an_unwritable_plot_file_is_one_line_on_stderr(
    tiny_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "missing" / "fill.svg"
    assert main(["sim", str(tiny_file), "--plot", str(out)]) == 2
    captured = capsys.readouterr()
    assert "scenario tiny" in captured.out  # the report still comes
    assert f"--plot {out}: cannot write" in captured.err
    assert "Traceback" not in captured.err


def test_the_simulator_does_not_import_matplotlib(tiny_file: Path) -> None:
    code = (
        "import sys\n"
        "from karma8.cli import main\n"
        f"assert main(['sim', {str(tiny_file)!r}, '--json']) == 0\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
