"""Upper bounds of a small PUT with parts of discovery's work taken out of the embedded
cluster's parent process: not stores (nothing they acknowledge is durable or even recorded),
experiments that say what moving that work elsewhere could gain.

    KARMA8_LAUNCH="$PWD/.venv/bin/python $PWD/bench/parent_bounds.py VARIANT" \\
        bench/put_cpu.sh "$PWD" 10

VARIANT:
- ``nowait``: discovery's SQL runs as it does, but no call waits for the log's sync (the
  cost of the metadata's durability waits);
- ``nosql``: placement from a view of the nodes read once, and commits that write nothing
  (the cost of discovery's SQL in the parent's event loop).

Then runs ``karma8`` with the remaining arguments. docs/benchmarks.md has the results.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import trio

from karma8.core.layout import StripeLayout
from karma8.core.model import (
    FileVersion,
    NodeRef,
    PartPlacement,
    PartReceipt,
    VersionState,
    part_key,
)
from karma8.core.placement import NodeLoad
from karma8.metadata.store import SqlMetadataStore
from karma8.net.metasync import GroupCommitRunner

T = TypeVar("T")


def no_waits() -> None:
    async def call(self: GroupCommitRunner, fn: Callable[[], T]) -> T:
        await trio.lowlevel.checkpoint()
        return fn()

    GroupCommitRunner.__call__ = call  # type: ignore[method-assign]


def no_sql() -> None:
    views: dict[str, list[tuple[NodeLoad, str]]] = {}
    read_view = SqlMetadataStore.placement_view

    def view(
        self: SqlMetadataStore, namespace: str, name: str, *, if_absent: bool
    ) -> list[tuple[NodeLoad, str]]:
        if namespace not in views:
            views[namespace] = read_view(self, namespace, name, if_absent=if_absent)
        return views[namespace]

    def commit(
        self: SqlMetadataStore,
        *,
        version_id: str,
        namespace: str,
        name: str,
        layout: StripeLayout,
        nodes: Sequence[str],
        size: int,
        receipts: Sequence[PartReceipt],
        created_at: float,
        now: float,
        **_: Any,
    ) -> FileVersion:
        by_index = {r.index: r for r in receipts}
        parts = tuple(
            PartPlacement(
                index=i,
                key=part_key(version_id, i),
                node=NodeRef(node_id=node, url="http://unrecorded"),
                size=by_index[i].size,
                checksum=by_index[i].checksum,
            )
            for i, node in enumerate(nodes)
        )
        return FileVersion(
            version_id=version_id,
            namespace=namespace,
            name=name,
            state=VersionState.COMMITTED,
            size=size,
            layout=layout,
            parts=parts,
            created_at=created_at,
            committed_at=now,
            etag="unrecorded",
        )

    SqlMetadataStore.placement_view = view  # type: ignore[method-assign]
    SqlMetadataStore.commit_placed = commit  # type: ignore[method-assign]


VARIANTS = {"nowait": no_waits, "nosql": no_sql}

if __name__ == "__main__":
    VARIANTS[sys.argv[1]]()
    from karma8.cli import main

    sys.argv = ["karma8", *sys.argv[2:]]
    main()
