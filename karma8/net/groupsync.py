"""Group commit for a file system: one ``syncfs(2)`` makes many writers' files durable.

A part used to cost two fsyncs of its own (the file, then its directory) in a worker thread.
With many small parts in flight that is many thread hops and journal commits per second, and
the hops, not the disk, limited small PUTs (profiled: a futex storm of threads handing the GIL
back and forth). Instead a committing writer finishes its file and links it into place
without syncing, then calls :meth:`GroupSync.sync`, which returns once a ``syncfs`` that
*started after the call* has completed. Writers that arrive while a round runs share the
next round, so N concurrent commits cost about two syncs, not 2N.

``syncfs`` flushes every dirty file of the file system (data, inodes and directory entries)
and the device cache. Errors are fail-stop, as PostgreSQL treats a failed fsync: a failed
write-back cannot be retried (the kernel may have dropped the dirty pages), and it cannot be
attributed to one writer, so after a failed round every later sync fails too, and the node
must be restarted (it rechecks its parts). The file descriptor that ``syncfs`` reports
write-back errors through is opened when the store opens, so an error of any write since then
is seen.

Linux only (``syncfs`` via libc); elsewhere :func:`GroupSync.open` returns None and the store
fsyncs every part and directory itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import weakref
from pathlib import Path

import trio

_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _load_syncfs() -> ctypes._NamedFuncPointer | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_SYNCFS = _load_syncfs()


class GroupSync:
    """Shared ``syncfs`` rounds for the file system holding ``path``."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        weakref.finalize(self, os.close, fd)
        self._lock = trio.Lock()
        self._started = 0
        self._finished = 0
        self._failure: OSError | None = None

    @classmethod
    def open(cls, path: Path) -> GroupSync | None:
        """A syncer for ``path``'s file system, or None where ``syncfs`` is not available."""
        if _SYNCFS is None:
            return None
        return cls(os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC))

    @property
    def rounds(self) -> int:
        """How many ``syncfs`` calls have completed."""
        return self._finished

    async def sync(self) -> None:
        """Return once everything written to the file system before this call is durable.

        Raises:
            OSError: This round or an earlier one failed (fail-stop, see the module doc).
        """
        ticket = self._started + 1  # the first round that starts after this call
        async with self._lock:
            self._check()
            if self._finished >= ticket:
                return
            self._started += 1
            try:
                await trio.to_thread.run_sync(self._syncfs)
            except OSError as exc:
                self._failure = exc
                raise
            self._finished = self._started

    def _check(self) -> None:
        if self._failure is not None:
            raise OSError(
                self._failure.errno, f"an earlier write-back failed: {self._failure.strerror}"
            )

    def _syncfs(self) -> None:
        assert _SYNCFS is not None
        if _SYNCFS(self._fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
