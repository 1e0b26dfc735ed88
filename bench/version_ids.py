"""What version ids in creation order save the metadata: ``commit_placed`` (a small PUT's
commit) over a growing database, with random ids (as before) or ids that start with the
time (``IdSource.new_version_id``), run straight against the SQLite store as net mode opens
it (no fsync here), committed in batches as discovery's group commit does.

    .venv/bin/python bench/version_ids.py [--versions 60000] [--batch 4]

Prints, every 10,000 versions and for each kind of id, the thread CPU per commit and the
write-ahead log's bytes per commit (the log emptied every 2,000 commits). The two kinds run
one after the other in this process.
"""

from __future__ import annotations

import argparse
import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from metadata_ops import LAYOUT, SIZE, prepare

from karma8.core.model import PartReceipt
from karma8.metadata.sqlite import SqliteMetadataStore


def random_id() -> str:
    return secrets.token_hex(8)


def ordered_id() -> str:
    return f"{time.time_ns() // 1000:013x}{secrets.token_hex(4)}"


def run(kind: str, new_id: Callable[[], str], versions: int, batch: int) -> None:
    store = SqliteMetadataStore(Path(tempfile.mkdtemp()) / "d.sqlite3", sync_on_commit=False)
    prepare(store)  # the namespace "bench" and nodes n0..n5
    store.defer_commits = True
    sizes = LAYOUT.slot_sizes(SIZE)
    receipts = [
        PartReceipt(index=i, size=s, checksum=secrets.token_hex(32)) for i, s in enumerate(sizes)
    ]
    nodes = [f"n{i}" for i in range(5)]
    cpu = 0.0
    log = 0
    for done in range(1, versions + 1):
        version_id = new_id()
        start = time.thread_time()
        store.commit_placed(
            version_id=version_id,
            namespace="bench",
            name=version_id,
            layout=LAYOUT,
            nodes=nodes,
            size=SIZE,
            receipts=receipts,
            created_at=1.0,
            now=2.0,
            if_absent=False,
        )
        if done % batch == 0:
            store.commit_batch()
        cpu += time.thread_time() - start
        if done % 2000 == 0:
            store.commit_batch()
            log += store.log_bytes()
            store.checkpoint()
        if done % 10_000 == 0:
            print(
                f"{kind:8} {done:>7} versions: {cpu / done * 1e6:6.1f} us CPU and"
                f" {log / done / 1024:5.1f} KiB of log per commit",
                flush=True,
            )
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--versions", type=int, default=60_000)
    parser.add_argument("--batch", type=int, default=4, help="commits per COMMIT")
    args = parser.parse_args()
    for kind, new_id in (("random", random_id), ("ordered", ordered_id)):
        run(kind, new_id, args.versions, args.batch)


if __name__ == "__main__":
    main()
