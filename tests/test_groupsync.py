"""GroupSync rounds that run writers' steps before their sync (karma8.store.groupsync)."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from karma8.store.files.store import FilePartStore
from karma8.store.groupsync import GroupSync


class Log:
    """A sync function that records, in order, the steps that ran and each sync."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.lock = threading.Lock()
        self.hold = threading.Event()
        self.hold.set()
        self.fail = False

    def step(self, name: str) -> None:
        with self.lock:
            self.events.append(name)

    def sync(self) -> None:
        self.hold.wait()
        if self.fail:
            raise OSError(errno.EIO, "Input/output error")
        with self.lock:
            self.events.append("sync")


async def test_steps_run_once_each_before_the_sync_their_writers_wait_for() -> None:
    log = Log()
    group = GroupSync(log.sync)
    returned: dict[str, int] = {}

    async def writer(name: str) -> None:
        await group.sync(before=lambda: log.step(name))
        returned[name] = len(log.events)  # how much had happened when it returned

    async with trio.open_nursery() as nursery:
        for i in range(30):
            nursery.start_soon(writer, f"w{i}")
    steps = [e for e in log.events if e != "sync"]
    assert sorted(steps) == sorted(f"w{i}" for i in range(30))  # each ran exactly once
    for name, seen in returned.items():
        done = log.events[:seen]
        # Its step ran, and a sync ran after it, before the writer returned.
        assert name in done
        assert "sync" in done[done.index(name) :]
    # 30 writers, far fewer rounds (one thread trip each).
    assert 1 <= group.rounds < 10


async def test_a_failing_step_fails_only_its_writer() -> None:
    log = Log()
    group = GroupSync(log.sync)

    def bad() -> None:
        raise ValueError("no such directory")

    results: dict[str, str] = {}

    async def writer(name: str, step: Callable[[], None]) -> None:
        try:
            await group.sync(before=step)
            results[name] = "ok"
        except ValueError as exc:
            results[name] = f"failed: {exc}"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer, "good1", lambda: log.step("good1"))
        nursery.start_soon(writer, "bad", bad)
        nursery.start_soon(writer, "good2", lambda: log.step("good2"))
    assert results == {"good1": "ok", "bad": "failed: no such directory", "good2": "ok"}
    assert log.events.count("sync") >= 1
    assert await _still_works(group, log)


async def test_steps_run_together_share_one_round_and_each_gets_its_own_error() -> None:
    log = Log()
    group = GroupSync(log.sync)

    def bad() -> None:
        raise ValueError("no such directory")

    errors = await group.run_steps([lambda: log.step("a"), bad, lambda: log.step("c")])
    assert [type(error) for error in errors] == [type(None), ValueError, type(None)]
    assert log.events == ["a", "c", "sync"]  # in order, then one sync
    assert group.rounds == 1


async def test_steps_run_together_and_cancelled_before_a_round_took_them_never_run() -> None:
    log = Log()
    group = GroupSync(log.sync)
    log.hold.clear()  # the first round's sync blocks
    async with trio.open_nursery() as nursery:
        nursery.start_soon(group.sync)  # runs a round, held in its sync
        await trio.testing.wait_all_tasks_blocked()
        with trio.CancelScope() as scope:
            nursery.start_soon(lambda: _cancel_soon(scope))
            await group.run_steps([lambda: log.step("x"), lambda: log.step("y")])
        assert scope.cancelled_caught
        log.hold.set()
    await group.sync()  # a later round does not run them either
    assert log.events == ["sync", "sync"]


async def test_a_step_cancelled_before_a_round_took_it_never_runs() -> None:
    log = Log()
    group = GroupSync(log.sync)
    log.hold.clear()  # the first round's sync blocks
    async with trio.open_nursery() as nursery:
        nursery.start_soon(group.sync)  # runs a round, held in its sync
        await trio.testing.wait_all_tasks_blocked()
        with trio.CancelScope() as scope:
            nursery.start_soon(lambda: _cancel_soon(scope))
            await group.sync(before=lambda: log.step("cancelled"))  # waits for the lock
        assert scope.cancelled_caught
        log.hold.set()
    await group.sync()  # a later round does not run it either
    assert "cancelled" not in log.events


async def test_a_writer_cancelled_while_another_round_runs_its_step_waits_for_it() -> None:
    log = Log()
    group = GroupSync(log.sync)
    in_step = threading.Event()
    finish_step = threading.Event()

    def slow_step() -> None:
        in_step.set()
        finish_step.wait()
        log.step("slow")

    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:

            async def other_runs_round() -> None:
                try:
                    # The writer waits for a round in progress (faked), so that the round
                    # that takes its step is another task's, whatever the wake-up order.
                    await trio.testing.wait_all_tasks_blocked()
                    group._running = None
                    nursery.start_soon(group.sync)  # runs a round: it takes the step
                    await trio.to_thread.run_sync(in_step.wait)
                    faked.set()  # the writer wakes to a round in progress, and waits
                    await trio.testing.wait_all_tasks_blocked()
                    scope.cancel()
                    await trio.testing.wait_all_tasks_blocked()
                finally:
                    finish_step.set()  # never leave the round's thread blocked

            group._running = faked = trio.Event()
            nursery.start_soon(other_runs_round)
            await group.sync(before=slow_step)
        # Cancelled, but it returned only once its step had run: the caller can undo it.
        assert scope.cancelled_caught
        assert "slow" in log.events


