"""Redundant namespaces on real processes: the embedded cluster (6 storage nodes in one
process) plus storage nodes of their own, which are killed with SIGKILL while a part of
another file rots on a third node. Every file still reads back byte-identical, and repair
brings every file back to full redundancy on the nodes left."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from processes import Service, wait_for

pytestmark = pytest.mark.slow

FAST = """
gateway_port = 0
discovery_port = 0
heartbeat_interval = 0.2
retire_grace = 0.5
sweep_interval = 0.2
stripe_unit = "64 KiB"
public_namespaces = ["default"]
# Long enough that no live node is taken for dead on a loaded machine (a CI run of 3 test
# workers on 2 cores starved nodes' heartbeats for over 2 s, and repair then moved their
# parts under the test); the killed nodes are still found and rebuilt within seconds.
node_timeout = 10.0

[repair]
interval = 0.5
repair_after = 2.0

# The test follows where each part is (what the killed nodes held, which part to corrupt):
# a rebalancing that evens out the empty nodes it adds would move parts under it too.
[rebalance]
enabled = false
"""
SIZES = [0, 1, 5, 65_536 * 5 + 3, 1_000_003, 2_000_000]


def karma8(*args: str, cwd: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "karma8.cli", *args], capture_output=True, text=True, cwd=cwd
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def payload(size: int, salt: int) -> bytes:
    return bytes((i * 131 + salt) % 251 for i in range(size))


def part_file(data: Path, key: str) -> Path | None:
    found = [p for p in data.rglob(key) if p.is_file() and "parts" in p.parts]
    return found[0] if found else None


def corrupt(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    path.write_bytes(bytes(raw))


# Own nodes: enough that with the killed ones gone every file's lost parts have a node to go
# to that holds no part of it (parity 5+2: 7 of 10 nodes; raid1: 10 of 12).
@pytest.mark.parametrize(("engine", "extra", "killed"), [("parity2", 4, 2), ("raid1", 6, 1)])
def test_files_read_back_with_nodes_killed_and_a_part_corrupt_then_are_repaired(
    tmp_path: Path, engine: str, extra: int, killed: int
) -> None:
    config = tmp_path / "karma8.toml"
    config.write_text(FAST)
    data = tmp_path / "data"
    cluster = Service(
        ["serve", "--data", str(data), "--config", str(config)],
        r"gateway (http://\S+)[\s\S]*namespace 'default' is public",
        tmp_path / "cluster.log",
        cwd=tmp_path,
    )
    own: list[Service] = []
    try:
        base = cluster.match.group(1)
        for i in range(extra):
            own.append(
                Service(
                    ["serve", "--role", "storage", "--data", str(data / f"own-{i}")],
                    r"storage node (node-[0-9a-f]+) up",
                    tmp_path / f"own-{i}.log",
                    cwd=tmp_path,
                )
            )
        at = ["--data", str(data)]
        setting = (
            ["--engine", "parity", "--parity", "2"]
            if engine == "parity2"
            else ["--engine", "raid1"]
        )
        karma8("namespace", "create", "safe", "--public", *setting, *at, cwd=tmp_path)
        shown = json.loads(karma8("namespace", "show", "safe", "--json", *at, cwd=tmp_path))
        assert shown[0]["engine"] == ("parity" if engine == "parity2" else "raid1")
        killed_ids = {s.match.group(1) for s in own[:killed]}
        files: dict[str, bytes] = {}
        versions: dict[str, dict[str, Any]] = {}
        cluster_file = json.loads((data / "cluster.json").read_text())
        with (
            httpx.Client(base_url=base, timeout=60) as http,
            # Where each file's parts are: discovery's answer, as `karma8 stat` prints it
            # (checked once below), without a process started for every file.
            httpx.Client(
                base_url=cluster_file["discovery"],
                headers={"X-Karma8-Secret": cluster_file["secret"]},
                timeout=60,
            ) as discovery,
        ):

            def placed(name: str) -> dict[str, Any]:
                answer = discovery.get(f"/v1/files/safe/{name}")
                assert answer.status_code == 200, answer.text
                version: dict[str, Any] = answer.json()
                return version

            for i, size in enumerate(SIZES * 3):
                name = f"f{i}-{size}"
                files[name] = payload(size, i)
                assert http.put(f"/safe/{name}", content=files[name]).status_code == 201
                versions[name] = placed(name)
            stat = json.loads(karma8("stat", f"safe/{name}", "--json", *at, cwd=tmp_path))
            assert stat["parts"] == versions[name]["parts"]
            # A file to corrupt: a big one that stays readable with the killed nodes' parts
            # and one more part corrupt.
            victim = None
            for name, version in versions.items():
                parts = version["parts"]
                assert isinstance(parts, list)
                lost = [p for p in parts if p["node_id"] in killed_ids]
                # parity 5+2: the killed nodes and the corrupt part together at most 2 of its
                # parts; raid1: any file, its corrupt copy of a part no killed node held.
                if len(files[name]) < 1_000_000 or (engine == "parity2" and len(lost) >= killed):
                    continue
                spare = [p for p in parts if p["node_id"] not in killed_ids]
                # raid1: corrupt a copy of a part that no killed node holds a copy of.
                lost_data = {p["index"] % 5 for p in lost}
                # A data part (raid1: a first copy), which every read of the file reads and
                # so reports: a parity part or a second copy is read only to go around a loss.
                for p in spare:
                    if p["index"] < 5 and (engine == "parity2" or p["index"] not in lost_data):
                        path = part_file(data, p["key"])
                        if path is not None:
                            victim = (name, path)
                            break
                if victim:
                    break
            assert victim is not None, "no file fit the corruption (placement changed?)"
            for service in own[:killed]:
                service.stop(signal.SIGKILL)
            corrupt(victim[1])
            for name, body in files.items():
                got = http.get(f"/safe/{name}")
                assert got.status_code == 200, (name, got.text)
                assert got.content == body, name
                ranged = http.get(f"/safe/{name}", headers={"Range": "bytes=100-200000"})
                if len(body) > 100:
                    assert ranged.status_code == 206
                    assert ranged.content == body[100:200_001], name

            # The killed nodes' parts (after repair_after) and the corrupt part (reported by
            # its node, or by the read that met it) are rebuilt on the nodes left.
            on_killed = sum(
                p["node_id"] in killed_ids
                for version in versions.values()
                for p in version["parts"]
            )

            def repaired() -> bool:
                repair = json.loads(karma8("nodes", "--json", *at, cwd=tmp_path))["repair"]
                return bool(
                    repair["repaired_parts"] >= on_killed + 1  # and the corrupt one
                    and repair["lost_parts"] == 0
                    and repair["degraded_files"] == 0
                )

            wait_for(repaired, "every file back at full redundancy")
            slots = 7 if engine == "parity2" else 10
            for name, body in files.items():
                now = placed(name)
                nodes = [p["node_id"] for p in now["parts"]]
                assert len(set(nodes)) == len(nodes) == slots, name  # each on its own node
                assert not set(nodes) & killed_ids, name
                assert http.get(f"/safe/{name}").content == body, name
    finally:
        for service in own:
            service.stop()
        assert cluster.stop() == 0
