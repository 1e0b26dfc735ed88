"""A discovery instance killed with kill -9 while PUTs flow, on real processes: the gateway and
the storage nodes were given two discovery URLs, and a second instance starts on the second
URL with the same database (one instance at a time: SQLite is one process's). They fail over
to it by themselves: PUTs retried by their client succeed, every acknowledged file reads back
byte-identical, every node heartbeats to the new instance, and the parts of uploads cut off
with the first instance (small uploads' leases died in its memory) are collected as orphans."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from processes import GIVE_UP, Service, free_port, part_files, stored, wait_for

pytestmark = pytest.mark.slow

SECRET = "discovery-failover-secret"
CONFIG = """
heartbeat_interval = 0.2
node_timeout = 10.0
retire_grace = 0.2
sweep_interval = 0.2
upload_ttl = 6.0
stripe_unit = "64 KiB"
orphan_check_interval = 0.5
orphan_grace = 2.0
public_namespaces = ["default"]
"""


def test_gateways_and_nodes_fail_over_to_the_next_discovery(tmp_path: Path) -> None:
    config = tmp_path / "k.toml"
    config.write_text(CONFIG)
    common = ["--secret", SECRET, "--config", str(config)]
    ports = [free_port(), free_port()]
    urls = ",".join(f"http://127.0.0.1:{p}" for p in ports)

    def discovery(index: int) -> Service:
        return Service(
            [
                *("serve", "--role", "discovery", "--port", str(ports[index])),
                *("--data", str(tmp_path / "meta"), *common),
            ],
            r"discovery up: (http://\S+)",
            tmp_path / f"discovery-{index}.log",
            cwd=tmp_path,
        )

    services = [discovery(0)]
    try:
        services += [
            Service(
                [
                    *("serve", "--role", "storage", "--data", str(tmp_path / f"node-{i}")),
                    *("--discovery", urls, *common),
                ],
                r"storage node \S+ up",
                tmp_path / f"node-{i}.log",
                cwd=tmp_path,
            )
            for i in range(5)
        ]
        gateway = Service(
            ["serve", "--role", "gw", "--port", "0", "--discovery", urls, *common],
            r"gateway up: (http://\S+)",
            tmp_path / "gw.log",
            cwd=tmp_path,
        )
        services.append(gateway)
        base = f"{gateway.match.group(1)}/default"

        acknowledged: dict[str, bytes] = {}
        attempts: list[int] = []
        stop = threading.Event()

        def writer() -> None:
            i = 0
            with httpx.Client(timeout=30) as client:
                while not stop.is_set():
                    # Small bodies (one transaction, a lease) and streamed ones (two).
                    name, data = f"f{i:04d}", os.urandom(i * 104_729 % 1_500_000)
                    tries = 1
                    while not stored(client, f"{base}/{name}", data):
                        if stop.is_set():
                            return
                        time.sleep(0.1)  # the client's pause between retries
                        tries += 1
                    attempts.append(tries)
                    acknowledged[name] = data
                    i += 1

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            wait_for(lambda: len(acknowledged) >= 5, "5 PUTs")
            services[0].stop(signal.SIGKILL)
            killed_at = time.time()
            services[0] = discovery(1)
            before = len(acknowledged)
            wait_for(lambda: len(acknowledged) >= before + 10, "10 PUTs after the failover")
        finally:
            stop.set()
            thread.join()

        with httpx.Client(timeout=GIVE_UP) as client:
            for name, data in acknowledged.items():
                response = client.get(f"{base}/{name}")
                assert response.status_code == 200, (name, response.text)
                assert response.content == data, name
            second = f"http://127.0.0.1:{ports[1]}/v1/nodes"

            def heartbeating() -> bool:
                nodes = client.get(second, headers={"X-Karma8-Secret": SECRET}).json()["nodes"]
                return len(nodes) == 5 and all(
                    n["state"] == "available" and n["last_seen"] > killed_at + 1 for n in nodes
                )

            wait_for(heartbeating, "every node heartbeating to the second instance")
        # What the PUTs cut off by the kill left behind is collected: 5 parts per file stored
        # (a name written once; the failed attempts' parts were garbage or orphans).
        wait_for(lambda: part_files(tmp_path) == 5 * len(acknowledged), "only live parts left")
        gateway_log = (tmp_path / "gw.log").read_text()
        assert f"cannot reach discovery at http://127.0.0.1:{ports[0]}" in gateway_log
    finally:
        for service in reversed(services):
            service.stop()
