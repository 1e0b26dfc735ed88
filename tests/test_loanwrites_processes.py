"""Gateway workers that write their small uploads' parts themselves, as real processes
(karma8/net/loanwrites.py): nothing acknowledged is lost when the cluster is killed outright
mid-upload, parts deleted while their volume was lent stay deleted across a clean restart,
and with ``worker_parts = false`` the parent stores the bodies as before."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import httpx
import pytest
from test_workers_processes import CONFIG, start

from processes import wait_for
from storehelpers import packed_parts

pytestmark = pytest.mark.slow


def live_keys(tmp_path: Path) -> set[str]:
    """Every live packed part's key on every node's disk (the cluster stopped)."""
    keys: set[str] = set()
    for node_dir in (tmp_path / "data").glob("storage-*"):
        keys |= set(packed_parts(node_dir))
    return keys


def volumes(tmp_path: Path) -> int:
    return len(list((tmp_path / "data").glob("storage-*/volumes/*.vol")))


def test_nothing_acknowledged_is_lost_when_the_cluster_is_killed_mid_upload(
    tmp_path: Path,
) -> None:
    cluster, gateway = start(tmp_path)
    acknowledged: dict[str, bytes] = {}
    lock = threading.Lock()
    enough = threading.Event()

    def upload(prefix: str) -> None:
        with httpx.Client(timeout=10) as client:
            for i in range(10_000):
                name = f"{prefix}{i}"
                body = os.urandom(100 + (i * 7919) % 30_000)
                try:
                    answer = client.put(f"{gateway}/default/{name}", content=body)
                except httpx.HTTPError:
                    return  # the cluster is gone
                if answer.status_code != 201:
                    return
                with lock:
                    acknowledged[name] = body
                    if len(acknowledged) >= 150:
                        enough.set()

    try:
        threads = [threading.Thread(target=upload, args=(p,)) for p in "abcd"]
        for thread in threads:
            thread.start()
        assert enough.wait(120), "150 uploads acknowledged"
        cluster.proc.kill()  # SIGKILL, uploads in flight: the workers follow their parent
        cluster.proc.wait()
        for thread in threads:
            thread.join(30)
    finally:
        cluster.stop()
    log = cluster.log.read_text()
    assert volumes(tmp_path) > 6, log  # the nodes' own, and those lent to the workers
    cluster, gateway = start(tmp_path)
    try:
        with httpx.Client(timeout=30) as client:
            for name, body in sorted(acknowledged.items()):
                got = client.get(f"{gateway}/default/{name}")
                assert got.status_code == 200, (name, got.text)
                assert got.content == body, name
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log.read_text()


def node_keys(tmp_path: Path) -> set[str]:
    """Every part the running cluster's nodes hold, as they list them."""
    info = json.loads((tmp_path / "data" / "cluster.json").read_text())
    keys: set[str] = set()
    with httpx.Client(headers={"X-Karma8-Secret": info["secret"]}) as client:
        nodes = client.get(f"{info['discovery']}/v1/nodes").json()["nodes"]
        for node in nodes:
            keys |= set(client.get(f"{node['url']}/v1/parts").json()["keys"])
    return keys


def test_parts_deleted_while_lent_stay_deleted_after_a_clean_restart(tmp_path: Path) -> None:
    cluster, gateway = start(tmp_path, "retire_grace = 0.1\nsweep_interval = 0.2\n")
    bodies = {f"f{i}": os.urandom(1000 + i) for i in range(10)}
    try:
        with httpx.Client() as client:
            versions = {}
            for name, body in bodies.items():
                answer = client.put(f"{gateway}/default/{name}", content=body)
                assert answer.status_code == 201
                versions[name] = answer.json()["version"]
            for i in range(0, 10, 2):
                assert client.delete(f"{gateway}/default/f{i}").status_code == 204
        deleted = {versions[f"f{i}"] for i in range(0, 10, 2)}
        wait_for(
            lambda: not {key.split(".")[0] for key in node_keys(tmp_path)} & deleted,
            "the nodes to delete the deleted files' parts",
        )
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log.read_text()
    keys = live_keys(tmp_path)  # the workers gave their volumes back: tombstones written
    for i, (name, version) in enumerate(sorted(versions.items(), key=lambda kv: int(kv[0][1:]))):
        mine = {key for key in keys if key.startswith(f"{version}.")}
        assert len(mine) == (0 if i % 2 == 0 else 5), name
    cluster, gateway = start(tmp_path)
    try:
        with httpx.Client() as client:
            for i, (name, body) in enumerate(bodies.items()):
                got = client.get(f"{gateway}/default/{name}")
                if i % 2 == 0:
                    assert got.status_code == 404
                else:
                    assert got.content == body
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log.read_text()


def test_with_worker_parts_off_the_parent_stores_the_bodies(tmp_path: Path) -> None:
    cluster, gateway = start(tmp_path, "worker_parts = false\n")
    try:
        with httpx.Client() as client:
            for i in range(6):
                assert client.put(f"{gateway}/default/f{i}", content=b"x" * (i + 1)).is_success
            for i in range(6):
                assert client.get(f"{gateway}/default/f{i}").content == b"x" * (i + 1)
            text = client.get(f"{gateway}/metrics").text
        assert "karma8_gateway_written_here_total" not in text
        assert "karma8_gateway_sent_to_parent_total" in text
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log.read_text()
    assert volumes(tmp_path) == 6  # one per node: none was lent


def test_uploads_held_whole_with_parts_too_large_to_pack_are_stored(tmp_path: Path) -> None:
    # small_file_max as by default (1 MiB), small_part_max 64 KiB: a body of 400,000 bytes
    # is held whole, and its parts of 80,000 bytes go to the nodes' file engines.
    cluster, gateway = start(tmp_path, "", base=CONFIG.replace("small_file_max = 65536\n", ""))
    bodies = {"a": os.urandom(400_000), "b": os.urandom(1 << 20), "c": os.urandom(300_000)}
    try:
        with httpx.Client() as client:
            for name, body in bodies.items():
                answer = client.put(f"{gateway}/default/{name}", content=body)
                assert answer.status_code == 201, answer.text
            for name, body in bodies.items():
                assert client.get(f"{gateway}/default/{name}").content == body
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log.read_text()
