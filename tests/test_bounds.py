"""What a gateway gives back after uploads: a full collection only after failed ones."""

from __future__ import annotations

import gc
import weakref
from functools import partial

import trio
import trio.testing

from karma8.net.bounds import UploadGate, give_back_memory, settle_heap


async def test_memory_is_trimmed_after_uploads_and_collected_only_after_failed_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = UploadGate(max_uploads=10, idle_timeout=1.0)
    calls: list[str] = []

    def collect() -> int:
        calls.append("collect")
        return 0

    async def upload(*, failed: bool) -> None:
        assert gate.busy() is None
        gate.done(failed=failed)
        await trio.sleep(1.5)  # past the next round of give_back_memory
        await trio.testing.wait_all_tasks_blocked()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            partial(
                give_back_memory,
                gate,
                every=1.0,
                collect=collect,
                trim=lambda: calls.append("trim"),
            )
        )
        await trio.sleep(1.5)
        assert calls == []  # nothing ended: nothing to give back
        await upload(failed=False)
        assert calls == ["trim"]  # a successful upload's buffers were freed as it went
        await upload(failed=True)
        assert calls == ["trim", "collect", "trim"]  # a failed one's may sit in cycles
        await trio.sleep(3)
        assert calls == ["trim", "collect", "trim"]  # nothing ended since
        nursery.cancel_scope.cancel()


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_a_settled_heap_is_collected_first_then_left_out_of_collections() -> None:
    built_at_start = [[index] for index in range(1000)]  # tracked, as start-up's objects are
    garbage = weakref.ref(_Node())  # start-up's garbage: collected, not frozen for good
    frozen = gc.get_freeze_count()
    settle_heap()
    try:
        assert garbage() is None
        assert gc.get_freeze_count() >= frozen + len(built_at_start)
    finally:
        gc.unfreeze()  # the rest of the suite collects as usual
