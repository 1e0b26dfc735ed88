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

A call that only reads also waits, if an earlier write is not durable yet: otherwise a reader
could act on a commit (say, serve a file) that a power loss then takes back.

When a write leaves the log at ``checkpoint_bytes`` or longer, its caller checkpoints the log
into the database and empties it, in a worker thread, holding new metadata calls back from
that moment (the event loop keeps serving everything else): with writers running the
checkpoint could never finish and the log would grow without end. So no call starts on a log
at or past the bound, however fast the writers are (counting bytes, not seconds, keeps that
true on any machine), unless a checkpoint could not complete: then the next write tries
again. A failed sync, or an I/O error of a
checkpoint, is fail-stop: that call and every later one raise :class:`StorageFailure`;
restart the service. The log is synced through a descriptor opened with the store, so a
write-back error is reported even if the checkpoint's own fsync saw it first.
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
        self.group = GroupSync(lambda: self._store.sync_wal(), name="discovery log")
        self._needed = 0  # the round that makes the latest write durable
        self._checkpointing: trio.Event | None = None  # set while a checkpoint holds calls back
        self.checkpoints = 0

    async def __call__(self, fn: Callable[[], T]) -> T:
        await trio.lowlevel.checkpoint()
        while self._checkpointing is not None:
            await self._checkpointing.wait()
        before = self._store.changes
        try:
            return fn()
        finally:
            if self._store.changes != before:
                self._needed = self.group.ticket()
                if self._checkpoint_due():
                    # No await before _checkpoint() holds calls back: none starts on this log.
                    await self._checkpoint()
            if not self.group.is_durable(self._needed):
                try:
                    await self.group.sync(self._needed)
                except OSError as exc:
                    raise StorageFailure(f"metadata write-back failed: {exc}") from None

    def _checkpoint_due(self) -> bool:
        if self._checkpointing is not None:
            return False
        return self._store.log_bytes() >= self._checkpoint_bytes

    async def _checkpoint(self) -> None:
        self._checkpointing = trio.Event()
        try:
            with trio.CancelScope(shield=True):  # calls are held back until it ends
                completed = await trio.to_thread.run_sync(self._store.checkpoint)
            self.checkpoints += completed
        except sqlite3.Error as exc:
            if exc.sqlite_errorcode & 0xFF == SQLITE_IOERR:
                failure = OSError(errno.EIO, f"checkpoint failed: {exc}")
                self.group.fail(failure)
                raise StorageFailure(f"metadata write-back failed: {failure}") from None
            log.warning("discovery checkpoint failed: %s", exc)  # the log keeps the commits
        finally:
            self._checkpointing.set()
            self._checkpointing = None
