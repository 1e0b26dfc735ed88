"""The metadata cost of a small PUT and a GET, per store: placement_view + commit_placed +
current_version, run straight against the store (no HTTP, no event loop).

    .venv/bin/python bench/metadata_ops.py                       # SQLite file, 1 thread
    .venv/bin/python bench/metadata_ops.py --metadata-url URL --threads 1 4 8 --instances 2

SQLite is opened as net mode opens it (commits synced in groups by the caller, so no fsync
here). For PostgreSQL the database's schema must be up to date (``karma8 db upgrade``); each
instance is a store with a pool of its own, as a discovery process is, and its threads are
spread over them. Prints operations per second (one operation: the three calls) and the
process's CPU time per operation. It uses only the store's public API, so the same file
runs against an older tree for an A/B of the SQLite path:
``for t in OLD NEW; do $t/.venv/bin/python bench/metadata_ops.py; done``.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from karma8.core.layout import StripeLayout
from karma8.core.model import NodeRegistration, PartReceipt
from karma8.core.placement import place_parts

if TYPE_CHECKING:
    from karma8.metadata.store import SqlMetadataStore

LAYOUT = StripeLayout()
SIZE = 4096


def prepare(store: SqlMetadataStore) -> None:
    store.create_namespace("bench", 0.0)
    for i in range(6):
        registration = NodeRegistration(node_id=f"n{i}", url=f"http://n{i}", capacity_bytes=1 << 50)
        store.upsert_node(registration, 0.0)


def put_and_get(store: SqlMetadataStore, version_id: str) -> None:
    sizes = LAYOUT.slot_sizes(SIZE)
    view = store.placement_view("bench", version_id, if_absent=False)
    nodes = place_parts([load for load, _ in view], count=5, part_size=max(sizes), salt=version_id)
    store.commit_placed(
        version_id=version_id,
        namespace="bench",
        name=version_id,
        layout=LAYOUT,
        nodes=nodes,
        size=SIZE,
        receipts=[PartReceipt(index=i, size=s, checksum="0" * 64) for i, s in enumerate(sizes)],
        created_at=1.0,
        now=2.0,
        if_absent=False,
    )
    store.current_version("bench", version_id)


def rate(
    stores: list[SqlMetadataStore], threads: int, seconds: float, tag: str
) -> tuple[float, float]:
    """Operations per second over ``seconds``, ``threads`` threads spread over ``stores``,
    and CPU microseconds per operation."""
    done = [0] * threads
    stop = time.monotonic() + seconds
    cpu = time.process_time()

    def work(t: int) -> None:
        store = stores[t % len(stores)]
        while time.monotonic() < stop:
            put_and_get(store, f"{tag}-{t}-{done[t]}")
            done[t] += 1

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    ops = max(sum(done), 1)
    return ops / seconds, (time.process_time() - cpu) / ops * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--metadata-url", help="PostgreSQL (else a SQLite file)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--instances", type=int, default=1, help="stores (pools) on PostgreSQL")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if args.metadata_url is None:
        from karma8.metadata.sqlite import SqliteMetadataStore

        if args.threads != [1]:  # one connection, called inline by net mode
            parser.error("SQLite runs one call at a time: --threads 1")
        path = Path(tempfile.mkdtemp()) / "discovery.sqlite3"
        stores: list[SqlMetadataStore] = [SqliteMetadataStore(path, sync_on_commit=False)]
    else:
        from karma8.metadata.postgres import PostgresMetadataStore

        pool = max(args.threads)
        stores = [
            PostgresMetadataStore(args.metadata_url, pool_size=pool) for _ in range(args.instances)
        ]
    prepare(stores[0])
    rate(stores, 1, 1.0, f"warm-{time.time_ns()}")
    for threads in args.threads:
        ops, cpu = rate(stores, threads, args.seconds, f"t{threads}-{time.time_ns()}")
        print(
            f"threads {threads:>3}  instances {len(stores)}  {ops:8.0f} ops/s"
            f"  {cpu:7.1f} us CPU/op",
            flush=True,
        )
    for store in stores:
        store.close()


if __name__ == "__main__":
    main()
