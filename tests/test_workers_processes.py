"""Gateway workers as real processes: the embedded cluster with 2 gateway workers on one
port, which the cluster's own process holds without serving (small uploads go to it over its
pipe, large ones by their connection), stopped by SIGINT or SIGTERM with nothing left
behind; a worker that dies brings the cluster down."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
from pathlib import Path

import httpx
import pytest

from processes import Service, wait_for
from storehelpers import flip_bit, part_location

pytestmark = pytest.mark.slow

CONFIG = """
gateway_port = 0
discovery_port = 0
heartbeat_interval = 0.2
stripe_unit = "64 KiB"
gateway_workers = 2
small_file_max = 65536
"""


def start(tmp_path: Path, extra: str = "", *, base: str = CONFIG) -> tuple[Service, str]:
    """The embedded cluster with 2 workers, ``base`` and ``extra`` its settings; its URL."""
    config = tmp_path / "karma8.toml"
    config.write_text(base + extra)
    cluster = Service(
        ["serve", "--data", str(tmp_path / "data"), "--config", str(config)],
        r"gateway (http://127\.0\.0\.1:\d+)",
        tmp_path / "cluster.log",
        cwd=tmp_path,
    )
    return cluster, cluster.match.group(1)


def metrics(gateway: str) -> dict[str, int]:
    """The answering process's pid and counters, from ``/metrics`` over a new connection, so
    that the kernel may pick either worker."""
    with httpx.Client() as client:
        answer = client.get(f"{gateway}/metrics")
    answer.raise_for_status()
    text = answer.text

    def sample(pattern: str) -> int:
        found = re.search(pattern, text, re.MULTILINE)
        assert found is not None, f"{pattern} not in /metrics"
        return int(float(found.group(1)))

    return {
        "worker": sample(r'^karma8_gateway_process\{pid="(\d+)"\} 1'),
        "puts": sample(r"^karma8_gateway_puts_total (\S+)$"),
        "gets": sample(r"^karma8_gateway_gets_total (\S+)$"),
        # 0 where absent: a gateway that started workers hands nothing over and sends nothing
        **{
            key: sample(rf"^{metric} (\S+)$") if metric in text else 0
            for key, metric in [
                ("handed_off", "karma8_gateway_handed_off_total"),
                ("sent", "karma8_gateway_sent_to_parent_total"),
                ("written", "karma8_gateway_written_here_total"),
            ]
        },
    }


def counters_by_worker(gateway: str, workers: int) -> dict[int, dict[str, int]]:
    """Every worker's counters: asked over new connections until each has answered."""
    seen: dict[int, dict[str, int]] = {}

    def all_answered() -> bool:
        m = metrics(gateway)
        seen[m["worker"]] = m
        return len(seen) == workers

    wait_for(all_answered, f"{workers} gateway processes answering on one port")
    return seen


def exited(pid: int) -> bool:
    """Gone, or a zombie nobody has reaped yet (it holds no socket)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return re.search(r"^State:\s+Z", status, re.MULTILINE) is not None


def port_free(port: int) -> bool:
    """No one listens on ``port``: it binds without SO_REUSEPORT (time-waits allowed)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_two_gateway_workers_share_the_port_and_stop_with_the_cluster(
    tmp_path: Path, sig: signal.Signals
) -> None:
    cluster, gateway = start(tmp_path)
    port = int(gateway.rsplit(":", 1)[1])
    try:
        info = json.loads((tmp_path / "data" / "cluster.json").read_text())
        assert info["gateway"] == gateway  # written once the workers listen: the one URL
        pids = set(counters_by_worker(gateway, 2))
        assert cluster.proc.pid not in pids  # it holds the port for its two workers
        bodies: dict[str, bytes] = {}
        # Each on a new connection: small ones stay with the worker that got them, which
        # writes their parts to volumes the nodes lent it and has the cluster's process
        # commit them; a large one is handed over with its connection.
        for i in range(12):
            with httpx.Client() as client:
                name = f"f{i}"
                bodies[name] = os.urandom(65536 + 1 if i % 4 == 0 else i * 97 + 1)
                put = client.put(f"{gateway}/default/{name}", content=bodies[name])
                assert put.status_code == 201, put.text
        for name, body in bodies.items():
            with httpx.Client() as client:
                got = client.get(f"{gateway}/default/{name}")
                assert got.status_code == 200
                assert got.content == body
        counters = counters_by_worker(gateway, 2)
        assert sum(c["written"] for c in counters.values()) == 9  # the small ones
        assert sum(c["sent"] for c in counters.values()) == 0
        assert sum(c["puts"] for c in counters.values()) == 9  # the large ones: the parent's
        assert sum(c["handed_off"] for c in counters.values()) == 3
        assert sum(c["gets"] for c in counters.values()) == len(bodies)
    finally:
        status = cluster.stop(sig)
    assert status == 0, cluster.log.read_text()
    assert all(exited(pid) for pid in pids)
    assert port_free(port)


