"""Discovery's metadata in net mode: inline calls, commits made durable in shared log syncs."""

from __future__ import annotations

import errno
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from karma8.core.errors import StorageFailure
from karma8.metadata.sqlite import SqliteMetadataStore
from karma8.net.metasync import GroupCommitRunner


def open_store(path: Path) -> SqliteMetadataStore:
    return SqliteMetadataStore(path / "meta.sqlite3", sync_on_commit=False)


class CountingSync:
    """Wraps ``store.sync_wal``: counts rounds, can be slowed, held or broken."""

    def __init__(self, store: SqliteMetadataStore, *, delay: float = 0.0) -> None:
        self._real = store.sync_wal
        self.rounds = 0
        self.delay = delay
        self.release = threading.Event()
        self.release.set()
        self.fail = False

    def __call__(self) -> None:
        self.release.wait()
        time.sleep(self.delay)
        if self.fail:
            raise OSError(errno.EIO, "Input/output error")
        self._real()
        self.rounds += 1


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteMetadataStore]:
    s = open_store(tmp_path)
    yield s
    s.close()


@pytest.fixture
def sync(store: SqliteMetadataStore, monkeypatch: pytest.MonkeyPatch) -> CountingSync:
    """The store's log syncs, counted (and controllable)."""
    counting = CountingSync(store)
    monkeypatch.setattr(store, "sync_wal", counting)
    return counting


@pytest.fixture
def run(store: SqliteMetadataStore) -> GroupCommitRunner:
    return GroupCommitRunner(store)


async def test_a_write_returns_after_a_log_sync_a_read_without_one(
    store: SqliteMetadataStore, sync: CountingSync, run: GroupCommitRunner
) -> None:
    await run(lambda: store.create_namespace("a", 1.0))
    assert sync.rounds == 1
    assert await run(lambda: store.namespace_exists("a"))
    assert sync.rounds == 1  # nothing new to make durable


async def test_concurrent_writes_share_log_syncs(
    store: SqliteMetadataStore, sync: CountingSync, run: GroupCommitRunner
) -> None:
    sync.delay = 0.01

    async def create(i: int) -> None:
        await run(lambda: store.create_namespace(f"ns{i}", 1.0))

    async with trio.open_nursery() as nursery:
        for i in range(30):
            nursery.start_soon(create, i)
    assert all(store.namespace_exists(f"ns{i}") for i in range(30))
    assert 1 <= sync.rounds <= 3  # 30 commits: the first round, then one for all the rest


async def test_a_read_waits_until_an_earlier_write_is_durable(
    store: SqliteMetadataStore, sync: CountingSync, run: GroupCommitRunner
) -> None:
    sync.release.clear()  # the disk is slow: the first round hangs
    done: list[str] = []

    async def write() -> None:
        await run(lambda: store.create_namespace("slow", 1.0))
        done.append("write")

    async def read() -> None:
        assert await run(lambda: store.namespace_exists("slow"))
        done.append("read")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        assert done == []  # the reader saw the commit, so it waits for it to be durable
        sync.release.set()
    assert sorted(done) == ["read", "write"]


async def test_a_read_ahead_answers_at_once_and_its_error_waits_for_durability(
    store: SqliteMetadataStore, sync: CountingSync, run: GroupCommitRunner
) -> None:
    sync.release.clear()  # the disk is slow: the first round hangs
    done: list[str] = []

    async def write() -> None:
        await run(lambda: store.create_namespace("slow", 1.0))
        done.append("write")

    def refuse() -> None:
        raise StorageFailure("an answer that states what the database holds")

    async def read_ahead_failing() -> None:
        with pytest.raises(StorageFailure, match="states what"):
            await run.read_ahead(refuse)
        done.append("error")

    async def read_ahead() -> None:
        assert await run.read_ahead(lambda: store.namespace_exists("slow"))
        done.append("ahead")

    async def read_ahead_writing() -> None:  # not what it is for: answered as __call__ would
        await run.read_ahead(lambda: store.create_namespace("written", 1.0))
        done.append("wrote")

    async with trio.open_nursery() as nursery:
        try:
            nursery.start_soon(write)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(read_ahead)  # sees the commit not yet durable...
            nursery.start_soon(read_ahead_failing)
            nursery.start_soon(read_ahead_writing)
            await trio.testing.wait_all_tasks_blocked()
            assert done == ["ahead"]  # ...and answers; an error or a write waits
        finally:
            sync.release.set()
    assert done[0] == "ahead"
    assert sorted(done[1:]) == ["error", "write", "wrote"]
    assert sync.rounds == 2  # the write's, and the one the writing read_ahead waited for


