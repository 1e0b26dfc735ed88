"""End to end with real processes and curl: the embedded cluster, a node joining, a restart,
and one process per role. Everything binds to 127.0.0.1 on ports the OS picks."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from karma8.net.locate import ClusterInfo, write_cluster_info

from processes import Service, service

CURL = shutil.which("curl")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CURL is None, reason="curl is not installed (.ci/run installs it)"),
]

FAST = """
gateway_port = 0
discovery_port = 0
heartbeat_interval = 0.2
retire_grace = 0.5
sweep_interval = 0.2
stripe_unit = "64 KiB"
"""


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    assert CURL is not None
    return subprocess.run([CURL, "-sS", "--fail-with-body", *args], capture_output=True)


def karma8(*args: str, cwd: Path) -> str:
    """Run a karma8 command in ``cwd`` (never the checkout's, with its ``./karma8-data``)."""
    out = subprocess.run(
        [sys.executable, "-m", "karma8.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def karma8_into_closed_pipe(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a karma8 command whose stdout is a pipe nobody reads: its reader closed before
    karma8 started, so the first write fails, as behind ``| head -1`` once head has left."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "karma8.cli", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
        )
    finally:
        os.close(write_end)


@contextmanager
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound (so no one else takes it), not
    listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "karma8.toml"
    path.write_text(FAST)
    return path


def start_cluster(tmp_path: Path, config: Path, name: str) -> Service:
    return Service(
        ["serve", "--data", str(tmp_path / "data"), "--config", str(config)],
        r"gateway (http://127\.0\.0\.1:\d+)",
        tmp_path / f"{name}.log",
        cwd=tmp_path,
    )


def test_embedded_cluster_curl_round_trip_stat_join_and_restart(
    tmp_path: Path, config: Path
) -> None:
    data = tmp_path / "data"
    cluster = start_cluster(tmp_path, config, "cluster-1")
    try:
        gateway = cluster.match.group(1)
        cluster_url = json.loads((data / "cluster.json").read_text())["discovery"]
        sizes = [0, 1, 4, 5, 6, (1 << 20) + 3]
        for size in sizes:
            src = tmp_path / f"in-{size}"
            src.write_bytes(os.urandom(size))
            put = curl("-T", str(src), f"{gateway}/default/dir/file-{size}")
            assert put.returncode == 0, put.stdout
            assert json.loads(put.stdout)["size"] == size
            out = tmp_path / f"out-{size}"
            assert curl("-o", str(out), f"{gateway}/default/dir/file-{size}").returncode == 0
            assert out.read_bytes() == src.read_bytes()
        big = (tmp_path / "in-1048579").read_bytes()
        for first, last in [(0, 0), (1000, 200_999), (1_048_570, 1_048_578)]:
            part = curl("-r", f"{first}-{last}", f"{gateway}/default/dir/file-1048579")
            assert part.returncode == 0
            assert part.stdout == big[first : last + 1]
        assert curl("-r", "-3", f"{gateway}/default/dir/file-1048579").stdout == big[-3:]
        stat = json.loads(
            karma8("stat", "default/dir/file-1048579", "--json", "--data", str(data), cwd=tmp_path)
        )
        sizes_of_parts = [p["size"] for p in stat["parts"]]
        assert len({p["node_id"] for p in stat["parts"]}) == 5
        assert max(sizes_of_parts) - min(sizes_of_parts) <= 1
        assert sum(sizes_of_parts) == (1 << 20) + 3
        assert "dir/file-1048579" in karma8(
            "stat", "default/dir/file-1048579", "--data", str(data), cwd=tmp_path
        )

        # One command adds a storage node; new files place a part on it (it is the emptiest).
        with service(
            ["serve", "--role", "storage", "--data", str(data / "joined")],
            r"storage node (node-[0-9a-f]+) up",
            tmp_path / "joined.log",
            cwd=tmp_path,
        ) as joined:
            node_id = joined.match.group(1)
            listed = json.loads(karma8("nodes", "--json", "--data", str(data), cwd=tmp_path))
            assert node_id in {n["node_id"] for n in listed["nodes"]}
            assert listed["rebalance"]["state"] in ("rebalancing", "balanced", "idle")
            src = tmp_path / "in-new"
            src.write_bytes(os.urandom(300_000))
            assert curl("-T", str(src), f"{gateway}/default/new").returncode == 0
            stat = json.loads(
                karma8("stat", "default/new", "--json", "--data", str(data), cwd=tmp_path)
            )
            assert node_id in {p["node_id"] for p in stat["parts"]}
            assert "available" in karma8("nodes", "--data", str(data), cwd=tmp_path)
            # A reader that leaves early (| head -1) ends the command quietly: status 141
            # (128 + SIGPIPE), no traceback, only the line naming the cluster on stderr.
            piped = karma8_into_closed_pipe("nodes", "--data", str(data), cwd=tmp_path)
            assert piped.returncode == 141, piped.stderr
            assert piped.stderr.splitlines() == [
                f"karma8: cluster {cluster_url} (from {data / 'cluster.json'}, with its secret)"
            ]
            new_file = src.read_bytes()
    finally:
        assert cluster.stop() == 0  # SIGTERM: a clean shutdown

    # Running it again on the same directory resumes with all files intact (the joined node
    # is down now, and the new file has a part on it: that one cannot be read until it is back).
    cluster = start_cluster(tmp_path, config, "cluster-2")
    try:
        gateway = cluster.match.group(1)
        for size in sizes:
            out = tmp_path / f"again-{size}"
            assert curl("-o", str(out), f"{gateway}/default/dir/file-{size}").returncode == 0
            assert out.read_bytes() == (tmp_path / f"in-{size}").read_bytes()
        with service(
            ["serve", "--role", "storage", "--data", str(data / "joined")],
            r"storage node (node-[0-9a-f]+) up",
            tmp_path / "joined-2.log",
            cwd=tmp_path,
        ) as joined:
            assert joined.match.group(1) == node_id  # same identity after a restart
            out = tmp_path / "again-new"
            assert curl("-o", str(out), f"{gateway}/default/new").returncode == 0
            assert out.read_bytes() == new_file
    finally:
        assert cluster.stop() == 0


def test_one_process_per_role(tmp_path: Path) -> None:
    env_secret = ["--secret", "per-role-secret"]
    with service(
        [
            "serve",
            "--role",
            "discovery",
            "--port",
            "0",
            "--data",
            str(tmp_path / "disc"),
            *env_secret,
        ],
        r"discovery up: (http://\S+)",
        tmp_path / "discovery.log",
        cwd=tmp_path,
    ) as discovery:
        url = discovery.match.group(1)
        nodes = [
            Service(
                [
                    "serve",
                    "--role",
                    "storage",
                    "--data",
                    str(tmp_path / f"node-{i}"),
                    "--discovery",
                    url,
                    *env_secret,
                ],
                r"storage node \S+ up",
                tmp_path / f"node-{i}.log",
                cwd=tmp_path,
            )
            for i in range(6)
        ]
        try:
            with service(
                ["serve", "--role", "gw", "--port", "0", "--discovery", url, *env_secret],
                r"gateway up: (http://\S+)",
                tmp_path / "gateway.log",
                cwd=tmp_path,
            ) as gateway:
                base = gateway.match.group(1)
                # A discovery of its own makes no namespace public: tokens, by command.
                admin = ["--discovery", url, *env_secret]
                refused = curl("-i", "-X", "PUT", "-d", "x", f"{base}/default/a/b/c")
                assert b"401" in refused.stdout.split(b"\r\n", 1)[0]
                assert b'www-authenticate: bearer realm="karma8"' in refused.stdout.lower()
                token = karma8(
                    "token", "create", "default", "--read", "--write", *admin, cwd=tmp_path
                )
                auth = ["-H", f"Authorization: Bearer {token.strip()}"]
                src = tmp_path / "file"
                src.write_bytes(os.urandom(2_000_003))
                assert curl(*auth, "-T", str(src), f"{base}/default/a/b/c").returncode == 0
                out = tmp_path / "out"
                assert curl(*auth, "-o", str(out), f"{base}/default/a/b/c").returncode == 0
                assert out.read_bytes() == src.read_bytes()
                head = curl(*auth, "-I", f"{base}/default/a/b/c").stdout.decode()
                assert "content-length: 2000003" in head.lower()
                listing = json.loads(curl(*auth, f"{base}/default/?prefix=a/").stdout)
                assert [f["name"] for f in listing["files"]] == ["a/b/c"]
                # The internal APIs refuse requests without the cluster secret.
                denied = curl(f"{url}/v1/nodes")
                assert denied.returncode != 0
                assert b"forbidden" in denied.stdout
        finally:
            for node in nodes:
                node.stop()


def test_private_namespace_with_tokens_by_command(tmp_path: Path) -> None:
    """The embedded cluster: a private namespace and its tokens made with ``karma8``, then
    a write token writes, a read token reads, and nothing passes without the right one."""
    config = tmp_path / "karma8.toml"
    config.write_text(FAST)
    data = tmp_path / "data"
    cluster = Service(
        ["serve", "--data", str(data), "--config", str(config)],
        r"gateway (http://\S+)[\s\S]*namespace 'default' is public",
        tmp_path / "cluster.log",
        cwd=tmp_path,
    )
    try:
        base = cluster.match.group(1)
        at = ["--data", str(data)]
        karma8("namespace", "create", "team", *at, cwd=tmp_path)
        listed = json.loads(karma8("namespace", "list", "--json", *at, cwd=tmp_path))
        assert {n["name"]: n["public"] for n in listed} == {"default": True, "team": False}
        writer = karma8("token", "create", "team", "--write", *at, cwd=tmp_path).strip()
        reader = karma8("token", "create", "team", "--read", *at, cwd=tmp_path).strip()
        with httpx.Client(base_url=base, timeout=30) as http:
            url = "/team/report.txt"
            assert http.put(url, content=b"secret data").status_code == 401
            put = http.put(url, content=b"secret data", headers=_bearer(reader))
            assert put.status_code == 403
            assert http.put(url, content=b"secret data", headers=_bearer(writer)).status_code == 201
            assert http.get(url).status_code == 401
            assert http.get(url, headers=_bearer(writer)).status_code == 403
            got = http.get(url, headers=_bearer(reader))
            assert (got.status_code, got.content) == (200, b"secret data")
            assert http.get("/default/anyone.txt").status_code == 404  # public: no 401
            assert http.put("/nope/x", headers=_bearer(writer), content=b"x").status_code == 404
        tokens = json.loads(karma8("token", "list", "team", "--json", *at, cwd=tmp_path))
        assert sorted(t["read"] for t in tokens) == [False, True]
        assert all("secret" not in json.dumps(t) and writer not in json.dumps(t) for t in tokens)
        (reader_id,) = [t["token_id"] for t in tokens if t["read"]]
        karma8("token", "revoke", reader_id, *at, cwd=tmp_path)
        revoked = json.loads(karma8("token", "list", "--json", *at, cwd=tmp_path))
        assert [t["revoked_at"] is not None for t in revoked if t["token_id"] == reader_id] == [
            True
        ]
    finally:
        assert cluster.stop() == 0


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_a_stale_cluster_file_in_the_working_directory_does_not_win(tmp_path: Path) -> None:
    """The original failure: ./karma8-data/cluster.json of a stopped cluster, in the working
    directory, captured a node started with --data inside another cluster's directory, and
    the node waited for the stopped cluster, silently. The --data dir's parent comes first."""
    live = tmp_path / "cluster"
    with closed_port() as dead:
        stale = tmp_path / "karma8-data"
        stale.mkdir()
        dead_url = f"http://127.0.0.1:{dead}"
        info = ClusterInfo(gateway=dead_url, discovery=dead_url, secret="old", data_dir=str(stale))
        write_cluster_info(stale, info)
        with service(
            ["serve", "--role", "discovery", "--port", "0", "--data", str(live), "--secret", "s"],
            r"discovery up: (http://\S+)",
            tmp_path / "discovery.log",
            cwd=tmp_path,
        ) as discovery:
            url = discovery.match.group(1)
            info = ClusterInfo(gateway=url, discovery=url, secret="s", data_dir=str(live))
            write_cluster_info(live, info)
            with service(
                ["serve", "--role", "storage", "--data", str(live / "node")],
                r"storage node (node-[0-9a-f]+) up",
                tmp_path / "node.log",
                cwd=tmp_path,
            ) as node:
                said = f"karma8: cluster {url} (from {live / 'cluster.json'}, with its secret)"
                assert said in node.log.read_text()
                listed = json.loads(karma8("nodes", "--json", "--data", str(live), cwd=tmp_path))
                assert [n["node_id"] for n in listed["nodes"]] == [node.match.group(1)]


@pytest.mark.parametrize("role", ["storage", "gw"])
def test_a_service_that_cannot_reach_discovery_says_so(tmp_path: Path, role: str) -> None:
    """Instead of waiting silently, a node or gateway warns, naming the URL and its source."""
    with closed_port() as port:
        url = f"http://127.0.0.1:{port}"
        args = ["serve", "--role", role, "--port", "0", "--discovery", url, "--secret", "s"]
        if role == "storage":
            args += ["--data", str(tmp_path / "node")]
        warning = rf"WARNING cannot reach discovery at {url} \(from --discovery\)"
        with service(args, warning, tmp_path / f"{role}.log", cwd=tmp_path) as waiting:
            assert f"karma8: cluster {url} (from --discovery; secret from --secret)" in (
                waiting.log.read_text()
            )
        assert waiting.proc.returncode == 0  # SIGTERM stops it even before it is up
