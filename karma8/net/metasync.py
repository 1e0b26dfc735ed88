"""Discovery's metadata calls in net mode: inline on the event loop, durable in groups.

Every upload is two discovery transactions (begin, commit). Run in a worker thread, each call
was a thread hop, and each SQLite statement in that thread handed the GIL back and forth with
the busy event loop (profiled: small PUTs waited on the GIL, not on the disk); synced one by
one, each commit was also an ``fdatasync`` of its own.

:class:`GroupCommitRunner` is the :class:`karma8.ports.BlockingRunner` that discovery calls its
store through. It runs the call inline (an indexed SQLite transaction takes tens of
microseconds) on a store opened with ``sync_on_commit=False``; if the call changed anything,
it then waits for a :class:`~karma8.store.groupsync.GroupSync` round of
:meth:`SqliteMetadataStore.sync_wal` that started after the commit. Concurrent callers share
rounds, so N commits cost one ``fdatasync``, and no call returns before its commit is durable.

They share the ``COMMIT`` too: a call's transaction is left open (``defer_commits``), the
calls after it join it as savepoints (one that fails is undone alone), and the round commits
them all on the event loop as it starts, before its thread syncs the log. A small upload's
commit touches ~15 pages of indexes and tables, the same few for every upload; committed one
by one each wrote them all to the log again (~60 KiB per upload), in a batch once. A failed
batch ``COMMIT`` is fail-stop like a failed sync, and so is a batch SQLite rolled back whole
(on a full disk or an I/O error it undoes the transaction, not just the failing savepoint):
none of its callers is answered as if it had been written. No transaction is left open
without a round to commit it: a call that wrote nothing commits an untouched batch at once,
and a caller cancelled while it waits commits the batch itself (the round it waited for might
never come). After a failure no call runs at all.

A call that only reads also waits, if an earlier write is not durable yet: otherwise a reader
could act on a commit (say, serve a file) that a power loss then takes back. Only
:meth:`GroupCommitRunner.read_ahead` answers at once, for a read whose successful answer lives
no longer than the commits it may have seen (a small upload's placement: a lease in memory,
which a crash takes back with them, and which its commit checks again); its errors still wait.

A call that finds the log at ``checkpoint_bytes`` or longer first checkpoints it into the
database and empties it, in a worker thread, holding new metadata calls back from that moment
(the event loop keeps serving everything else): with writers running the checkpoint could
never finish and the log would grow without end. So no call starts on a log at or past the
bound, however fast the writers are (counting bytes, not seconds, keeps that true on any
machine), unless a checkpoint could not complete: then the next call tries again. A failed
sync, or an I/O error of a checkpoint, is fail-stop: that call and every later one raise
:class:`StorageFailure`; restart the service. The log is synced through a descriptor opened
with the store, so a write-back error is reported even if the checkpoint's own fsync saw it
first.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
from collections.abc import Callable
from typing import TypeVar

import trio

from karma8.core.errors import StorageFailure
from karma8.metadata.sqlite import SqliteMetadataStore
from karma8.store.groupsync import GroupSync

T = TypeVar("T")

log = logging.getLogger(__name__)

SQLITE_IOERR = 10  # primary result code of SQLite's disk I/O errors


class GroupCommitRunner:
    """Runs metadata calls inline and returns once what they (and earlier calls) wrote is
    durable."""

    def __init__(self, store: SqliteMetadataStore, *, checkpoint_bytes: int = 4 << 20) -> None:
        self._store = store
        self._checkpoint_bytes = checkpoint_bytes
        self.group = GroupSync(
            lambda: self._store.sync_wal(), name="discovery log", prepare=self._commit_batch
        )
        self._needed = 0  # the round that makes the latest write durable
        self._checkpointing: trio.Event | None = None  # set while a checkpoint holds calls back
        self.checkpoints = 0
        self._batches = 0  # batches committed (or tried) so far
        self._measured: tuple[int, int] | None = None  # (batches, changes) at the log's last size

    async def __call__(self, fn: Callable[[], T]) -> T:
        await self._admit()
        if self._checkpoint_due():
            # No await before _checkpoint() holds calls back: none starts on this log. (The
            # log grows as rounds commit batches, so it is measured as each call starts.)
            await self._checkpoint()
        before = self._store.changes
        self._store.defer_commits = True
        try:
            return fn()
        finally:
            self._store.defer_commits = False
            if not self._wrote(before):
                self._store.commit_if_unwritten()  # no round is coming for it
            await self._wait_durable()

    async def read_ahead(self, fn: Callable[[], T]) -> T:
        """Run ``fn``, which writes nothing, and return its answer at once, durable or not
        (see the module doc); an exception waits for durability first, as in ``__call__``.

        No checkpoint of the log runs first: this call adds nothing to it. It does not yield
        unless cancelled or failing: a placement is the first step of every small upload,
        and a pass of the scheduler there costs each one a whole batch of other tasks."""
        await self._admit()
        before = self._store.changes
        try:
            answer = fn()
        except Exception:
            await self._wait_durable()
            raise
        if self._wrote(before):  # it wrote after all: answered as __call__ answers
            await self._wait_durable()
        return answer

    async def _admit(self) -> None:
        """What every call waits for before it runs: not a pass of the scheduler (a write
        waits for its round anyway, a read answers at once), but a checkpoint of the log in
        progress (its thread has the connection); after a failure, nothing runs."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while self._checkpointing is not None:
            await self._checkpointing.wait()
        if self.group.failed:  # fail-stop: nothing more is written, nothing is answered
            raise StorageFailure("metadata write-back failed earlier: restart discovery")

    def _wrote(self, before: int) -> bool:
        """Whether the store changed since its count was ``before``; if so, the round that
        makes it durable is the one every later wait waits for."""
        if self._store.changes == before:
            return False
        self._needed = self.group.ticket()
        return True

    async def _wait_durable(self) -> None:
        """Return once every call's writes so far are durable."""
        if self.group.is_durable(self._needed):
            return
        try:
            await self.group.sync(self._needed)
        except OSError as exc:
            raise StorageFailure(f"metadata write-back failed: {exc}") from None
        except BaseException:
            # Cancelled: the round this waited for may now never run, so the batch is
            # committed here (not synced: as a commit before a round always was).
            self._commit_quietly()
            raise

    def _commit_batch(self) -> None:
        """The round's first step: one COMMIT for every call since the last round."""
        self._batches += 1
        try:
            self._store.commit_batch()
        except sqlite3.Error as exc:
            raise OSError(errno.EIO, f"committing a batch failed: {exc}") from None

    def _commit_quietly(self) -> None:
        try:
            self._commit_batch()
        except OSError as exc:
            self.group.fail(exc)  # every later call raises it

    def _checkpoint_due(self) -> bool:
        if self._checkpointing is not None:
            return False
        # The log grows only by a commit: one of a batch, or of a write outside the calls.
        written = (self._batches, self._store.changes)
        if written == self._measured:
            return False
        size = self._store.log_bytes()
        self._measured = written if size < self._checkpoint_bytes else None
        return size > 0 and size >= self._checkpoint_bytes

    async def _checkpoint(self) -> None:
        self._checkpointing = trio.Event()
        try:
            self._commit_batch()  # a transaction left open would keep the log from emptying
            with trio.CancelScope(shield=True):  # calls are held back until it ends
                completed = await trio.to_thread.run_sync(self._store.checkpoint)
            self.checkpoints += completed
        except OSError as exc:  # the batch's COMMIT
            self.group.fail(exc)
            raise StorageFailure(f"metadata write-back failed: {exc}") from None
        except sqlite3.Error as exc:
            if exc.sqlite_errorcode & 0xFF == SQLITE_IOERR:
                failure = OSError(errno.EIO, f"checkpoint failed: {exc}")
                self.group.fail(failure)
                raise StorageFailure(f"metadata write-back failed: {failure}") from None
            log.warning("discovery checkpoint failed: %s", exc)  # the log keeps the commits
        finally:
            self._checkpointing.set()
            self._checkpointing = None
