"""Rebalancing on real processes: discovery (with its rebalancer), a gateway and 6 storage
nodes filled to ~40%, then 2 empty nodes join. While a client keeps reading (checking every
byte) and writing, the rebalancer moves parts to the new nodes until the fill spread that
``GET /v1/rebalance`` reports is within 2 points and nothing is moving; no request fails, and
every file reads back as written."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from processes import Service, wait_for
from storehelpers import packed_parts

pytestmark = pytest.mark.slow  # scripts/check --fast leaves it out

SECRET = "rebalance-test-secret"
CAPACITY = 1 << 20
# Parts of at most 3.6 KiB, a third of a point of a node: the fill can even out to within
# a point or so. Heartbeats and rebalancing checks every fraction of a second.
CONFIG = """
capacity = "1 MiB"
stripe_unit = "1 KiB"
heartbeat_interval = 0.2
node_timeout = 10.0
retire_grace = 1.0
sweep_interval = 0.2
upload_ttl = 10.0
public_namespaces = ["default"]

[rebalance]
interval = 0.5
bandwidth = "2 MiB"
move_lease = 10.0
"""
FILE_SIZES = (12 << 10, 18 << 10)
INITIAL_FILES = 170  # ~2.5 MiB: ~42% of the 6 first nodes
MAX_NEW_FILES = 60  # what the client adds meanwhile, at most (~0.9 MiB)
SPREAD_PP = 2.0


class Cluster:
    """Discovery, a gateway and storage nodes, one process each."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "cluster.toml"
        self.config.write_text(CONFIG)
        self.common = ["--secret", SECRET, "--config", str(self.config)]
        self.discovery = Service(
            [
                *("serve", "--role", "discovery", "--port", "0"),
                *("--data", str(root / "meta"), *self.common),
            ],
            r"discovery up: (http://\S+)",
            root / "discovery.log",
            cwd=root,
        )
        self.discovery_url = self.discovery.match.group(1)
        self.nodes: list[Service] = []
        self.node_ids: list[str] = []
        with ThreadPoolExecutor(4) as pool:
            gateway = pool.submit(self._gateway)
            self.add_nodes(6, pool)
            self.gateway = gateway.result()
        self.url = self.gateway.match.group(1)

    def _gateway(self) -> Service:
        return Service(
            [
                *("serve", "--role", "gw", "--port", "0"),
                *("--discovery", self.discovery_url, *self.common),
            ],
            r"gateway up: (http://\S+)",
            self.root / "gw.log",
            cwd=self.root,
        )

    def _node(self, index: int) -> Service:
        return Service(
            [
                *("serve", "--role", "storage", "--data", str(self.root / f"node-{index}")),
                *("--discovery", self.discovery_url, *self.common),
            ],
            r"storage node (node-[0-9a-f]+) up",
            self.root / f"node-{index}.log",
            cwd=self.root,
        )

    def add_nodes(self, count: int, pool: ThreadPoolExecutor | None = None) -> list[str]:
        first = len(self.nodes)
        if pool is None:
            with ThreadPoolExecutor(count) as own:
                started = list(own.map(self._node, range(first, first + count)))
        else:
            started = list(pool.map(self._node, range(first, first + count)))
        self.nodes += started
        ids = [s.match.group(1) for s in started]
        self.node_ids += ids
        return ids

    def stop(self) -> None:
        for s in [self.gateway, *self.nodes, self.discovery]:
            s.stop()

    def karma8(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "karma8.cli", *args, "--discovery", self.discovery_url],
            capture_output=True,
            text=True,
            cwd=self.root,
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("KARMA8_")},
                "KARMA8_SECRET": SECRET,
            },
        )
        assert done.returncode == 0, done.stderr
        assert done.stderr == (
            f"karma8: cluster {self.discovery_url} (from --discovery; secret from $KARMA8_SECRET)\n"
        )
        return done.stdout

    def part_files(self, index: int) -> list[str]:
        """The parts on a node's disk: files, and needles live in its volumes."""
        node = self.root / f"node-{index}"
        files = [str(p) for p in (node / "parts").rglob("*") if p.is_file()]
        return files + [f"volumes:{key}" for key in packed_parts(node)]