def test_a_worker_that_dies_brings_the_cluster_down_with_a_clear_message(tmp_path: Path) -> None:
    cluster, gateway = start(tmp_path)
    port = int(gateway.rsplit(":", 1)[1])
    try:
        pids = set(counters_by_worker(gateway, 2))
        worker = min(pids)
        os.kill(worker, signal.SIGKILL)
        status = cluster.proc.wait(timeout=60)  # a guard against a hang, not a speed limit
    finally:
        cluster.stop()
    log = cluster.log.read_text()
    assert status == 1, log
    assert f"gateway worker {worker} was killed by SIGKILL" in log
    assert all(exited(pid) for pid in pids)
    assert port_free(port)


def test_workers_stop_when_the_cluster_is_killed_outright(tmp_path: Path) -> None:
    cluster, gateway = start(tmp_path)
    port = int(gateway.rsplit(":", 1)[1])
    try:
        pids = set(counters_by_worker(gateway, 2))
        command = Path(f"/proc/{min(pids)}/cmdline").read_bytes().split(b"\0")
        sockets = Path(os.fsdecode(command[command.index(b"--handoff") + 1])).parent
        assert sockets.is_dir()
        cluster.proc.kill()  # SIGKILL: no chance to stop its workers itself
        cluster.proc.wait()
        wait_for(lambda: all(exited(pid) for pid in pids), "the worker to follow its parent")
        wait_for(lambda: port_free(port), "the port to be free")
        assert not sockets.exists()  # its private directory, removed by the workers
    finally:
        cluster.stop()
    assert "the gateway that started this worker is gone" in cluster.log.read_text()


def test_a_gateway_of_its_own_runs_workers_too(tmp_path: Path) -> None:
    config = tmp_path / "karma8.toml"
    config.write_text(CONFIG.replace("gateway_workers = 2", "gateway_workers = 1"))
    cluster = Service(
        ["serve", "--data", str(tmp_path / "data"), "--config", str(config)],
        r"discovery (http://127\.0\.0\.1:\d+)",
        tmp_path / "cluster.log",
        cwd=tmp_path,
    )
    try:
        secret = json.loads((tmp_path / "data" / "cluster.json").read_text())["secret"]
        gw = Service(
            [
                *("serve", "--role", "gw", "--port", "0", "--workers", "2"),
                *("--discovery", cluster.match.group(1), "--secret", secret),
            ],
            r"karma8 gateway up: (http://127\.0\.0\.1:\d+)",
            tmp_path / "gw.log",
            cwd=tmp_path,
        )
        gateway = gw.match.group(1)
        port = int(gateway.rsplit(":", 1)[1])
        try:
            counters = counters_by_worker(gateway, 2)
            pids = set(counters)
            (worker,) = pids - {gw.proc.pid}
            # PUTs over new connections until the worker has handed some to its parent.
            with httpx.Client() as client:
                assert client.put(f"{gateway}/default/a", content=b"abc").status_code == 201
                assert client.get(f"{gateway}/default/a").content == b"abc"
            puts = 1
            while not counters_by_worker(gateway, 2)[worker]["handed_off"]:
                with httpx.Client() as client:
                    put = client.put(f"{gateway}/default/b{puts}", content=b"abc")
                    assert put.status_code == 201, put.text
                puts += 1
            counters = counters_by_worker(gateway, 2)
            assert counters[gw.proc.pid]["puts"] == puts
            assert counters[worker]["puts"] == 0
        finally:
            assert gw.stop(signal.SIGTERM) == 0, gw.log.read_text()
        assert all(exited(pid) for pid in pids)
        assert port_free(port)
    finally:
        cluster.stop()


