"""Gateway workers' settings: the config key and flag, and the file a worker reads."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path

import attrs
import pytest

from karma8.cli import main
from karma8.core.tomlconf import ConfigError
from karma8.net.netconfig import NetConfig, usable_cores
from karma8.net.settings import load_net_config
from karma8.net.workers import (
    shared_port_socket,
    worker_command,
    worker_config_toml,
    worker_env,
)


def test_gateway_workers_default_to_the_cores_and_come_from_the_file_or_the_flag(
    tmp_path: Path,
) -> None:
    assert NetConfig().gateway_workers == usable_cores() >= 1
    path = tmp_path / "k.toml"
    path.write_text("gateway_workers = 3\n")
    assert load_net_config(path, {}).gateway_workers == 3
    assert load_net_config(path, {"gateway_workers": 1}).gateway_workers == 1
    path.write_text("gateway_workers = 0\n")
    with pytest.raises(ConfigError, match="gateway_workers: must be >= 1, got 0"):
        load_net_config(path, {})


def test_the_default_follows_a_cgroup_cpu_quota(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    assert usable_cores(tmp_path / "missing") == cores
    cpu_max.write_text("max 100000\n")
    assert usable_cores(cpu_max) == cores
    cpu_max.write_text("50000 100000\n")  # half a core: one process
    assert usable_cores(cpu_max) == 1
    cpu_max.write_text(f"{100000 * cores + 1} 100000\n")  # more than the affinity allows
    assert usable_cores(cpu_max) == cores
    cpu_max.write_text("garbage\n")
    assert usable_cores(cpu_max) == cores


def test_workers_below_one_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--workers", "0"]) == 2
    assert "--workers must be at least 1, got 0" in capsys.readouterr().err


def test_a_worker_reads_back_its_parents_settings_without_the_secret(tmp_path: Path) -> None:
    parent = attrs.evolve(
        NetConfig(),
        secret="s3cret",
        host="::1",
        gateway_port=0,
        max_uploads=7,
        idle_timeout=2.5,
        local_calls=False,
        namespaces=("a", "b"),
        public_namespaces=("b",),
        gateway_workers=4,
        access_cache_ttl=0.0,  # every request asks: what the docs say 0 means
    )
    text = worker_config_toml(parent)
    assert "s3cret" not in text
    path = tmp_path / "worker.toml"
    path.write_text(text)
    assert load_net_config(path, {}) == attrs.evolve(parent, secret=None)


def test_a_shared_port_must_be_free_unless_a_worker_joins_its_parent() -> None:
    # Else a second karma8 started on the same port would join the first one's gateways and
    # the kernel would split connections between two clusters.
    first = shared_port_socket("127.0.0.1", 0)
    try:
        first.listen(8)
        port = first.getsockname()[1]
        with pytest.raises(OSError, match="in use") as refused:
            shared_port_socket("127.0.0.1", port)
        assert refused.value.errno == errno.EADDRINUSE
        with contextlib.closing(shared_port_socket("127.0.0.1", port, joining=True)) as worker:
            assert worker.getsockname()[1] == port
    finally:
        first.close()
    with contextlib.closing(shared_port_socket("127.0.0.1", port)):  # free again
        pass


def test_a_worker_runs_its_parents_karma8_not_one_in_the_working_directory(
    tmp_path: Path,
) -> None:
    # A decoy package where `python -m` would look first: the working directory.
    (tmp_path / "karma8").mkdir()
    (tmp_path / "karma8" / "__init__.py").write_text("raise SystemExit('the decoy karma8')\n")
    command = worker_command("w.toml", port=1, discovery_url="http://127.0.0.1:1")
    interpreter = command[: command.index("karma8.cli") + 1]
    env = worker_env({"PATH": os.environ.get("PATH", "")}, "s3cret")
    assert env["KARMA8_SECRET"] == "s3cret"
    found = subprocess.run(
        [*interpreter, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert found.returncode == 0, found.stderr
    assert "decoy" not in found.stderr
    assert "serve" in found.stdout