class Client(threading.Thread):
    """Reads random files (checking every byte) and writes new ones until told to stop."""

    def __init__(self, url: str, files: dict[str, bytes], rng: random.Random) -> None:
        super().__init__(name="client", daemon=True)
        self.url = url
        self.files = files
        self.rng = rng
        self.stopping = threading.Event()
        self.failures: list[str] = []
        self.reads = self.writes = 0

    def run(self) -> None:
        with httpx.Client(timeout=60) as http:
            while not self.stopping.is_set():
                try:
                    self._step(http)
                except httpx.HTTPError as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")

    def _step(self, http: httpx.Client) -> None:
        if self.writes < MAX_NEW_FILES and self.rng.random() < 0.25:
            name, data = f"during-{self.writes}", self.rng.randbytes(self.rng.randint(*FILE_SIZES))
            response = http.put(f"{self.url}/default/{name}", content=data)
            if response.status_code != 201:
                self.failures.append(f"PUT {name}: {response.status_code} {response.text}")
                return
            self.files[name] = data
            self.writes += 1
            return
        name = self.rng.choice(sorted(self.files))
        response = http.get(f"{self.url}/default/{name}")
        if response.status_code != 200 or response.content != self.files[name]:
            self.failures.append(f"GET {name}: {response.status_code}, wrong bytes or status")
        self.reads += 1


def rebalance_status(http: httpx.Client, discovery: str) -> dict[str, Any]:
    response = http.get(f"{discovery}/v1/rebalance")
    assert response.status_code == 200, response.text
    status: dict[str, Any] = response.json()
    return status


def test_two_nodes_join_and_the_rebalancer_evens_the_fill_under_load(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    rng = random.Random(18)
    try:
        files: dict[str, bytes] = {}
        items = [(f"f{i}", rng.randbytes(rng.randint(*FILE_SIZES))) for i in range(INITIAL_FILES)]

        def put(item: tuple[str, bytes]) -> None:
            with httpx.Client(timeout=60) as http:
                response = http.put(f"{cluster.url}/default/{item[0]}", content=item[1])
            assert response.status_code == 201, response.text

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(put, items))
        files.update(items)

        with httpx.Client(timeout=30, headers={"X-Karma8-Secret": SECRET}) as http:
            # Placement alone keeps nodes of one size even.
            assert rebalance_status(http, cluster.discovery_url)["spread_pp"] <= SPREAD_PP

            client = Client(cluster.url, files, rng)
            client.start()
            new_ids = cluster.add_nodes(2)
            joined = cluster.karma8("nodes")  # while the rebalancing starts

            seen: list[dict[str, Any]] = []

            def even() -> bool:
                status = rebalance_status(http, cluster.discovery_url)
                seen.append(status)
                return bool(
                    status["moved_parts"] > 0
                    and status["spread_pp"] <= SPREAD_PP
                    and status["moving_parts"] == 0
                    and status["state"] != "rebalancing"
                )

            wait_for(even, f"fill spread <= {SPREAD_PP} pp with nothing moving")
            client.stopping.set()
            client.join(60)
            assert not client.is_alive()
            assert client.failures == []
            assert client.reads > 0
            assert client.writes > 0

            final = rebalance_status(http, cluster.discovery_url)
            assert any(s["state"] == "rebalancing" for s in seen) or final["moved_parts"] > 0
            nodes = http.get(f"{cluster.discovery_url}/v1/nodes").json()["nodes"]
            by_id = {n["node_id"]: n for n in nodes}
            for node_id in new_ids:
                assert by_id[node_id]["parts"] > 0
            for index in (6, 7):
                assert cluster.part_files(index)

        listed = cluster.karma8("nodes")
        plan = cluster.karma8("rebalance", "--dry-run")
        print(f"\n$ karma8 nodes   (as the new nodes joined)\n{joined}")
        print(f"$ karma8 nodes   (at the end)\n{listed}\n$ karma8 rebalance --dry-run\n{plan}")
        footer = listed.splitlines()[-4:]  # the rebalancing's 3 lines, then repair's
        assert footer[3].startswith("repair: 0 files below full redundancy"), listed
        moved = re.match(r"moved (\S+ \S+) \((\d+) parts\)", footer[1])
        assert moved is not None, listed
        assert moved.group(1) != "0 B"
        assert int(moved.group(2)) > 0
        assert footer[0].startswith("fill spread ")
        assert float(footer[0].split()[2]) <= SPREAD_PP
        assert plan.startswith("dry run: nothing moved\n")

        # Every file reads back as written, and the copies the moves left are collected.
        with httpx.Client(timeout=60) as http:
            for name, data in files.items():
                response = http.get(f"{cluster.url}/default/{name}")
                assert response.status_code == 200, name
                assert response.content == data, name
        expected_parts = 5 * len(files)
        wait_for(
            lambda: sum(len(cluster.part_files(i)) for i in range(8)) == expected_parts,
            f"{expected_parts} part files on the disks",
        )
    finally:
        cluster.stop()
