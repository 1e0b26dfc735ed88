"""Inodes that small files cost a storage node: packed volumes against a file per part.

    .venv/bin/python bench/inodes.py [--files 200000] [--size 4096] [--nodes 6]
                                     [--small-part-max 65536] [--dir /var/tmp]

Stores ``--files`` files of ``--size`` bytes the way the gateway lays them out (5 parts,
sizes differing by at most one byte, on 5 of ``--nodes`` nodes) straight into the nodes'
stores (``karma8.store.tiered.open_part_store``, the store ``karma8 serve`` builds), 256
files at a time, the nodes sharing one sync group as in the embedded cluster. Then prints, per
node, the inodes under its directory before and after, as ``df -i`` counts them (files and
directories), and the file system's used inodes before and after. ``--small-part-max 0``
measures the file engine. HTTP and metadata are left out: they add no inodes per file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trio

from karma8.ports import PartStore
from karma8.store.groupsync import SyncGroups
from karma8.store.tiered import open_part_store

PARTS = 5


def inodes_under(path: Path) -> int:
    return 1 + sum(len(dirs) + len(files) for _, dirs, files in os.walk(path))


def used_inodes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_files - stats.f_ffree


async def fill(args: argparse.Namespace, work: Path) -> None:
    groups = SyncGroups()
    roots = [work / f"node-{i}" for i in range(args.nodes)]
    for root in roots:
        root.mkdir()
    stores = [
        open_part_store(
            root,
            capacity_bytes=1 << 40,
            small_part_max=args.small_part_max,
            group_sync=groups.for_path(root) or False,
        )
        for root in roots
    ]
    before = [inodes_under(root) for root in roots]
    fs_before = used_inodes(work)
    body = os.urandom(args.size)
    pieces = [body[i::PARTS] for i in range(PARTS)]  # sizes as the layout's (differ by <= 1)
    limiter = trio.CapacityLimiter(256)
    started = time.monotonic()

    async def one(n: int) -> None:
        async with limiter:
            nodes = [(n + j) % args.nodes for j in range(PARTS)]
            async with trio.open_nursery() as nursery:
                for index, node in enumerate(nodes):
                    nursery.start_soon(put, stores[node], f"{n:016x}.{index}", pieces[index])

    async with trio.open_nursery() as nursery:
        for n in range(args.files):
            nursery.start_soon(one, n)
    elapsed = time.monotonic() - started
    after = [inodes_under(root) for root in roots]
    fs_after = used_inodes(work)
    engine = "files" if args.small_part_max == 0 else f"packed (<= {args.small_part_max} B)"
    print(f"{args.files} files of {args.size} B, {engine}, {args.nodes} nodes, {elapsed:.1f} s")
    print(f"{'node':<8}{'parts':>10}{'inodes before':>16}{'inodes after':>14}{'added':>10}")
    for i, root in enumerate(roots):
        parts = len(await stores[i].keys())
        added = after[i] - before[i]
        print(f"{root.name:<8}{parts:>10}{before[i]:>16}{after[i]:>14}{added:>10}")
    print(
        f"file system: {fs_before} inodes used before, {fs_after} after (+{fs_after - fs_before})"
    )


async def put(store: PartStore, key: str, data: bytes) -> None:
    writer = await store.create(key)
    await writer.write(data)
    await writer.commit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--small-part-max", type=int, default=64 << 10)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args()
    if args.nodes < PARTS:
        sys.exit("--nodes must be at least 5")
    work = Path(tempfile.mkdtemp(prefix="karma8-inodes-", dir=args.dir))
    try:
        trio.run(fill, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