def direct_reads(gateway: str, pid: int) -> dict[tuple[str, str], int]:
    """Worker ``pid``'s direct-read counters (what, how), asked over new connections."""
    found: dict[tuple[str, str], int] = {}

    def answered() -> bool:
        with httpx.Client() as client:
            text = client.get(f"{gateway}/metrics").text
        if f'karma8_gateway_process{{pid="{pid}"}} 1' not in text:
            return False
        for labels, value in re.findall(
            r"^karma8_gateway_direct_reads_total\{([^}]*)\} (\S+)$", text, re.MULTILINE
        ):
            pairs = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            found[pairs["what"], pairs["how"]] = int(float(value))
        return True

    wait_for(answered, f"gateway worker {pid} answering /metrics")
    return found


def test_a_worker_reads_small_files_directly_and_sees_every_change(tmp_path: Path) -> None:
    cluster, gateway = start(tmp_path)
    try:
        worker = min(counters_by_worker(gateway, 2))  # either of the two
        bodies = {f"s{i}": os.urandom(i * 131 + 1) for i in range(12)}
        bodies["large"] = os.urandom(3 << 20)  # parts in files, streamed
        with httpx.Client() as client:
            for name, body in bodies.items():
                assert client.put(f"{gateway}/default/{name}", content=body).status_code == 201

        def read_all() -> None:
            for name, body in bodies.items():
                with httpx.Client() as client:  # a new connection: either process
                    got = client.get(f"{gateway}/default/{name}")
                assert got.status_code == 200, name
                assert got.content == body, name

        def worker_read_directly() -> bool:
            read_all()
            return direct_reads(gateway, worker).get(("part", "direct"), 0) > 0

        wait_for(worker_read_directly, "the worker to read parts from the nodes' files")
        counts = direct_reads(gateway, worker)
        assert counts[("resolve", "direct")] > 0
        assert counts[("part", "asked")] == 0  # every part was there to read
        # Changes stored by the cluster's process are seen at once by the worker.
        bodies["s0"] = os.urandom(999)
        with httpx.Client() as client:
            assert client.put(f"{gateway}/default/s0", content=bodies["s0"]).status_code == 201
            assert client.delete(f"{gateway}/default/s1").status_code == 204
        del bodies["s1"]
        before = counters_by_worker(gateway, 2)[worker]["gets"]

        def worker_read_the_changes() -> bool:
            read_all()
            for _ in range(4):
                with httpx.Client() as client:
                    assert client.get(f"{gateway}/default/s1").status_code == 404
            return counters_by_worker(gateway, 2)[worker]["gets"] >= before + 2 * len(bodies)

        wait_for(worker_read_the_changes, "the worker to serve reads after the changes")
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log.read_text()


def test_a_damaged_part_read_by_a_worker_is_cut_short_and_its_node_quarantines_it(
    tmp_path: Path,
) -> None:
    cluster, gateway = start(tmp_path)
    try:
        worker = min(counters_by_worker(gateway, 2))  # either of the two
        with httpx.Client() as client:  # parts in files: a block fails mid-stream
            assert client.put(f"{gateway}/default/big", content=os.urandom(3 << 20)).is_success
        # The last part, damaged 100 kB in: the answer has begun by then (a part that fails
        # in the first chunk read is a 502 before the status line instead).
        parts = (tmp_path / "data").glob("storage-*/parts/*/*/*")
        key = next(p.name for p in parts if p.name.endswith(".4"))
        path, payload_at = part_location(tmp_path / "data", key)
        flip_bit(path, payload_at + 100_000)
        held: list[httpx.Client] = []

        def worker_connection() -> bool:
            """A keep-alive connection the worker holds (a first request that reads stays)."""
            client = httpx.Client()
            if f'pid="{worker}"' in client.get(f"{gateway}/metrics").text:
                held.append(client)
                return True
            client.close()
            return False

        wait_for(worker_connection, "a connection that the worker holds")
        try:
            with pytest.raises(httpx.RemoteProtocolError):
                held[0].get(f"{gateway}/default/big")  # cut short: never a whole, wrong body
        finally:
            held[0].close()
        assert direct_reads(gateway, worker)[("part", "direct")] > 0
        wait_for(
            lambda: bool(list((tmp_path / "data").glob(f"storage-*/quarantine/{key}"))),
            "the node to read the damaged part again and quarantine it",
        )
        # Out of service, the part is gone for good (raid0): every read now says so before
        # any byte, whichever process answers.
        with httpx.Client() as client:
            for _ in range(3):
                response = client.get(f"{gateway}/default/big")
                assert response.status_code == 502
                assert response.json()["error"]["code"] == "integrity_error"
    finally:
        status = cluster.stop()
    assert status == 0, cluster.log.read_text()