async def test_a_failed_log_sync_fails_the_call_and_every_later_one(
    store: SqliteMetadataStore, sync: CountingSync, run: GroupCommitRunner
) -> None:
    sync.fail = True
    with pytest.raises(StorageFailure, match="write-back failed"):
        await run(lambda: store.create_namespace("lost", 1.0))
    sync.fail = False  # the disk "recovers": a failed write-back is still fail-stop
    with pytest.raises(StorageFailure):
        await run(lambda: store.create_namespace("later", 1.0))


async def test_an_acknowledged_write_is_in_the_files_a_crash_leaves(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    run = GroupCommitRunner(store)
    await run(lambda: store.create_namespace("kept", 1.0))
    # A crash: the process dies without closing, leaving the database and its log.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for name in ("meta.sqlite3", "meta.sqlite3-wal"):
        shutil.copy(tmp_path / name, crashed / name)
    reopened = open_store(crashed)
    assert reopened.namespace_exists("kept")
    reopened.close()
    store.close()


async def test_writes_checkpoint_the_log_into_the_database(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    run = GroupCommitRunner(store, checkpoint_bytes=0)
    await run(lambda: store.create_namespace("moved", 1.0))
    assert run.checkpoints == 0  # the log is measured as a call starts: the next one
    assert await run(lambda: store.namespace_exists("moved"))
    assert run.checkpoints == 1
    assert (tmp_path / "meta.sqlite3-wal").stat().st_size == 0  # emptied, not just copied
    # After the checkpoint the database file alone has the commit.
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(tmp_path / "meta.sqlite3", alone / "meta.sqlite3")
    reopened = open_store(alone)
    assert reopened.namespace_exists("moved")
    reopened.close()
    store.close()


def test_without_a_checkpoint_the_commit_is_only_in_the_log(tmp_path: Path) -> None:
    # The converse of the test above, so that it can fail: no automatic checkpoints.
    store = open_store(tmp_path)
    store.create_namespace("logged", 1.0)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(tmp_path / "meta.sqlite3", alone / "meta.sqlite3")
    reopened = open_store(alone)
    assert not reopened.namespace_exists("logged")
    reopened.close()
    store.close()


class LogWatch:
    """Records the log's size as each metadata call starts and after each checkpoint."""

    def __init__(self, store: SqliteMetadataStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.store = store
        self.at_call: list[int] = []
        self.after_checkpoint: list[int] = []
        real = store.checkpoint

        def checkpoint() -> bool:
            completed = real()
            self.after_checkpoint.append(store.log_bytes())
            return completed

        monkeypatch.setattr(store, "checkpoint", checkpoint)

    def create(self, name: str) -> None:
        self.at_call.append(self.store.log_bytes())
        self.store.create_namespace(name, 1.0)


async def eight_writers(run: GroupCommitRunner, watch: LogWatch, commits: int = 150) -> None:
    async def writer(w: int) -> None:
        for i in range(commits):
            await run(partial(watch.create, f"w{w}-{i}"))

    async with trio.open_nursery() as nursery:
        for w in range(8):
            nursery.start_soon(writer, w)


BOUND = 64 << 10


async def test_no_call_starts_on_a_log_past_its_bound(
    store: SqliteMetadataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = GroupCommitRunner(store, checkpoint_bytes=BOUND)
    watch = LogWatch(store, monkeypatch)
    await eight_writers(run, watch)
    # A commit is a couple of pages: 1,200 of them are many times the bound.
    assert run.checkpoints >= 5, run.checkpoints
    assert max(watch.at_call) < BOUND
    assert watch.after_checkpoint == [0] * len(watch.after_checkpoint)  # each empties it
    assert all(store.namespace_exists(f"w{w}-149") for w in range(8))


async def test_without_the_bound_the_log_grows_past_it(
    store: SqliteMetadataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The converse of the test above, so that it can fail.
    run = GroupCommitRunner(store, checkpoint_bytes=1 << 40)
    watch = LogWatch(store, monkeypatch)
    await eight_writers(run, watch)
    assert run.checkpoints == 0
    assert max(watch.at_call) > 5 * BOUND


async def test_a_checkpoint_io_error_is_fail_stop(
    store: SqliteMetadataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_checkpoint() -> bool:
        exc = sqlite3.OperationalError("disk I/O error")
        exc.sqlite_errorcode = 10 | (4 << 8)  # SQLITE_IOERR_FSYNC
        raise exc

    monkeypatch.setattr(store, "checkpoint", broken_checkpoint)
    run = GroupCommitRunner(store, checkpoint_bytes=0)
    await run(lambda: store.create_namespace("x", 1.0))  # the log was empty as it started
    with pytest.raises(StorageFailure, match="write-back failed"):
        await run(lambda: store.create_namespace("x2", 1.0))
    monkeypatch.undo()
    with pytest.raises(StorageFailure):  # every later write: its log sync fails now
        await run(lambda: store.create_namespace("y", 1.0))


def _log_size(tmp_path: Path) -> int:
    return (tmp_path / "meta.sqlite3-wal").stat().st_size


async def test_writes_sharing_a_round_share_one_commit(
    store: SqliteMetadataStore, sync: CountingSync, run: GroupCommitRunner, tmp_path: Path
) -> None:
    await run(lambda: store.create_namespace("first", 1.0))
    one = _log_size(tmp_path)
    await run(lambda: store.create_namespace("second", 1.0))
    alone = _log_size(tmp_path) - one  # the pages one commit writes to the log
    sync.release.clear()  # a round runs (and holds) while 30 writers arrive: they share the next

    async def create(i: int) -> None:
        await run(lambda: store.create_namespace(f"ns{i}", 1.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(create, -1)
        await trio.testing.wait_all_tasks_blocked()
        before = _log_size(tmp_path)
        for i in range(30):
            nursery.start_soon(create, i)
        await trio.testing.wait_all_tasks_blocked()
        sync.release.set()
    assert all(store.namespace_exists(f"ns{i}") for i in range(-1, 30))
    # Committed one by one they would have written 30 times the pages of one.
    assert _log_size(tmp_path) - before < 5 * alone


async def test_a_failing_call_in_a_batch_is_undone_alone(
    store: SqliteMetadataStore, sync: CountingSync, run: GroupCommitRunner
) -> None:
    sync.release.clear()

    def half_then_fail() -> None:
        store.create_namespace("undone", 1.0)
        with store._tx() as db:  # a transaction that writes, then fails
            db.execute("INSERT INTO counters(name, value) VALUES ('x', 1)")
            raise ValueError("refused")

    async def fail() -> None:
        with pytest.raises(ValueError, match="refused"):
            await run(half_then_fail)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, lambda: store.create_namespace("before", 1.0))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(run, lambda: store.create_namespace("kept", 1.0))
        nursery.start_soon(fail)
        nursery.start_soon(run, lambda: store.create_namespace("after", 1.0))
        await trio.testing.wait_all_tasks_blocked()
        sync.release.set()
    for name in ("before", "kept", "undone", "after"):  # undone's own transaction committed
        assert store.namespace_exists(name)
    reopened = SqliteMetadataStore(store._path)  # another connection: what was committed
    try:
        assert (
            reopened._db.execute("SELECT count(*) FROM counters WHERE name = 'x'").fetchone()[0]
            == 0
        )
        assert reopened.namespace_exists("after")
    finally:
        reopened.close()


async def test_a_cancelled_caller_leaves_no_transaction_open(
    store: SqliteMetadataStore, sync: CountingSync, run: GroupCommitRunner
) -> None:
    sync.release.clear()
    scope = trio.CancelScope()

    async def cancelled() -> None:
        with scope:
            await run(lambda: store.create_namespace("cancelled", 1.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, lambda: store.create_namespace("held", 1.0))
        await trio.testing.wait_all_tasks_blocked()  # its round hangs in the sync
        nursery.start_soon(cancelled)
        await trio.testing.wait_all_tasks_blocked()  # written, waiting for the next round
        try:
            assert store._db.in_transaction
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert scope.cancelled_caught
            assert not store._db.in_transaction  # committed, though not synced
        finally:
            sync.release.set()
    assert store.namespace_exists("cancelled")


async def test_a_failed_batch_commit_is_fail_stop(
    store: SqliteMetadataStore, run: GroupCommitRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_commit() -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store, "commit_batch", broken_commit)
    with pytest.raises(StorageFailure, match="write-back failed"):
        await run(lambda: store.create_namespace("lost", 1.0))
    monkeypatch.undo()
    with pytest.raises(StorageFailure):
        await run(lambda: store.create_namespace("later", 1.0))


async def test_a_batch_sqlite_rolled_back_fails_its_round(
    store: SqliteMetadataStore, sync: CountingSync, run: GroupCommitRunner
) -> None:
    """On a full disk SQLite rolls back the whole transaction, not just the statement: the
    batch's earlier calls are gone with it, and they must not be acknowledged."""
    sync.release.clear()  # a round runs (held) while A and B arrive: they share the next one
    outcomes: dict[str, str] = {}

    def full_disk() -> None:
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages + 1}")
        try:
            store.create_namespace("x" * 200_000, 1.0)
        finally:
            store._db.execute("PRAGMA max_page_count = 1073741823")

    async def call(label: str, fn: Callable[[], object]) -> None:
        try:
            await run(fn)
            outcomes[label] = "ok"
        except (StorageFailure, sqlite3.Error) as exc:
            outcomes[label] = type(exc).__name__

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, lambda: store.create_namespace("held", 1.0))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(call, "a", lambda: store.create_namespace("a", 1.0))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(call, "b", full_disk)
        await trio.testing.wait_all_tasks_blocked()
        sync.release.set()
    assert outcomes["b"] != "ok"
    assert outcomes["a"] == "StorageFailure"  # not acknowledged: its write is gone
    assert not store.namespace_exists("a")
    with pytest.raises(StorageFailure):  # fail-stop
        await run(lambda: store.namespace_exists("held"))


async def test_a_commit_that_fails_leaves_no_transaction_and_is_fail_stop(
    store: SqliteMetadataStore, run: GroupCommitRunner
) -> None:
    """A real failing COMMIT (a deferred foreign key), not a stand-in."""

    def dangling() -> None:
        store.create_namespace("ok", 1.0)
        with store._tx() as db:
            db.execute("PRAGMA defer_foreign_keys = ON")
            db.execute(
                "INSERT INTO stale_copies(part_key, node_id, size, released_at)"
                " VALUES ('k', 'no-such-node', 1, 1.0)"
            )

    with pytest.raises(StorageFailure, match="write-back failed"):
        await run(dangling)
    assert not store._db.in_transaction
    assert not store.namespace_exists("ok")
    with pytest.raises(StorageFailure):
        await run(lambda: store.create_namespace("later", 1.0))
    assert not store._db.in_transaction  # refused before it ran


async def test_a_call_that_writes_nothing_leaves_no_transaction_open(
    store: SqliteMetadataStore, sync: CountingSync, run: GroupCommitRunner
) -> None:
    def nothing_to_do() -> None:
        with store._tx() as db:
            db.execute("DELETE FROM counters WHERE name = 'none such'")

    await run(nothing_to_do)
    assert not store._db.in_transaction
    assert sync.rounds == 0


async def test_a_checkpoint_commits_the_open_batch_and_empties_the_log(
    store: SqliteMetadataStore, sync: CountingSync, tmp_path: Path
) -> None:
    run = GroupCommitRunner(store, checkpoint_bytes=1 << 40)
    sync.release.clear()
    async with trio.open_nursery() as nursery:
        try:
            nursery.start_soon(run, lambda: store.create_namespace("first", 1.0))
            await trio.testing.wait_all_tasks_blocked()  # committed; its round's sync held
            nursery.start_soon(run, lambda: store.create_namespace("batched", 1.0))
            await trio.testing.wait_all_tasks_blocked()
            assert store._db.in_transaction  # waits for the next round
            run._checkpoint_bytes = 1
            measured: list[int] = []  # the log as the next call runs: it found it too long
            ran = trio.Event()

            def measure() -> None:
                measured.append(_log_size(tmp_path))
                ran.set()

            nursery.start_soon(run, measure)
            await ran.wait()  # (then it waits for the batch's round)
            assert run.checkpoints == 1
            assert measured == [0]  # emptied: the open batch was committed first
            assert not store._db.in_transaction
        finally:
            sync.release.set()
    reopened = SqliteMetadataStore(tmp_path / "meta.sqlite3")
    try:
        assert reopened.namespace_exists("batched")
    finally:
        reopened.close()
