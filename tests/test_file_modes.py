"""Who may read what karma8 writes (docs/operations.md, "File modes"): cluster.json, parts
and databases are owner-only files in owner-only directories, whatever the umask, and the
cluster secret can come from a file or the environment instead of the command line."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from karma8.cli import main
from karma8.core.tomlconf import ConfigError
from karma8.metadata.sqlite import SqliteMetadataStore
from karma8.net.locate import (
    ClusterInfo,
    given_secrets,
    locate_cluster,
    read_cluster_info,
    write_cluster_info,
)
from karma8.net.serve import load_node_id
from karma8.net.settings import load_net_config
from karma8.store.diskio import private_dir

from storehelpers import new_store, put


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o000, 0o022], ids=["umask-000", "umask-022"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


INFO = ClusterInfo(gateway="http://g", discovery="http://d", secret="s3", data_dir="/x")


@pytest.mark.parametrize("stale", ["cluster.tmp", ".cluster.json.tmp", "cluster.json"])
def test_cluster_json_is_0600_even_over_stale_files(tmp_path: Path, umask: int, stale: str) -> None:
    (tmp_path / stale).write_text("stale")
    os.chmod(tmp_path / stale, 0o644)
    write_cluster_info(tmp_path, INFO)
    assert mode(tmp_path / "cluster.json") == 0o600
    assert read_cluster_info(tmp_path) == INFO
    leftovers = {p.name for p in tmp_path.iterdir()} - {"cluster.json", stale}
    assert leftovers == set()  # no temporary file of ours stays behind


def test_parts_and_their_directories_are_owner_only(tmp_path: Path, umask: int) -> None:
    root = tmp_path / "node"
    store = new_store(root)
    trio.run(put, store, "9f3a0c1d2e4b5a67.3", b"data")
    part = store.part_path("9f3a0c1d2e4b5a67.3")
    assert mode(part) == 0o600
    directory = part.parent
    while directory != tmp_path:
        assert mode(directory) == 0o700, directory
        directory = directory.parent
    assert mode(root / "tmp") == 0o700


def test_a_nodes_id_and_lock_files_are_owner_only(tmp_path: Path, umask: int) -> None:
    node = tmp_path / f"node-{umask:o}"
    node_id = load_node_id(node)
    assert (node / "node_id").read_text() == node_id + "\n"
    assert mode(node / "node_id") == 0o600
    assert mode(node / "lock") == 0o600
    assert mode(node) == 0o700


def test_existing_directories_are_narrowed_on_start(tmp_path: Path) -> None:
    for name in ("node", "node/parts", "node/tmp"):
        (tmp_path / name).mkdir()
        os.chmod(tmp_path / name, 0o755)
    new_store(tmp_path / "node")
    for name in ("node", "node/parts", "node/tmp"):
        assert mode(tmp_path / name) == 0o700
    private_dir(tmp_path / "data")
    assert mode(tmp_path / "data") == 0o700


def test_the_database_is_owner_only(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "discovery.sqlite3"
    db = SqliteMetadataStore(path)
    db.create_namespace("ns", 0.0)
    files = [p for p in tmp_path.iterdir() if p.name.startswith("discovery.sqlite3")]
    assert files
    assert all(mode(p) == 0o600 for p in files), {p.name: oct(mode(p)) for p in files}
    db.close()


def test_an_existing_database_is_narrowed(tmp_path: Path) -> None:
    path = tmp_path / "discovery.sqlite3"
    SqliteMetadataStore(path).close()
    os.chmod(path, 0o644)
    SqliteMetadataStore(path).close()
    assert mode(path) == 0o600


def test_the_secret_from_a_file_or_the_environment(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-file\n")
    env = {"KARMA8_SECRET_FILE": str(secret_file)}

    def first(given: list[tuple[str | None, str]]) -> tuple[str | None, str] | None:
        return next(((s, o) for s, o in given if s), None)

    assert first(given_secrets(None, secret_file, {})) == ("from-file", "--secret-file")
    assert first(given_secrets(None, None, env)) == ("from-file", "$KARMA8_SECRET_FILE")
    assert first(given_secrets("cli", secret_file, env)) == ("cli", "--secret")
    assert first(given_secrets(None, None, {"KARMA8_SECRET": "e", **env})) == (
        "e",
        "$KARMA8_SECRET",
    )
    ref = locate_cluster(discovery="http://d", secret=None, secret_file=secret_file, environ={})
    assert (ref.secret, ref.secret_from) == ("from-file", "--secret-file")
    (tmp_path / "empty").write_text("\n")
    for broken in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(ConfigError, match="secret"):
            given_secrets(None, broken, {})


def test_an_empty_secret_is_an_error_not_an_open_cluster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Taken for "no secret", it left discovery and the nodes open to anyone, without a word.
    with pytest.raises(ConfigError, match="--secret is empty"):
        given_secrets(" ", None, {})
    with pytest.raises(ConfigError, match=r"\$KARMA8_SECRET is set but empty"):
        given_secrets(None, None, {"KARMA8_SECRET": ""})
    config = tmp_path / "k.toml"
    config.write_text('secret = ""\n')
    with pytest.raises(ConfigError, match="secret: is empty"):
        load_net_config(config, {})
    assert main(["serve", "--role", "discovery", "--config", str(config), "--port", "0"]) == 2
    assert "secret: is empty" in capsys.readouterr().err
    args = ["serve", "--role", "discovery", "--secret", "", "--port", "0"]
    assert main([*args, "--data", str(tmp_path / "d")]) == 2
    assert "--secret is empty" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
