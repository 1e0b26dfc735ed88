"""The ``karma8 sim`` command line: output, exit codes, bad scenario files."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from karma8.cli import main
from karma8.core.layout import StripeLayout
from karma8.core.model import (
    FileVersion,
    NodeRef,
    NodeState,
    NodeStatus,
    PartPlacement,
    RebalanceStatus,
    RepairStatus,
    VersionState,
)
from karma8.core.rebalance_report import RebalanceReport, RebalanceSettings
from karma8.core.status import LoggedError, repair_line
from karma8.core.tomlconf import ConfigError
from karma8.net import admin
from karma8.net.client import split_path, wrong_role
from karma8.net.serving import _naming_the_port
from karma8.sim import swarm
from karma8.sim.runner import SimResult
from karma8.sim.scenario import Scenario

ROOT = Path(__file__).resolve().parent.parent
BASIC = str(ROOT / "scenarios" / "basic.toml")


def test_json_report_has_the_documented_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", BASIC, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"scenario", "seed", "ok", "trace_sha256", "invariants", "stats", "nodes"} <= set(report)
    assert report["ok"] is True
    assert all(report["invariants"].values())
    assert len(report["nodes"]) == 6
    for node in report["nodes"]:
        assert {"id", "capacity_bytes", "used_bytes", "parts"} <= set(node)


def test_text_report_and_determinism_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", BASIC, "--check-determinism", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "scenario basic  seed 3  OK" in out
    assert "deterministic_replay" in out
    assert "fill spread" in out


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("name = 'x'\n[cluster]\nstorage_nodes = 3\n", "line 3"),
        ("[workload]\nclients = 'many'\n", "workload.clients"),
        ("[cluster]\nstorge_nodes = 6\n", "unknown key"),
        ("[[events]]\nat = 1.0\naction = 'explode'\n", "unknown action"),
        (
            "[[events]]\nat = 1.0\naction = 'fail_writes'\nnode = 9\nduration = 1.0\n",
            "node 9 does not exist",
        ),
        ("this is not toml", "not valid TOML"),
        ("[workload]\nfile_size = ['1 XB', 2]\n", "expected a size"),
        ("[cluster]\nengine = 'raid1'\n", "raid1 puts a file's 10 parts on 10 nodes"),
        ("[cluster]\nengine = 'parity'\nparity = 2\n", "give at least 7, got 6"),
    ],
)
def test_bad_scenarios_exit_2_with_a_message_naming_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, needle: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["sim", str(path)]) == 2
    err = capsys.readouterr().err
    assert needle in err.replace(f"{path}:", "line "), err


def test_missing_scenario_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "/nonexistent/x.toml"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_a_scenario_or_config_file_that_is_not_text_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "binary.toml"
    path.write_bytes(b"name = '\xff\xfe'\n")
    assert main(["sim", str(path)]) == 2
    assert f"{path}: not UTF-8 text (byte 8)" in capsys.readouterr().err
    assert main(["serve", "--config", str(path), "--data", str(tmp_path / "d")]) == 2
    assert f"{path}: not UTF-8 text (byte 8)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["sim", "--swarm", "0"], "--swarm takes at least 1 seed, got 0"),
        (["sim", "--swarm", "-1"], "--swarm takes at least 1 seed, got -1"),
        (["serve", "--port", "70000"], "--port must be between 0 and 65535, got 70000"),
        (["serve", "--port", "-1"], "--port must be between 0 and 65535, got -1"),
        (["serve", "--nodes", "0"], "--nodes must be at least 5, got 0"),
        (["serve", "--capacity", "0"], "--capacity must be at least 1 byte, got 0"),
        (["serve", "--role", "storage", "--capacity", "0"], "--capacity must be at least 1"),
        (
            ["serve", "--role", "storage", "--capacity", "1 parsec"],
            "--capacity: expected a size like 65536 or '64 KiB', got '1 parsec'",
        ),
        (["serve", "--capacity", "-5"], "--capacity: expected a size like 65536"),
        (["serve", "--rebalance-bandwidth", "fast"], "--rebalance-bandwidth: expected a size"),
    ],
)
def test_numbers_out_of_range_on_the_command_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    if args[0] == "serve":
        args = [*args, "--data", str(tmp_path / "d")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("gateway_port = 70000", "gateway_port: must be <= 65535, got 70000"),
        ("storage_nodes = 4", "storage_nodes: must be >= 5, got 4"),
    ],
)
def test_a_config_file_number_out_of_range_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, needle: str
) -> None:
    config = tmp_path / "k.toml"
    config.write_text(line + "\n")
    assert main(["serve", "--config", str(config), "--data", str(tmp_path / "d")]) == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[[events]]\nat = 1.0\naction = 'crash'\ntarget = 'db'\nduration = 1.0\n", "target"),
        ("[[events]]\nat = 1.0\naction = 'crash'\ntarget = 'gateway'\n", "duration > 0"),
        (
            "[[events]]\nat = 1.0\naction = 'partition'\nbetween = ['gateway']\nduration = 1.0\n",
            "between",
        ),
        (
            "[[events]]\nat = 1.0\naction = 'lossy_link'\nbetween = ['gateway', '*']\n"
            "duration = 1.0\n",
            "loss",
        ),
        (
            "[[events]]\nat = 1.0\naction = 'crash'\ntarget = 'node:7'\nduration = 1.0\n",
            "node 7 does not exist",
        ),
    ],
)
def test_fault_events_are_validated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, needle: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert main(["sim", str(path)]) == 2
    assert needle in capsys.readouterr().err


def test_swarm_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "--swarm", "2", "--seed", "8"]) == 0
    out = capsys.readouterr().out
    assert "seed      8  ok" in out
    assert "2 seeds from 8, all invariants held" in out
    assert main(["sim", BASIC, "--swarm", "1"]) == 2


def _result(seed: int, *, ok: bool) -> SimResult:
    """A made-up swarm result, enough for the text and JSON reports."""
    counts = {"put": 1, "get": 0, "delete": 0}
    return SimResult(
        scenario=f"swarm-{seed}",
        seed=seed,
        trace_sha256="0" * 64,
        invariants={"no_orphan_parts": ok},
        violations={} if ok else {"no_orphan_parts": ["orphan part x.0 on node-1"]},
        stats={
            "ops": counts,
            "succeeded": counts,
            "failures": {},
            "bytes_put": 1,
            "injected_write_failures": 0,
            "trace_events": 1,
            "load_seconds": 1.0,
            "sim_seconds": 2.0,
            "wall_seconds": 0.01,
            "puts_per_wall_second": 100.0,
            "fill_spread_pp": 0.0,
            "capacity_bytes": 0,
            "usable_capacity_bytes": 0,
        },
        nodes=[],
    )


@pytest.mark.parametrize("mode", [[], ["--json"]])
def test_a_swarm_seed_that_crashes_names_its_seed_and_replay_on_stderr(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], mode: list[str]
) -> None:
    def run(scenario: Scenario, seed: int | None = None) -> SimResult:
        assert seed is not None
        if seed == 12:
            raise RuntimeError("the simulator broke")
        return _result(seed, ok=True)

    monkeypatch.setattr(swarm, "run_scenario", run)
    assert main(["sim", "--swarm", "5", "--seed", "10", *mode]) == 3
    err = capsys.readouterr().err
    assert "RuntimeError: the simulator broke" in err
    assert "crashed at seed 12; replay: karma8 sim --swarm 1 --seed 12" in err


@pytest.mark.parametrize("mode", [[], ["--json"]])
def test_a_failing_swarm_seed_prints_its_replay_line_on_stderr(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], mode: list[str]
) -> None:
    monkeypatch.setattr(
        swarm, "run_scenario", lambda scenario, seed=None: _result(seed or 0, ok=seed != 11)
    )
    assert main(["sim", "--swarm", "5", "--seed", "10", *mode]) == 1
    captured = capsys.readouterr()
    assert "swarm: seed 11 failed; replay with: karma8 sim --swarm 1 --seed 11" in captured.err
    if mode:
        assert json.loads(captured.out)["violations"] == {
            "no_orphan_parts": ["orphan part x.0 on node-1"]
        }
    else:
        assert "FAIL no_orphan_parts" in captured.out


def test_a_reader_that_leaves_early_ends_the_command_quietly(tmp_path: Path) -> None:
    """``karma8 sim --swarm 5 | head -0``: status 141 (128 + SIGPIPE), and no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # before karma8 starts: its first write fails, whatever the timing
    try:
        done = subprocess.run(
            [sys.executable, "-m", "karma8.cli", "sim", "--swarm", "5", "--seed", "8"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (141, "")


def test_a_swarm_that_holds_answers_one_json_object_in_json_mode(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        swarm, "run_scenario", lambda scenario, seed=None: _result(seed or 0, ok=True)
    )
    assert main(["sim", "--swarm", "3", "--seed", "7", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "seeds": 3, "first_seed": 7}


def test_a_node_whose_disk_is_full_shows_as_full() -> None:
    full = NodeStatus(
        node_id="node-1",
        url="http://n",
        state=NodeState.AVAILABLE,
        capacity_bytes=0,
        used_bytes=0,
        reserved_bytes=0,
        parts=0,
        last_seen=0.0,
    )
    assert "100.00%" in admin.nodes_table([full])
    up = [attrs.evolve(full, node_id=f"n{i}", capacity_bytes=100) for i in range(6)]
    down = attrs.evolve(up[0], node_id="gone", state=NodeState.UNAVAILABLE)
    assert admin.nodes_table(up).endswith("usable capacity 600 B of 600 B" + _WHY + ")")
    assert admin.nodes_table([*up[1:], down]).endswith(
        "usable capacity 500 B of 600 B" + _WHY + "; without the 1 unavailable)"
    )
    assert admin.nodes_json([full], _report(), REPAIR)["nodes"][0]["fill_percent"] == 100.0


_WHY = " (5 parts of a file on 5 distinct nodes: a node can hold at most a fifth"

REPAIR = RepairStatus(
    degraded_files=3,
    lost_parts=4,
    due_parts=1,
    repairing_parts=1,
    repaired_parts=20,
    repaired_bytes=5 << 20,
    rate_bytes_per_s=float(2 << 20),
)


def test_the_repair_line_says_what_is_lost_due_rebuilding_and_done() -> None:
    assert repair_line(REPAIR) == (
        "repair: 3 files below full redundancy, 4 lost parts (1 due), 1 rebuilding,"
        " 20 rebuilt (5.0 MiB), 2.0 MiB/s"
    )
    idle = attrs.evolve(REPAIR, repairing_parts=0)  # the rate of past rebuilds is not shown
    assert repair_line(idle).endswith("0 rebuilding, 20 rebuilt (5.0 MiB)")
    stuck = attrs.evolve(idle, waiting_parts=1)
    assert "(1 due, 1 waiting for a node that holds no part of their file)" in repair_line(stuck)
    unrebuildable = attrs.evolve(idle, due_parts=0, unrebuildable_parts=4)
    assert (
        "4 lost parts (0 due, 4 cannot be rebuilt: too few readable parts of their file;"
        " they wait for a node to return)"
    ) in repair_line(unrebuildable)
    assert admin.nodes_json([], _report(), REPAIR)["repair"]["due_parts"] == 1


def test_stat_counts_a_part_reported_lost_on_an_available_node_as_lost() -> None:
    layout = StripeLayout(unit=4, parity=2)
    parts = tuple(
        PartPlacement(index=i, key=f"v.{i}", node=NodeRef(node_id=f"n{i}", url="http://n"))
        for i in range(7)
    )
    version = FileVersion(
        version_id="v",
        namespace="default",
        name="f",
        state=VersionState.COMMITTED,
        size=28,
        layout=layout,
        parts=parts,
        created_at=0.0,
    )
    states = {f"n{i}": NodeState.AVAILABLE for i in range(7)}
    assert admin.redundancy(version, states) == "full (survives 2 lost nodes)"
    rotten = attrs.evolve(
        version, parts=(attrs.evolve(parts[0], reported_lost="corrupt"), *parts[1:])
    )
    assert admin.redundancy(rotten, states) == "degraded: survives 1 more lost node"
    table = admin.version_table(rotten, states)
    assert "v.0  data 0, reported lost (corrupt)  n0" in table  # the key: where it is on disk
    states["n1"] = NodeState.UNAVAILABLE
    assert admin.redundancy(rotten, states) == "degraded: survives 0 more lost nodes"
    states["n2"] = NodeState.UNAVAILABLE
    assert admin.redundancy(rotten, states) == "unreadable until a node is back"
    # raid0 with a part lost on a node that is up: no node coming back brings it back.
    raid0 = attrs.evolve(rotten, layout=StripeLayout(unit=4), parts=rotten.parts[:5])
    up = {f"n{i}": NodeState.AVAILABLE for i in range(5)}
    assert admin.redundancy(raid0, up).startswith("unreadable: a part is lost on its node")
    up["n3"] = NodeState.UNAVAILABLE  # a node back would not bring part 0 back either
    assert admin.redundancy(raid0, up).startswith("unreadable: a part is lost on its node")
    healthy = attrs.evolve(raid0, parts=version.parts[:5])
    assert admin.redundancy(healthy, up) == "unreadable until a node is back"


def _report(**status: object) -> RebalanceReport:
    fields: dict[str, object] = {
        "spread_pp": 12.345,
        "imbalance_pp": 8.0,
        "remaining_bytes": 3 << 20,
        "moving_bytes": 256 << 10,
        "moving_parts": 8,
        "moved_bytes": 1 << 20,
        "moved_parts": 34,
        "rate_bytes_per_s": float(1 << 20),
        "eta_seconds": 3.0,
        "active": True,
        **status,
    }
    settings = RebalanceSettings(
        enabled=True,
        interval=10.0,
        start_pp=1.0,
        tolerance_pp=0.25,
        bandwidth=2 << 20,
        concurrency=4,
    )
    return RebalanceReport(
        status=RebalanceStatus(**fields),  # type: ignore[arg-type]
        state="rebalancing" if fields["active"] else "idle",
        settings=settings,
    )


def test_the_rebalancing_footer_shows_progress_rate_and_eta_only_while_moving() -> None:
    assert admin.rebalance_lines(_report()).splitlines() == [
        "fill spread 12.35 pp (rebalancing)",
        "moved 1.0 MiB (34 parts), moving now 256.0 KiB (8 parts), remaining 3.0 MiB",
        "rate 1.0 MiB/s (throttle 2.0 MiB/s), ETA 3 s",
    ]
    idle = admin.rebalance_lines(_report(active=False, moving_parts=0, moving_bytes=0))
    assert idle.splitlines()[0] == "fill spread 12.35 pp (idle)"
    assert idle.splitlines()[2] == "rate - (throttle 2.0 MiB/s), ETA -"
    assert [admin.format_eta(s) for s in (None, 0.4, 59, 61, 3600 * 2 + 60 * 5)] == [
        "-",
        "0 s",
        "59 s",
        "1 min 1 s",
        "2 h 5 min",
    ]


def test_the_rebalance_table_of_the_config_file_and_its_flags(tmp_path: Path) -> None:
    from karma8.actors.rebalancer import RebalancerConfig
    from karma8.core.tomlconf import ConfigError
    from karma8.net.settings import load_net_config

    path = tmp_path / "k.toml"
    path.write_text("capacity = '1 MiB'\n[rebalance]\nbandwidth = '16 MiB'\ninterval = 2.5\n")
    config = load_net_config(path, {})
    assert config.capacity == 1 << 20
    assert config.rebalance == RebalancerConfig(bandwidth=16 << 20, interval=2.5)
    flags = load_net_config(path, {}, {"bandwidth": 0.0, "enabled": False, "interval": None})
    assert flags.rebalance == RebalancerConfig(bandwidth=0.0, enabled=False, interval=2.5)
    assert load_net_config(None, {}).rebalance == RebalancerConfig()

    path.write_text("[rebalance]\ninterval = 1.0\nbandwdith = '1 MiB'\n")
    with pytest.raises(ConfigError, match=r"k.toml:3: rebalance.bandwdith: unknown key \(known: "):
        load_net_config(path, {})
    path.write_text("[rebalance]\nconcurrency = 0\n")
    with pytest.raises(ConfigError, match=r"k.toml:2: rebalance.concurrency: must be >= 1, got 0"):
        load_net_config(path, {})
    path.write_text("rebalance = 3\n")
    with pytest.raises(ConfigError, match=r"rebalance: expected a table"):
        load_net_config(path, {})
    # Counts where 0 would refuse or stall every request.
    for key in ("max_connections", "max_uploads", "node_connections", "staging_uploads"):
        path.write_text(f"{key} = 0\n")
        with pytest.raises(ConfigError, match=rf"k.toml:1: {key}: must be >= 1, got 0"):
            load_net_config(path, {})
    path.write_text("max_connections = 64\n")
    assert load_net_config(path, {}).max_connections == 64


def test_a_bad_rebalance_bandwidth_flag_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", "--rebalance-bandwidth", "1 parsec"]) == 2
    assert capsys.readouterr().err.startswith(
        "karma8 serve: --rebalance-bandwidth: expected a size"
    )


def test_the_command_loads_the_simulator_only_for_karma8_sim() -> None:
    # Every admin command, `karma8 serve` and each gateway worker start the same module: the
    # simulator (and pytest, which trio.testing loads with it) would add ~0.1 s to each.
    heavy = ["karma8.sim.command", "karma8.sim.runner", "trio.testing", "pytest"]
    probe = f"import sys, karma8.cli; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@contextlib.contextmanager
def lock_held_elsewhere(lock: Path) -> Iterator[int]:
    """``lock`` held (``diskio.hold_lock``) by another process while inside; its pid."""
    code = (
        "import sys; from pathlib import Path; from karma8.store.diskio import hold_lock;"
        f" hold_lock(Path({str(lock)!r}), str); print('held', flush=True); sys.stdin.read()"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline() == "held\n"
            yield holder.pid
        finally:
            holder.kill()


def test_a_second_process_on_a_node_directory_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One process serves a node's directory: a second one (a node started twice, or an
    embedded cluster adopting a node that still runs) stops before it opens the store."""
    node = tmp_path / "node"
    node.mkdir()
    with lock_held_elsewhere(node / "lock") as pid:
        args = ["serve", "--role", "storage", "--data", str(node), "--port", "0"]
        args += ["--discovery", "http://127.0.0.1:9", "--secret", "s"]
        assert main(args) == 1
        err = capsys.readouterr().err
        assert f"{node} is in use by another process (pid {pid})" in err
        assert "[Errno" not in err
        assert "Traceback" not in err
        assert not (node / "parts").exists()  # refused before the store was opened
    from karma8.net.serve import lock_node_dir

    lock_node_dir(node)  # free again; and held twice by one process, it is its own
    lock_node_dir(node)


@pytest.mark.parametrize("role", ["discovery", "all"])
def test_a_second_discovery_on_a_sqlite_database_is_refused(
    role: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One discovery serves a SQLite database: a second (another `--role discovery`, or an
    embedded cluster, on the same directory) stops before it opens it."""
    with lock_held_elsewhere(tmp_path / "discovery.sqlite3.lock") as pid:
        args = ["serve", "--role", role, "--data", str(tmp_path), "--secret", "s"]
        args += ["--port", "0"] if role == "discovery" else ["--workers", "1"]
        assert main(args) == 1
        err = capsys.readouterr().err
        database = tmp_path / "discovery.sqlite3"
        assert f"{database} is in use by another process (pid {pid})" in err
        assert "Traceback" not in err
        assert not database.exists()  # refused before the database was opened


def test_a_listing_takes_a_bare_namespace_and_stat_shows_the_parts_stored() -> None:
    assert split_path("default", name_required=False) == ("default", "")
    assert split_path("default/a/", name_required=False) == ("default", "a/")
    with pytest.raises(ConfigError, match="expected NAMESPACE/NAME"):
        split_path("default", name_required=True)
    assert admin.layout_line(StripeLayout(unit=16)) == "5 data parts, stripe unit 16 bytes"
    assert admin.layout_line(StripeLayout(unit=16, parity=2)).startswith("5 data parts (7 stored)")
    assert admin.layout_line(StripeLayout(unit=16, copies=2)).startswith("5 data parts (10 stored)")


def test_a_port_in_use_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["serve", "--role", "discovery", "--port", str(port), "--secret", "s"]
        assert main([*args, "--data", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert f"karma8 serve: 127.0.0.1:{port} is already in use" in err
    assert "Traceback" not in err


def test_a_logged_error_is_shown_with_its_request_id_once() -> None:
    logged = LoggedError(
        time=0.0,
        level="ERROR",
        logger="karma8.gateway",
        message="GET default/f failed with 503 [request 2bec0a]: no copy can be read",
        request_id="2bec0a",
    )
    assert logged.shown_message == "GET default/f failed with 503: no copy can be read"


def test_a_hint_about_the_role_never_fails_the_command() -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    several = f"http://127.0.0.1:{port},http://127.0.0.1:{port + 1}"
    assert wrong_role(several, "discovery") is None  # nothing answers, and two URLs
    assert wrong_role("not a url", "gateway") is None


def test_a_port_in_use_is_named_only_when_nothing_else_went_wrong() -> None:
    in_use = OSError(errno.EADDRINUSE, "Address already in use")
    named = pytest.raises(OSError, match=r"127\.0\.0\.1:1 is already in use")
    with named, _naming_the_port("127.0.0.1", 1):
        raise BaseExceptionGroup("bind", [in_use])
    with pytest.raises(BaseExceptionGroup) as kept, _naming_the_port("127.0.0.1", 1):
        raise BaseExceptionGroup("bind", [in_use, KeyboardInterrupt()])
    assert kept.value.subgroup(KeyboardInterrupt) is not None  # an interrupt is not lost


@pytest.mark.parametrize(
    ("argv", "usage", "unknown"),
    [
        (["get", "default/x", "-v"], "usage: karma8 get ", "-v"),
        (["ls", "default", "--limit", "0"], "usage: karma8 ls ", "--limit 0"),
        (["db", "upgrade", "--bogus"], "usage: karma8 db upgrade ", "--bogus"),
    ],
)
def test_an_unknown_option_is_shown_with_its_commands_usage(
    argv: list[str], usage: str, unknown: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage)
    assert f"unrecognized arguments: {unknown}" in err


def test_a_host_that_does_not_resolve_is_named_in_the_error(tmp_path: Path) -> None:
    # In a process of its own: Hypercorn leaves the socket it could not bind unclosed.
    config = tmp_path / "k.toml"
    config.write_text('host = "no.such.host.invalid"\n')
    args = ["serve", "--role", "discovery", "--config", str(config), "--port", "0"]
    done = subprocess.run(
        [sys.executable, "-m", "karma8.cli", *args, "--data", str(tmp_path / "d")],
        env={**os.environ, "KARMA8_SECRET": "s"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    prefix = "karma8 serve: host 'no.such.host.invalid' (--host or the config's host): "
    assert done.stderr.startswith(prefix), done.stderr
    assert "Traceback" not in done.stderr
