"""A storage node's periodic check of its parts against discovery's list
(karma8.actors.storage.StorageNode._check_parts): what it reports, and what it logs."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import pytest

from karma8.actors.storage import StorageConfig, StorageNode

from storehelpers import new_tiered, payload, put


class Discovery:
    """What the check asks discovery, answered from a fixed list of expected parts."""

    def __init__(self, expected: list[str]) -> None:
        self.expected = expected
        self.reported: list[list[str]] = []

    async def expected_parts(self, *, node_id: str) -> list[str]:
        return self.expected

    async def report_lost_parts(self, *, node_id: str, keys: Sequence[str], reason: str) -> None:
        self.reported.append(list(keys))

    async def unknown_parts(self, *, node_id: str, keys: Sequence[str]) -> list[str]:
        return []


async def test_missing_parts_are_reported_every_check_and_logged_once_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Until repair has moved them off (it may wait for a node to go to), the same parts are
    # missing at every check: an ERROR line each time would fill the log.
    store = new_tiered(tmp_path)
    await put(store, "v.0", payload(10))
    discovery = Discovery(["v.0", "v.1", "v.2"])
    node = StorageNode(
        node_id="n0",
        url="http://n0",
        store=store,
        discovery=cast(Any, discovery),
        config=StorageConfig(),
    )
    with caplog.at_level(logging.ERROR, logger="karma8"):
        discovery.expected.remove("v.2")
        await node._check_parts()
        discovery.expected.append("v.2")
        for _ in range(3):
            await node._check_parts()
        discovery.expected.append("v.3")
        await node._check_parts()
    assert discovery.reported == [["v.1"]] + [["v.1", "v.2"]] * 3 + [["v.1", "v.2", "v.3"]]
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert logged == [
        "node n0: 1 part is missing (v.1); reported for repair",
        "node n0: 2 parts are missing (e.g. v.2), 1 of them newly found; reported for repair",
        "node n0: 3 parts are missing (e.g. v.3), 1 of them newly found; reported for repair",
    ]
    store.close()
