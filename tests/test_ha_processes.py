"""No single point of failure, on real processes: two discovery instances on one PostgreSQL
database, five storage nodes and two gateways that name both instances, nginx in front of the
gateways with the shipped config. While one client writes (retrying a failed PUT) and another
reads, one discovery instance is killed with kill -9, then one gateway. Every GET begun after a
kill is answered whole, the writes go on, every acknowledged file reads back byte-identical,
every node heartbeats to the surviving instance, which takes over the sweeping, and what the
cut-off uploads left on the nodes is collected (docs/operations.md, "A cluster across
machines")."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from pgcluster import PgCluster
from processes import (
    GIVE_UP,
    Nginx,
    free_port,
    need_nginx,
    part_files,
    service,
    start_gateways,
    start_nodes,
    stored,
    wait_for,
)

pytestmark = pytest.mark.slow

SECRET = "ha-test-secret"
CONFIG = """
heartbeat_interval = 0.2
node_timeout = 10.0
retire_grace = 0.2
sweep_interval = 0.2
leader_lease = 2.0
upload_ttl = 6.0
stripe_unit = "64 KiB"
orphan_check_interval = 0.5
orphan_grace = 3.0
public_namespaces = ["default"]
"""


def grows(counted: Callable[[], int], by: int) -> Callable[[], bool]:
    now = counted()
    return lambda: counted() >= now + by


def test_the_loss_of_a_discovery_instance_and_of_a_gateway(
    pg_cluster: PgCluster, tmp_path: Path
) -> None:
    need_nginx()
    config = tmp_path / "k.toml"
    config.write_text(CONFIG + f'metadata_url = "{pg_cluster.new_database()}"\n')
    common = ["--secret", SECRET, "--config", str(config)]
    ports = [free_port(), free_port()]
    urls = ",".join(f"http://127.0.0.1:{p}" for p in ports)
    with ExitStack() as stack:
        discoveries = [
            stack.enter_context(
                service(
                    ["serve", "--role", "discovery", "--port", str(port), *common],
                    r"discovery up: (http://\S+)",
                    tmp_path / f"discovery-{i}.log",
                    cwd=tmp_path,
                )
            )
            for i, port in enumerate(ports)
        ]
        start_nodes(stack, tmp_path, urls, common)
        gateways = start_gateways(stack, tmp_path, urls, common)
        nginx = Nginx(tmp_path / "nginx", gateways=[g.match.group(1) for g in gateways])
        stack.callback(nginx.stop)
        base = f"{nginx.url}/default"

        acknowledged: dict[str, bytes] = {}
        # (begun, ended, status; -1: wrong bytes, 0: no answer), monotonic seconds
        gets: list[tuple[float, float, int]] = []
        stop = threading.Event()

        def writer() -> None:
            i = 0
            with httpx.Client(timeout=GIVE_UP) as client:
                while not stop.is_set():
                    # Small bodies (placement leases) and streamed ones (pending rows).
                    name, data = f"f{i:04d}", os.urandom(i * 104_729 % 1_500_000)
                    while not stored(client, f"{base}/{name}", data):
                        if stop.is_set():
                            return
                        time.sleep(0.1)  # the client's pause between retries
                    acknowledged[name] = data
                    i += 1

        def reader() -> None:
            with httpx.Client(timeout=GIVE_UP) as client:
                while not stop.is_set():
                    for name, data in list(acknowledged.items()):
                        begun = time.monotonic()
                        try:
                            response = client.get(f"{base}/{name}")
                            ok = response.status_code if response.content == data else -1
                        except httpx.HTTPError:
                            ok = 0
                        gets.append((begun, time.monotonic(), ok))

        threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: len(acknowledged) >= 5, "5 PUTs")
            discoveries[0].stop(signal.SIGKILL)  # the one every process calls first
            discovery_killed = time.monotonic()
            wait_for(grows(lambda: len(acknowledged), 10), "10 PUTs after the discovery's death")
            gateway_kill = time.monotonic()
            gateways[0].stop(signal.SIGKILL)
            gateway_killed = time.monotonic()
            wait_for(grows(lambda: len(acknowledged), 10), "10 PUTs after the gateway's death")
            wait_for(grows(lambda: len(gets), 20), "GETs after both")
        finally:
            stop.set()
            for thread in threads:
                thread.join()

        # Every GET begun after the discovery's death (and over before the gateway's), and
        # every one begun after the gateway's, was answered whole; a GET under way on the
        # gateway that died may be cut short, which a client resumes.
        after = [
            ok
            for begun, ended, ok in gets
            if (discovery_killed < begun and ended < gateway_kill) or begun > gateway_killed
        ]
        assert len(after) >= 20
        assert [ok for ok in after if ok != 200] == []
        with httpx.Client(timeout=GIVE_UP) as client:
            for name, data in acknowledged.items():
                response = client.get(f"{base}/{name}")
                assert response.status_code == 200, (name, response.text)
                assert response.content == data, name
            wall_killed = time.time() - (time.monotonic() - discovery_killed)

            def heartbeating() -> bool:
                answer = client.get(
                    f"http://127.0.0.1:{ports[1]}/v1/nodes", headers={"X-Karma8-Secret": SECRET}
                )
                nodes = answer.json()["nodes"]
                return len(nodes) == 5 and all(
                    n["state"] == "available" and n["last_seen"] > wall_killed + 1 for n in nodes
                )

            wait_for(heartbeating, "every node heartbeating to the surviving instance")
        # The survivor took over the sweeping (uploads begun and never committed expire) and
        # the nodes' orphan checks the parts of small uploads whose lease died: 5 parts per
        # file are left.
        wait_for(lambda: part_files(tmp_path) == 5 * len(acknowledged), "only live parts left")
