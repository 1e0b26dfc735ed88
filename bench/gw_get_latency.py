"""GET latency through a gateway that reaches its nodes over HTTP (``--role gw``; every role a
process of its own on 127.0.0.1: one discovery, 6 storage nodes, one gateway with one
worker), one request at a time: what a read costs before its first byte when every part
is a round trip away.

    .venv/bin/python bench/gw_get_latency.py [--files 40] [--repeats 5]

PUTs ``--files`` files of 4 KiB and of 1 MiB to a public namespace, then GETs each of them
``--repeats`` times in turn with one keep-alive client; prints the median and p90 per size.
Then GETs a 60 MiB file, reads 1 MiB of it and hangs up, and prints how many bytes the
nodes sent for that GET in the next 5 s (their access logs): what a read given up costs
them. Puts this checkout's ``tests/`` on the path for its process helpers.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from processes import service, start_nodes

SECRET = ["--secret", "bench-secret"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="karma8-gw-get-"))
    with ExitStack() as stack:
        discovery = stack.enter_context(
            service(
                ["serve", "--role", "discovery", "--port", "0", "--data", str(root / "d"), *SECRET],
                r"discovery up: (http://\S+)",
                root / "discovery.log",
                cwd=root,
            )
        )
        url = discovery.match.group(1)
        start_nodes(stack, root, url, [*SECRET, "--verbose"], count=6)
        gateway = stack.enter_context(
            service(
                [
                    "serve",
                    "--role",
                    "gw",
                    "--port",
                    "0",
                    "--discovery",
                    url,
                    "--workers",
                    "1",
                    *SECRET,
                ],
                r"gateway up: (http://\S+)",
                root / "gw.log",
                cwd=root,
            )
        )
        gw = gateway.match.group(1)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "karma8.cli",
                "namespace",
                "create",
                "bench",
                "--public",
                "--discovery",
                url,
                *SECRET,
            ],
            check=True,
            cwd=root,
            capture_output=True,
        )
        with httpx.Client(timeout=60) as client:
            for size, label in ((4096, "4 KiB"), (1 << 20, "1 MiB")):
                body = os.urandom(size)
                names = [f"bench/f{size}-{i}" for i in range(args.files)]
                for name in names:
                    assert client.put(f"{gw}/{name}", content=body).status_code == 201
                times = []
                for _ in range(args.repeats):
                    for name in names:
                        start = time.perf_counter()
                        answer = client.get(f"{gw}/{name}")
                        times.append(time.perf_counter() - start)
                        assert answer.status_code == 200
                        assert answer.content == body
                times.sort()
                print(
                    f"{label}: GET median {statistics.median(times) * 1000:.2f} ms,"
                    f" p90 {times[int(len(times) * 0.9)] * 1000:.2f} ms (n={len(times)})"
                )
            assert client.put(f"{gw}/bench/big", content=os.urandom(60 << 20)).status_code == 201
        print(f"a 60 MiB GET given up after 1 MiB: the nodes sent {abandoned(root, gw)} MiB")


def abandoned(root: Path, gw: str) -> float:
    """MiB the nodes sent for a GET of bench/big whose client hung up after 1 MiB."""
    sent_before = part_bytes_sent(root)
    host, port = gw.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"GET /bench/big HTTP/1.1\r\nHost: x\r\n\r\n")
        got = 0
        while got < 1 << 20:
            got += len(sock.recv(1 << 16))
    time.sleep(5)
    return round((part_bytes_sent(root) - sent_before) / (1 << 20), 1)


def part_bytes_sent(root: Path) -> int:
    """Bytes of part GETs the nodes logged as sent so far."""
    total = 0
    for log in root.glob("node-*.log"):
        for line in log.read_text().splitlines():
            found = re.search(r"GET /v1/parts/\S+ \d+ (\d+) ", line)
            if found:
                total += int(found.group(1))
    return total


if __name__ == "__main__":
    main()
