"""Discovery's share of a small PUT, alone: concurrent ``place_upload`` + ``commit_upload``
calls on one trio loop, against discovery as ``karma8 serve`` builds it (SQLite in a
temporary directory, commits synced in groups by ``GroupCommitRunner``), with no HTTP, no
gateway and no storage node. Prints uploads per second and the process's CPU time per
upload (the log's sync thread included).

    .venv/bin/python bench/discovery_alone.py [--seconds 6] [--concurrency 16]

It uses only discovery's public calls, so the same file runs against an older tree put on
``PYTHONPATH`` for an A/B.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import trio

from karma8.core.model import NodeRegistration, PartReceipt
from karma8.net.discovery_role import build_discovery, open_metadata
from karma8.net.netconfig import NetConfig

SIZE = 4096


async def run(seconds: float, concurrency: int) -> None:
    config = NetConfig()
    with tempfile.TemporaryDirectory() as workdir:
        store = open_metadata(config, Path(workdir) / "discovery.sqlite3")
        discovery = build_discovery(config, store, embedded=True)
        for i in range(6):
            registration = NodeRegistration(
                node_id=f"n{i}", url=f"http://n{i}", capacity_bytes=1 << 50
            )
            await discovery.register_node(registration)
        await discovery.create_namespace(namespace="bench")
        uploads = 0
        stop = trio.current_time() + seconds

        async def uploader(worker: int) -> None:
            nonlocal uploads
            while trio.current_time() < stop:
                placed = await discovery.place_upload(
                    namespace="bench", name=f"f{worker}-{uploads}", size=SIZE
                )
                sizes = placed.layout.slot_sizes(SIZE)
                receipts = [
                    PartReceipt(index=i, size=size, checksum="0" * 64)
                    for i, size in enumerate(sizes)
                ]
                await discovery.commit_upload(
                    version_id=placed.version_id, size=SIZE, receipts=receipts
                )
                uploads += 1

        cpu, wall = time.process_time(), time.perf_counter()
        async with trio.open_nursery() as nursery:
            for worker in range(concurrency):
                nursery.start_soon(uploader, worker)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        store.close()
    print(
        f"{uploads / wall:.0f} uploads/s, {cpu / uploads * 1e6:.0f} µs of CPU per upload"
        f" ({uploads} uploads, {concurrency} at a time)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    trio.run(run, args.seconds, args.concurrency)


if __name__ == "__main__":
    main()
