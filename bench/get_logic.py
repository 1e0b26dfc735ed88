"""A gateway worker's GET logic alone, without HTTP: the name resolved from discovery's
database and the body read whole from the nodes' files, as the embedded cluster's workers
do (``Gateway.stat`` then ``Gateway.read_bytes``), timed in one process.

Starts ``karma8 serve`` (from ``PYTHONPATH``, or the installed one) on a temporary directory,
stores 200 files of 4 KiB, then reads them round and round and prints the CPU per read:

    .venv/bin/python bench/get_logic.py [--reads 10000]
    PYTHONPATH=/tmp/old .venv/bin/python bench/get_logic.py     # an older tree, for an A/B

Only public calls of the gateway are used (an older tree without ``read_bytes`` reads
through ``open_read``, as its routes did).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

from karma8.net.clients import make_http_client
from karma8.net.direct import DirectReadStorage, DirectResolveDiscovery, open_direct_reads
from karma8.net.netconfig import NetConfig
from karma8.net.serve import build_gateway
from karma8.net.serving import storage_client

FILES = 200
SIZE = 4096


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def read_all(data: Path, reads: int) -> float:
    """CPU seconds per read of ``reads`` reads."""
    cluster = json.loads((data / "cluster.json").read_text())
    config = NetConfig()
    metadata, readers = open_direct_reads(data, metadata=True, keep_for=10.0)
    async with make_http_client(cluster["secret"], max_connections=8) as http:
        assert metadata is not None
        resolver = DirectResolveDiscovery(http, cluster["discovery"], metadata=metadata)
        storage = DirectReadStorage(storage_client(config, http), readers, config.small_part_max)
        gateway = build_gateway(config, discovery=resolver, storage=storage)

        async def read(name: str) -> bytes:
            version = await gateway.stat("default", name)
            if hasattr(gateway, "read_bytes"):
                body: bytes = await gateway.read_bytes(version)
                return body
            async with gateway.open_read(version) as chunks:
                return b"".join([chunk async for chunk in chunks])

        names = [f"f{i}" for i in range(FILES)]
        for name in names:  # warm: every index and cache as a busy worker has them
            assert len(await read(name)) == SIZE
        cpu = time.process_time()
        for i in range(reads):
            await read(names[i % FILES])
        return (time.process_time() - cpu) / reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reads", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="karma8-get-logic-") as workdir:
        data = Path(workdir) / "data"
        port = free_port()
        toml = Path(workdir) / "karma8.toml"
        toml.write_text(f"host = '127.0.0.1'\ngateway_port = {port}\ndiscovery_port = 0\n")
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "karma8.cli",
                "serve",
                "--data",
                str(data),
                "--config",
                str(toml),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=os.environ,
        )
        try:
            deadline = time.monotonic() + 60
            while not (data / "cluster.json").exists():
                if time.monotonic() > deadline or server.poll() is not None:
                    sys.exit("karma8 serve did not start")
                time.sleep(0.1)
            body = os.urandom(SIZE)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
                for i in range(FILES):
                    client.put(f"/default/f{i}", content=body).raise_for_status()
            per_read = trio.run(read_all, data, args.reads)
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(30)
    print(f"{per_read * 1e6:.1f} µs of CPU per GET's logic ({args.reads} reads of {SIZE} B)")


if __name__ == "__main__":
    main()
