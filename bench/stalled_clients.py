"""Stalled clients against a gateway: does it keep serving others, and what memory do they hold?

Discovery, 6 storage nodes and a gateway run as separate processes. The script stores one
file, then opens ``--uploads`` PUTs that send their headers and ``--stall`` bytes of body and
then nothing (raw sockets), and ``--headers`` connections that send half a request line and
then nothing. With all of them open it measures a GET of the stored file and a new small PUT
(``--probes`` times each), and the gateway's RSS before, during and after (once the idle limit
has aborted the uploads and the sockets are closed), and what discovery still has reserved.

    .venv/bin/python bench/stalled_clients.py [--uploads 200] [--headers 200] [--stall 4096]
        [--chunked] [--idle 5] [--workdir /tmp/karma8-stalled]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import karma8_process, separate_cluster

SECRET = "bench-secret"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def stalled_upload(host: str, port: int, i: int, stall: int, chunked: bool) -> socket.socket:
    sock = socket.create_connection((host, port))
    if chunked:
        head = "Transfer-Encoding: chunked\r\n"
        body = f"{stall:x}\r\n".encode() + b"x" * stall + b"\r\n"
    else:
        head = f"Content-Length: {stall * 1000}\r\n"
        body = b"x" * stall
    sock.sendall(f"PUT /default/stalled-{i} HTTP/1.1\r\nHost: g\r\n{head}\r\n".encode() + body)
    return sock


def slow_header(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port))
    sock.sendall(b"GET /default/existing HTTP/1.1\r\nHo")
    return sock


def reserved_bytes(discovery: str) -> int:
    nodes = httpx.get(f"{discovery}/v1/nodes", headers={"X-Karma8-Secret": SECRET}).json()
    return sum(int(n["reserved_bytes"]) for n in nodes["nodes"])


def timed(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=200)
    parser.add_argument("--headers", type=int, default=200)
    parser.add_argument("--stall", type=int, default=4096, help="body bytes each upload sends")
    parser.add_argument("--chunked", action="store_true", help="chunked bodies, else a length")
    parser.add_argument("--idle", type=float, default=30.0, help="idle_timeout, header_timeout")
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument(
        "--no-config", action="store_true", help="no gateway config (a version before the limits)"
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/karma8-stalled"))
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    config = args.workdir / "gateway.toml"
    config.write_text(
        ""
        if args.no_config
        else f"idle_timeout = {args.idle}\nheader_timeout = {args.idle}\n"
        f"max_uploads = {args.uploads + 64}\n"
    )
    with separate_cluster(args.workdir, secret=SECRET) as discovery:
        gw_args = ["serve", "--role", "gw", "--port", "0", "--discovery", discovery]
        gw_args += ["--secret", SECRET, "--config", str(config)]
        with karma8_process(gw_args, r"gateway up: (http://\S+)", args.workdir / "gw.log") as (
            pid,
            url,
        ):
            run(args, pid, url, discovery)


def run(args: argparse.Namespace, pid: int, url: str, discovery: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    client = httpx.Client(base_url=url, timeout=60)
    client.put("/default/existing", content=b"e" * 100_000).raise_for_status()
    before = rss_mib(pid)
    socks = [
        stalled_upload(host, int(port), i, args.stall, args.chunked) for i in range(args.uploads)
    ]
    socks += [slow_header(host, int(port)) for _ in range(args.headers)]
    time.sleep(3.0)  # let the gateway begin them all
    during = rss_mib(pid)
    reserved = reserved_bytes(discovery)
    gets, puts = [], []
    for i in range(args.probes):
        gets.append(timed(lambda: client.get("/default/existing").raise_for_status()))
        puts.append(
            timed(
                lambda i=i: client.put(f"/default/new-{i}", content=b"n" * 1000).raise_for_status()
            )
        )
    peak = rss_mib(pid)
    time.sleep(args.idle + 2.0)  # the idle limit aborts the uploads
    for sock in socks:
        sock.close()
    time.sleep(6.0)  # the gateway gives freed pages back every 5 s
    after = rss_mib(pid)
    left = reserved_bytes(discovery)

    def ms(xs: list[float]) -> str:
        return f"median {statistics.median(xs) * 1000:.0f} ms, max {max(xs) * 1000:.0f} ms"

    kind = "chunked" if args.chunked else "Content-Length"
    print(
        f"{args.uploads} stalled uploads ({kind}, {args.stall} B each), {args.headers} slow headers"
    )
    print(f"GET of an existing file: {ms(gets)}")
    print(f"PUT of 1000 bytes:       {ms(puts)}")
    print(
        f"gateway RSS: before {before:.0f} MiB, during {during:.0f}-{peak:.0f} MiB,"
        f" after {after:.0f} MiB"
    )
    print(f"reserved on nodes: during {reserved / 2**20:.1f} MiB, after {left / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
