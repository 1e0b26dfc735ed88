"""Disk I/O for the store's engines: blocking calls from trio, and their errors.

A blocking file-system call runs in a worker thread (``trio.to_thread.run_sync``, which is
never abandoned on cancellation, so no call is left running behind a task), except a small
one: a thread hop costs the event loop more than a call the page cache serves, so a call that
moves at most ``inline_io`` bytes runs on the event loop (:class:`BlockingIO`), as nginx reads
files by default. The functions below are the blocking calls themselves. Any ``OSError``
reaches callers as the karma8 error :func:`storage_error` makes of it, which names no paths.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import TypeVar

import attrs
import trio

from karma8.core.errors import DiskFull, StorageFailure

T = TypeVar("T")

O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


@attrs.frozen(kw_only=True)
class BlockingIO:
    """Where a store's blocking calls run.

    Attributes:
        inline_io: Calls that move at most this many bytes run on the event loop (0: every
            call goes to a worker thread).
    """

    inline_io: int = 1 << 16

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a worker thread (trio's default limiter)."""
        return await trio.to_thread.run_sync(fn)

    async def run_small(self, fn: Callable[[], T], nbytes: int = 0) -> T:
        """Run a short call inline if it moves at most ``inline_io`` bytes, else in a thread."""
        if not self.inline_io or nbytes > self.inline_io:
            return await self.run(fn)
        await trio.lowlevel.checkpoint()
        return fn()


def storage_error(exc: OSError, doing: str) -> Exception:
    """Map an OSError to the karma8 error a caller may see (never naming paths)."""
    if exc.errno in _FULL_ERRNOS:
        return DiskFull("no space left on the node")
    reason = exc.strerror or type(exc).__name__
    return StorageFailure(f"disk error while {doing}: {reason}")


# Parts and databases are the users' data: readable by the service's user only. A file is
# created with FILE_MODE and a directory with DIR_MODE (the umask can only narrow them);
# an existing directory of ours is narrowed on start by private_dir (docs/operations.md,
# "File modes").
FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) with :data:`DIR_MODE`, or narrow an existing
    one to it."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if os.stat(path).st_mode & 0o777 != DIR_MODE:
        os.chmod(path, DIR_MODE)


_held_locks: dict[Path, int] = {}  # lock files this process holds, by resolved path


def hold_lock(path: Path, in_use: Callable[[str], str]) -> None:
    """Hold the lock file ``path`` (``flock``, created if missing) until this process exits
    or :func:`release_lock`; held already by this process, it is its own. Held by another
    process, raise ``OSError(EBUSY)`` whose message is ``in_use`` of that process's pid
    (written in the file)."""
    key = path.resolve()
    if key in _held_locks:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise OSError(errno.EBUSY, in_use(holder)) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held_locks[key] = fd


def release_lock(path: Path) -> None:
    """Let go of a lock :func:`hold_lock` took (a process that exits lets go of all)."""
    fd = _held_locks.pop(path.resolve(), None)
    if fd is not None:
        os.close(fd)  # the flock goes with the last descriptor of its open file


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pread_exact(fd: int, size: int, pos: int) -> bytes:
    """Read ``size`` bytes at ``pos``; fewer only at end of file."""
    data = os.pread(fd, size, pos)
    if len(data) == size or not data:
        return data
    pieces = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, pos + got)
        if not more:
            break
        pieces.append(more)
        got += len(more)
    return b"".join(pieces)


def pwrite_all(fd: int, data: bytes, pos: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, pos)
        view = view[written:]
        pos += written


def pwritev_all(fd: int, buffers: list[bytes], pos: int) -> None:
    """Write ``buffers`` one after another at ``pos``, with one system call if it can."""
    written = os.pwritev(fd, buffers, pos)
    total = sum(len(b) for b in buffers)
    if written < total:
        pwrite_all(fd, b"".join(buffers)[written:], pos + written)


def close_quietly(fd: int) -> None:
    with suppress(OSError):
        os.close(fd)
