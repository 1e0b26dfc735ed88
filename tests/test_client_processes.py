"""``karma8 put | get | ls | rm`` against a real embedded cluster (docs/operations.md, "The
client"): round trips of 0 B, 1 B and 300 MiB with progress on the large one, resumed
downloads, and one clear line with a non-zero exit for a missing file, a bad token and a
cluster that is down."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from processes import service

pytestmark = pytest.mark.slow  # a 300 MiB round trip; scripts/check --fast leaves it out

CONFIG = """
gateway_port = 0
discovery_port = 0
heartbeat_interval = 0.2
capacity = "2 GiB"
"""
BIG = 300 << 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The embedded cluster's directory (its cluster.json tells the client the gateway)."""
    root = tmp_path_factory.mktemp("client")
    (root / "karma8.toml").write_text(CONFIG)
    args = ["serve", "--data", str(root / "data"), "--config", str(root / "karma8.toml")]
    with service(args, r"gateway (http://\S+)", root / "serve.log", cwd=root):
        yield root / "data"


def karma8(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "karma8.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_round_trips_listing_and_removal(cluster: Path, tmp_path: Path) -> None:
    data = ["--data", str(cluster)]
    for size in (0, 1, 4097):
        src = tmp_path / f"in-{size}"
        src.write_bytes(os.urandom(size))
        put = karma8("put", str(src), f"default/c/f{size}", *data, cwd=tmp_path)
        assert put.returncode == 0, put.stderr
        assert f"stored default/c/f{size}: " in put.stdout
        out = tmp_path / f"out-{size}"
        got = karma8("get", f"default/c/f{size}", str(out), *data, cwd=tmp_path)
        assert got.returncode == 0, got.stderr
        assert out.read_bytes() == src.read_bytes()
        assert not list(tmp_path.glob("*.karma8-partial*"))
    # A partial download of this very version but longer than it (edited by hand, say) is
    # no prefix of it: the download starts over instead of a 416 on every run.
    listed = json.loads(karma8("ls", "default/c/f1", "--json", *data, cwd=tmp_path).stdout)
    (tmp_path / "long.karma8-partial").write_bytes(b"xy")
    (tmp_path / "long.karma8-partial.etag").write_text(listed[0]["etag"])
    long = karma8("get", "default/c/f1", str(tmp_path / "long"), *data, cwd=tmp_path)
    assert long.returncode == 0, long.stderr
    assert (tmp_path / "long").read_bytes() == (tmp_path / "in-1").read_bytes()
    assert not list(tmp_path.glob("long.karma8-partial*"))
    # One already whole (a run stopped as it renamed it) is only moved into place.
    listed = json.loads(karma8("ls", "default/c/f4097", "--json", *data, cwd=tmp_path).stdout)
    (tmp_path / "whole.karma8-partial").write_bytes((tmp_path / "in-4097").read_bytes())
    (tmp_path / "whole.karma8-partial.etag").write_text(listed[0]["etag"])
    whole = karma8("get", "default/c/f4097", str(tmp_path / "whole"), *data, cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    assert "(resumed at 4097 bytes)" in whole.stdout
    assert (tmp_path / "whole").read_bytes() == (tmp_path / "in-4097").read_bytes()
    assert not list(tmp_path.glob("whole.karma8-partial*"))
    # To stdout, and from stdin.
    piped = subprocess.run(
        [sys.executable, "-m", "karma8.cli", "put", "-", "default/c/piped", *data],
        input=b"from stdin",
        capture_output=True,
        cwd=tmp_path,
    )
    assert piped.returncode == 0, piped.stderr
    assert karma8("get", "default/c/piped", "-", *data, cwd=tmp_path).stdout == "from stdin"
    listed = json.loads(karma8("ls", "default/c/", "--json", *data, cwd=tmp_path).stdout)
    assert [f["name"] for f in listed] == ["c/f0", "c/f1", "c/f4097", "c/piped"]
    assert "4 files" in karma8("ls", "default/c/", *data, cwd=tmp_path).stdout
    assert "1 file," in karma8("ls", "default/c/f1", *data, cwd=tmp_path).stdout
    assert "c/f4097" in karma8("ls", "default", *data, cwd=tmp_path).stdout  # a bare one
    assert karma8("rm", "default/c/piped", *data, cwd=tmp_path).returncode == 0
    gone = karma8("get", "default/c/piped", "-", *data, cwd=tmp_path)
    assert gone.returncode == 1
    assert gone.stderr.count("\n") == 1
    assert "404 not_found" in gone.stderr
    exists = karma8(
        "put", str(tmp_path / "in-1"), "default/c/f1", "--if-absent", *data, cwd=tmp_path
    )
    assert exists.returncode == 1
    assert "412 precondition_failed" in exists.stderr


def test_a_large_file_with_progress_and_a_resumed_download(cluster: Path, tmp_path: Path) -> None:
    data = ["--data", str(cluster)]
    src = tmp_path / "big"
    with open(src, "wb") as file:
        for _ in range(BIG >> 20):
            file.write(os.urandom(1 << 20))
    put = karma8("put", str(src), "default/big", "--progress", *data, cwd=tmp_path)
    assert put.returncode == 0, put.stderr
    assert "300.0/300.0 MiB" in put.stderr  # the bar's last state: done, in MiB
    assert "/s" in put.stderr  # and a throughput
    out = tmp_path / "big.out"
    got = karma8("get", "default/big", str(out), "--progress", *data, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert "300.0/300.0 MiB" in got.stderr
    assert sha(out) == sha(src)

    # An interrupted download (its first 100 MiB and the version's ETag kept) resumes.
    etag = json.loads(karma8("ls", "default/big", "--json", *data, cwd=tmp_path).stdout)[0]["etag"]
    partial = tmp_path / "again.karma8-partial"
    with open(src, "rb") as whole:
        partial.write_bytes(whole.read(100 << 20))
    (tmp_path / "again.karma8-partial.etag").write_text(etag)
    again = karma8("get", "default/big", str(tmp_path / "again"), *data, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert f"(resumed at {100 << 20} bytes)" in again.stdout
    assert sha(tmp_path / "again") == sha(src)
    # A partial download of another version starts over (If-Range does not match).
    partial.write_bytes(b"x" * 1000)
    (tmp_path / "again.karma8-partial.etag").write_text('"not-this-version"')
    over = karma8("get", "default/big", str(tmp_path / "again"), *data, cwd=tmp_path)
    assert over.returncode == 0, over.stderr
    assert "resumed" not in over.stdout
    assert sha(tmp_path / "again") == sha(src)


def test_a_bad_token_and_a_private_namespace(cluster: Path, tmp_path: Path) -> None:
    data = ["--data", str(cluster)]
    assert karma8("namespace", "create", "private", *data, cwd=tmp_path).returncode == 0
    made = karma8("token", "create", "private", "--read", "--write", "--json", *data, cwd=tmp_path)
    token = json.loads(made.stdout)["token"]
    src = tmp_path / "secret"
    src.write_bytes(b"shh")
    anonymous = karma8("put", str(src), "private/s", *data, cwd=tmp_path)
    assert anonymous.returncode == 1
    assert "401 unauthorized" in anonymous.stderr
    assert anonymous.stderr.count("\n") == 1
    bad = karma8("get", "private/s", "-", "--token", "k8t_nope_nope", *data, cwd=tmp_path)
    assert bad.returncode == 1
    assert "401 unauthorized" in bad.stderr
    assert bad.stderr.count("\n") == 1
    env = {"KARMA8_TOKEN": token}
    assert karma8("put", str(src), "private/s", *data, cwd=tmp_path, env=env).returncode == 0
    assert karma8("get", "private/s", "-", *data, cwd=tmp_path, env=env).stdout == "shh"
    # The token from a client file.
    client = tmp_path / "client.toml"
    client.write_text(f'token = "{token}"\n')
    got = karma8("get", "private/s", "-", "--config", str(client), *data, cwd=tmp_path)
    assert got.stdout == "shh"


def test_a_cluster_that_is_down_and_bad_usage(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        port = sock.getsockname()[1]
        down = karma8(
            "get", "default/x", "-", "--gateway", f"http://127.0.0.1:{port}", cwd=tmp_path
        )
    assert down.returncode == 1
    assert down.stderr.startswith(
        f"karma8 get: cannot reach the gateway at http://127.0.0.1:{port}"
    )
    assert down.stderr.count("\n") == 1
    # A file that cannot be written is one line too, before anything is asked or written.
    at = ["--gateway", f"http://127.0.0.1:{port}"]
    for out, said in ((tmp_path, "is a directory"), (tmp_path / "nope" / "x", "no such")):
        refused = karma8("get", "default/x", str(out), *at, cwd=tmp_path)
        assert (refused.returncode, refused.stderr.count("\n")) == (2, 1), refused.stderr
        assert said in refused.stderr
    assert not list(tmp_path.rglob("*.karma8-partial*"))
    usage = karma8("get", "no-slash", cwd=tmp_path)
    assert usage.returncode == 2
    assert "expected NAMESPACE/NAME" in usage.stderr
    missing = karma8("put", str(tmp_path / "nope"), "default/x", cwd=tmp_path)
    assert missing.returncode == 2
    assert "No such file or directory" in missing.stderr
