"""What a gateway gives back after uploads (a full collection only after failed ones), and the
descriptors a server takes for itself before it serves."""

from __future__ import annotations

import gc
import resource
import subprocess
import sys
import weakref
from functools import partial

import trio
import trio.testing

from karma8.net.bounds import (
    DESCRIPTORS_SPARE,
    UploadGate,
    descriptors_short,
    give_back_memory,
    settle_heap,
)


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


def _limit_descriptors(soft: int, hard: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_serve_raises_its_open_files_limit_to_the_hard_one() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard == resource.RLIM_INFINITY or hard >= 1024, "this machine's own limit"
    top = 1024 if hard == resource.RLIM_INFINITY else hard
    script = (
        "import resource; from karma8.net.bounds import raise_open_files_limit;"
        " print(*raise_open_files_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        preexec_fn=partial(_limit_descriptors, 256, top),
        capture_output=True,
        text=True,
        check=True,
    )
    soft, hard_seen, now_soft, _ = (int(x) for x in done.stdout.split())
    assert soft == now_soft == top == hard_seen


def test_a_limit_short_of_max_connections_is_said_at_start() -> None:
    assert descriptors_short(4096, 4096 + DESCRIPTORS_SPARE) is None
    said = descriptors_short(4096, 512)
    assert said is not None
    assert "4096" in said
    assert "512" in said
    # karma8 serve says it before anything else (here a storage node without its directory,
    # which stops at once).
    done = subprocess.run(
        [sys.executable, "-m", "karma8.cli", "serve", "--role", "storage"],
        preexec_fn=partial(_limit_descriptors, 512, 512),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "max_connections = 4096 but this process may open only 512 files" in done.stderr
