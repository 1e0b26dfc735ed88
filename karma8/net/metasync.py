"""Discovery's metadata calls in net mode: inline on the event loop, durable in groups.

Every upload is two discovery transactions (begin, commit). Run in a worker thread, each call
was a thread hop, and each SQLite statement in that thread handed the GIL back and forth with
the busy event loop (profiled: small PUTs waited on the GIL, not on the disk); synced one by
one, each commit was also an ``fdatasync`` of its own.

:class:`GroupCommitRunner` is the :class:`karma8.ports.BlockingRunner` that discovery calls its
store through. It runs the call inline (an indexed SQLite transaction takes tens of
microseconds) on a store opened with ``sync_on_commit=False``; if the call changed anything,
it then waits for a :class:`~karma8.net.groupsync.GroupSync` round of
:meth:`SqliteMetadataStore.sync_wal` that started after the commit. Concurrent callers share
rounds, so N commits cost one ``fdatasync``, and no call returns before its commit is durable.

A call that only reads also waits, if an earlier write is not durable yet: otherwise a reader
could act on a commit (say, serve a file) that a power loss then takes back.

Rounds also checkpoint the log into the database, in the worker thread, at most once per
``checkpoint_interval`` seconds. A failed sync is fail-stop: that call and every later one
raise :class:`StorageFailure`; restart the service.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

import trio

from karma8.core.errors import StorageFailure
from karma8.metadata.sqlite import SqliteMetadataStore
from karma8.net.groupsync import GroupSync

T = TypeVar("T")

log = logging.getLogger(__name__)


class GroupCommitRunner:
    """Runs metadata calls inline and returns once what they (and earlier calls) wrote is
    durable."""

    def __init__(self, store: SqliteMetadataStore, *, checkpoint_interval: float = 1.0) -> None:
        self._store = store
        self._checkpoint_interval = checkpoint_interval
        self._last_checkpoint = time.monotonic()
        self.group = GroupSync(self._sync_round, name="discovery log")
        self._needed = 0  # the round that makes the latest write durable

    async def __call__(self, fn: Callable[[], T]) -> T:
        await trio.lowlevel.checkpoint()
        before = self._store.changes
        try:
            return fn()
        finally:
            if self._store.changes != before:
                self._needed = self.group.ticket()
            if not self.group.is_durable(self._needed):
                try:
                    await self.group.sync(self._needed)
                except OSError as exc:
                    raise StorageFailure(f"metadata write-back failed: {exc}") from None

    def _sync_round(self) -> None:
        self._store.sync_wal()
        now = time.monotonic()
        if now - self._last_checkpoint >= self._checkpoint_interval:
            self._last_checkpoint = now
            try:
                self._store.checkpoint()
            except sqlite3.Error as exc:  # the log keeps the commits; the next round retries
                log.warning("discovery checkpoint failed: %s", exc)