async def test_a_round_runs_the_steps_it_took_even_if_its_runner_is_cancelled() -> None:
    # The runner is woken by the end of a round and cancelled in the same tick, as it starts
    # the next round: the steps it takes (another writer's) must still run, and be synced,
    # before that writer returns. (Found by review: they were marked done without running.)
    log = Log()
    group = GroupSync(log.sync)
    scope = trio.CancelScope()
    go = trio.Event()
    returned: list[list[str]] = []
    async with trio.open_nursery() as nursery:

        async def holder() -> None:
            group._running = running = trio.Event()  # a round in progress, as far as sync sees
            await go.wait()
            group._running = None
            running.set()  # wakes the runner, which starts the next round...
            scope.cancel()  # ...and its request is cancelled in the same tick

        async def runner() -> None:
            with scope:
                await group.sync()

        async def writer() -> None:
            await group.sync(before=lambda: log.step("w"))
            returned.append(list(log.events))

        nursery.start_soon(holder)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(runner)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        go.set()
    assert returned == [["w", "sync"]]  # its step ran, then a sync, then it returned


async def test_steps_fail_if_their_round_cannot_start_a_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = Log()
    group = GroupSync(log.sync)
    real_start = trio.lowlevel.start_thread_soon
    calls = 0

    def no_thread_once(*args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("can't start new thread")
        real_start(*args, **kwargs)

    monkeypatch.setattr(trio.lowlevel, "start_thread_soon", no_thread_once)
    outcomes: dict[str, str] = {}

    async def writer(name: str) -> None:
        try:
            await group.sync(before=lambda: log.step(name))
            outcomes[name] = "ok"
        except OSError as exc:
            outcomes[name] = f"OSError: {exc.strerror}"
        except RuntimeError as exc:
            outcomes[name] = f"RuntimeError: {exc}"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer, "a")  # one runs a round that takes both steps and fails
        nursery.start_soon(writer, "b")
    # Whichever ran the round gets its error; the other learns that its step did not run.
    assert sorted(outcomes.values()) == [
        "OSError: the sync round could not run",
        "RuntimeError: can't start new thread",
    ]
    assert "a" not in log.events  # neither step ran, and both writers were told so
    assert "b" not in log.events
    log.events.clear()
    await group.sync(before=lambda: log.step("later"))  # not fail-stop: nothing was lost
    assert log.events == ["later", "sync"]


async def test_rounds_do_not_wait_for_the_default_thread_limiter() -> None:
    # Reads and opens of parts use trio's default thread limiter; a commit's round must not
    # queue behind them.
    log = Log()
    group = GroupSync(log.sync)
    limiter = trio.to_thread.current_default_thread_limiter()
    borrowers = [object() for _ in range(int(limiter.total_tokens))]
    for borrower in borrowers:
        limiter.acquire_on_behalf_of_nowait(borrower)
    gave_back_early = False

    def give_back() -> None:
        for borrower in borrowers:
            limiter.release_on_behalf_of(borrower)

    async with trio.open_nursery() as nursery:

        async def give_back_if_a_round_waits_for_one() -> None:
            nonlocal gave_back_early
            # A poll (no event tells of a waiter); only the failure ever waits there.
            while limiter.statistics().tasks_waiting == 0:  # noqa: ASYNC110
                await trio.sleep(0.001)
            gave_back_early = True
            give_back()

        nursery.start_soon(give_back_if_a_round_waits_for_one)
        await group.sync(before=lambda: log.step("w"))
        nursery.cancel_scope.cancel()
    if not gave_back_early:
        give_back()
    assert not gave_back_early
    assert log.events == ["w", "sync"]


async def test_a_failed_round_fails_its_writers_and_every_later_one() -> None:
    log = Log()
    group = GroupSync(log.sync)
    log.fail = True
    with pytest.raises(OSError, match="Input/output error"):
        await group.sync(before=lambda: log.step("first"))
    assert log.events == ["first"]  # the step ran; the sync after it failed
    log.fail = False  # the disk "recovers": still fail-stop
    with pytest.raises(OSError, match="an earlier write-back failed"):
        await group.sync(before=lambda: log.step("later"))
    assert "later" not in log.events  # no round ran it
    with pytest.raises(OSError, match="an earlier write-back failed"):
        await group.sync()


@pytest.mark.skipif(GroupSync.open(Path(".")) is None, reason="syncfs is Linux only")
async def test_a_commit_cancelled_after_its_part_was_linked_leaves_no_part(
    tmp_path: Path,
) -> None:
    store = FilePartStore(tmp_path / "node", capacity_bytes=1 << 30)
    group = store.group_sync
    assert group is not None
    real_sync = group._sync
    release = threading.Event()
    syncing = threading.Event()

    def held_sync() -> None:
        syncing.set()  # the part's step has run, the sync has not
        release.wait()
        real_sync()

    group._sync = held_sync
    writer = await store.create("ca.0")
    await writer.write(b"x" * 1000)
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:

            async def cancel_in_round() -> None:
                try:
                    # The commit waits for a round in progress (faked); another task runs
                    # the round that takes its step.
                    await trio.testing.wait_all_tasks_blocked()
                    group._running = None
                    nursery.start_soon(group.sync)
                    await trio.to_thread.run_sync(syncing.wait)
                    assert store.part_path("ca.0").exists()  # linked, not yet durable
                    faked.set()
                    await trio.testing.wait_all_tasks_blocked()
                    scope.cancel()
                    await trio.testing.wait_all_tasks_blocked()
                finally:
                    release.set()  # never leave a round's thread blocked

            group._running = faked = trio.Event()
            nursery.start_soon(cancel_in_round)
            await writer.commit()
        assert scope.cancelled_caught
    await writer.discard()
    assert await store.stat("ca.0") is None  # the commit unlinked what its step linked
    assert await store.keys() == []


async def _cancel_soon(scope: trio.CancelScope) -> None:
    await trio.testing.wait_all_tasks_blocked()
    scope.cancel()


async def _still_works(group: GroupSync, log: Log) -> bool:
    await group.sync(before=lambda: log.step("after"))
    return "after" in log.events
