"""Reading a part file: :class:`PartRead` (what ``FilePartStore.open`` returns) and the chunk
reader that checks every block it hands out against its CRC, reading the next chunk ahead in
a worker thread (see "Reading" in :mod:`karma8.store.files`).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, suppress
from types import TracebackType

import outcome
import trio

from karma8.core.errors import IntegrityError
from karma8.store.diskio import BlockingIO, close_quietly, pread_exact, storage_error
from karma8.store.files.context import FileStoreContext
from karma8.store.files.format import HEADER_SIZE, PartHeader, check_blocks, read_trailer


class PartRead(AbstractAsyncContextManager["_ChunkReader"]):
    """The context manager :meth:`FilePartStore.open` returns: opens on entry, closes on exit."""

    def __init__(self, context: FileStoreContext, key: str, offset: int, length: int) -> None:
        """A read of ``[offset, offset + length)`` of the part ``key`` (arguments checked)."""
        self._context = context
        self._key = key
        self._offset = offset
        self._length = length
        self._reader: _ChunkReader | None = None

    async def __aenter__(self) -> _ChunkReader:
        if self._reader is not None:
            raise RuntimeError("a part reader cannot be entered twice")
        key, offset, length = self._key, self._offset, self._length

        def open_checked() -> tuple[int, PartHeader, tuple[int, ...]]:
            fd, header, size = self._context.tree.open_part(key)
            try:
                if size < header.file_size:
                    raise IntegrityError(f"part {key} is truncated")
                if offset + length > header.length:
                    raise IntegrityError(f"part {key} is shorter than {offset + length} bytes")
                crcs = read_trailer(fd, header, key)
            except BaseException:
                os.close(fd)
                raise
            return fd, header, crcs

        try:
            fd, header, crcs = await self._context.io.run_small(open_checked)
        except OSError as exc:
            raise storage_error(exc, "opening a part") from None
        self._reader = _ChunkReader(
            self._context.io,
            key,
            fd,
            header,
            crcs,
            offset,
            offset + length,
            self._context.read_chunk,
        )
        return self._reader

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Close synchronously: an await here could be cancelled before it ran, leaking the fd.
        if self._reader is not None:
            self._reader.close()


class _ChunkReader:
    """Chunks of a part's payload range ``[start, end)``, each at most ``chunk`` bytes (all but
    the last exactly ``chunk``). A class, not an async generator, so a reader abandoned part-way
    needs no finaliser task.

    Reads whole blocks (one thread hop per refill, covering at least the next chunk) and checks
    every block against its CRC in that thread before any of its bytes are kept; verified bytes
    not yet handed out wait in ``_buf`` (at most one chunk plus two blocks). After handing out
    a chunk it starts reading the next one (:class:`_ReadAhead`). A version-1 part has no
    blocks: reads are then exactly the requested bytes, checked only by the sha256 of a
    whole-part read, computed in the same thread hops, before its last bytes are handed out.
    """

    def __init__(
        self,
        io: BlockingIO,
        key: str,
        fd: int,
        header: PartHeader,
        crcs: tuple[int, ...],
        start: int,
        end: int,
        chunk: int,
    ) -> None:
        self._io = io
        self._key = key
        self._fd: int | None = fd
        self._block = header.block_size or 1
        self._crcs = crcs
        self._length = header.length
        self._pos = start
        self._end = end
        self._chunk = chunk
        self._buf = b""  # verified payload bytes from _buf_start; ends on a block boundary
        self._buf_start = start
        # Every block is checked against its CRC before any byte of it is handed out. A
        # version-1 part has no blocks: a whole-part read then checks the sha256 as it goes.
        whole = start == 0 and end == header.length and header.length > 0
        self._verify = bool(header.block_size)
        self._sha256 = hashlib.sha256() if whole and not self._verify else None
        self._checksum = header.checksum
        self._ahead: _ReadAhead | None = None  # the next blocks, being read in a thread

    def __aiter__(self) -> _ChunkReader:
        return self

    async def __anext__(self) -> bytes:
        if self._fd is None:
            raise trio.ClosedResourceError("part reader is closed")
        if self._pos >= self._end:
            raise StopAsyncIteration
        want = min(self._chunk, self._end - self._pos)
        if self._pos + want > self._buf_start + len(self._buf):
            ahead = self._ahead
            if ahead is None:
                first, last = self._span(self._pos + want)
                data = await self._io.run_small(self._reading(first, last), last - first)
            else:
                # Stays in _ahead while it runs: cancelled here, the next call collects it,
                # and a close meanwhile hands the fd to its thread.
                await ahead.wait()
                self._ahead = None
                first, data = ahead.first, ahead.unwrap()
            self._keep(first, data)
        at = self._pos - self._buf_start
        if at == 0 and want == len(self._buf):
            # Handed out whole: drop our reference, so the chunk is freed once its consumer
            # is done with it rather than when the next one arrives.
            data, self._buf, self._buf_start = self._buf, b"", self._pos + want
        else:
            data = self._buf[at : at + want]
        self._pos += want
        self._read_ahead()
        return data

    def _span(self, need: int) -> tuple[int, int]:
        """The whole blocks to read next so that ``_buf`` covers ``[_pos, need)``."""
        block = self._block
        buf_end = self._buf_start + len(self._buf)
        # The buffer ends on a block boundary, so reading on from its end reads whole blocks.
        first = buf_end if buf_end > self._pos else self._pos // block * block
        return first, min(-(-need // block) * block, self._length)

    def _keep(self, first: int, data: bytes) -> None:
        """Append blocks read from ``first`` to what is left of the buffer."""
        buf_end = self._buf_start + len(self._buf)
        if buf_end > self._pos:
            self._buf = self._buf[self._pos - self._buf_start :] + data
            self._buf_start = self._pos
        else:
            self._buf, self._buf_start = data, first

    def _reading(self, first: int, last: int) -> Callable[[], bytes]:
        """The blocking read and check of blocks ``[first, last)`` (for a worker thread)."""
        fd, key, block, crcs = self._fd, self._key, self._block, self._crcs
        verify, sha256, length, checksum = self._verify, self._sha256, self._length, self._checksum
        assert fd is not None

        def read_blocks() -> bytes:
            try:
                data = pread_exact(fd, last - first, HEADER_SIZE + first)
            except OSError as exc:
                raise storage_error(exc, "reading a part") from None
            if len(data) < last - first:
                raise IntegrityError(f"part {key} ended early")
            if verify and not check_blocks(data, first // block, block, crcs):
                raise IntegrityError(f"part {key} does not match its block checksums")
            if sha256 is not None:
                sha256.update(data)
                if last == length and sha256.hexdigest() != checksum:
                    raise IntegrityError(f"part {key} does not match its checksum")
            return data

        return read_blocks

    def _read_ahead(self) -> None:
        """Start reading the next chunk in a worker thread while this one is consumed.

        Only for reads a thread would do anyway (larger than ``inline_io``), one at a time,
        and only while at least half of trio's default thread limiter's tokens are free
        (opens, commits and sync rounds use the same limiter): otherwise, or if no thread
        can be started, the next call reads as it would have. The read stays in order, so a
        whole-part sha256 sees every byte once, in order.
        """
        if self._ahead is not None or self._fd is None or self._pos >= self._end:
            return
        need = self._pos + min(self._chunk, self._end - self._pos)
        if need <= self._buf_start + len(self._buf):
            return
        first, last = self._span(need)
        if last - first <= self._io.inline_io:
            return
        self._ahead = _ReadAhead.start(self._reading(first, last), first, self._fd)

    def close(self) -> None:
        """Close the file; idempotent. A read-ahead still running closes it when it ends."""
        fd, self._fd = self._fd, None
        self._buf = b""
        ahead, self._ahead = self._ahead, None
        if fd is not None and (ahead is None or not ahead.close_fd_when_done()):
            close_quietly(fd)


class _ReadAhead:
    """One blocking read running in a worker thread: :meth:`wait` for it, then :meth:`unwrap`.

    Unlike ``trio.to_thread.run_sync`` nobody waits for it while it runs, so it may outlive
    the reader that started it: the reader then hands its file descriptor over
    (:meth:`close_fd_when_done`) and the thread closes it after its read, so that the number
    is never closed, and perhaps reused, under a running ``pread``. Holds one token of trio's
    default thread limiter while it runs, like any other thread hop of the store.
    """

    def __init__(self, first: int, limiter: trio.CapacityLimiter) -> None:
        self.first = first
        self._limiter = limiter
        self._done = trio.Event()
        self._outcome: outcome.Outcome[bytes] | None = None
        self._lock = threading.Lock()
        self._thread_done = False
        self._close_fd = False

    @classmethod
    def start(cls, read: Callable[[], bytes], first: int, fd: int) -> _ReadAhead | None:
        limiter = trio.to_thread.current_default_thread_limiter()
        if limiter.available_tokens * 2 < limiter.total_tokens:
            return None
        ahead = cls(first, limiter)
        try:
            limiter.acquire_on_behalf_of_nowait(ahead)
        except trio.WouldBlock:
            return None
        token = trio.lowlevel.current_trio_token()

        def deliver(result: outcome.Outcome[bytes]) -> None:  # in the worker thread
            with ahead._lock:
                ahead._thread_done = True
                close_fd = ahead._close_fd
            if close_fd:
                close_quietly(fd)
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(ahead._report, result)

        try:
            trio.lowlevel.start_thread_soon(read, deliver, name="karma8 read-ahead")
        except RuntimeError:  # no thread could be started: read when asked, as without
            limiter.release_on_behalf_of(ahead)
            return None
        return ahead

    def _report(self, result: outcome.Outcome[bytes]) -> None:
        self._limiter.release_on_behalf_of(self)
        self._outcome = result
        self._done.set()

    async def wait(self) -> None:
        """Wait until the read has ended."""
        await self._done.wait()

    def unwrap(self) -> bytes:
        """The blocks read, or the read's exception; only after :meth:`wait`."""
        assert self._outcome is not None
        return self._outcome.unwrap()

    def close_fd_when_done(self) -> bool:
        """Have the thread close the file after its read; False if it is done already."""
        with self._lock:
            if self._thread_done:
                return False
            self._close_fd = True
            return True
