"""Reading a part file: :class:`PartRead` (what :meth:`FilePartStore.open` returns) and the
chunk reader that verifies what it hands out (see :mod:`karma8.net.disk`, "Every read is
verified")."""

from __future__ import annotations

import hashlib
import os
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING

import trio

from karma8.core.errors import IntegrityError
from karma8.net.partfile import (
    HEADER_SIZE,
    PartHeader,
    check_blocks,
    close_quietly,
    pread_exact,
    read_trailer,
    storage_error,
)

if TYPE_CHECKING:
    from karma8.net.disk import FilePartStore


class PartRead(AbstractAsyncContextManager["_ChunkReader"]):
    """The context manager :meth:`FilePartStore.open` returns: opens on entry, closes on exit."""

    def __init__(self, store: FilePartStore, key: str, offset: int, length: int) -> None:
        self._store = store
        self._key = key
        self._offset = offset
        self._length = length
        self._reader: _ChunkReader | None = None

    async def __aenter__(self) -> _ChunkReader:
        if self._reader is not None:
            raise RuntimeError("a part reader cannot be entered twice")
        key, offset, length = self._key, self._offset, self._length

        def open_checked() -> tuple[int, PartHeader, tuple[int, ...]]:
            fd, header, size = self._store._open_part(key)
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
            fd, header, crcs = await self._store._run_small(open_checked)
        except OSError as exc:
            raise storage_error(exc, "opening a part") from None
        self._reader = _ChunkReader(
            self._store, key, fd, header, crcs, offset, offset + length, self._store._read_chunk
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
    not yet handed out wait in ``_buf`` (at most one chunk plus two blocks). A read of the whole
    part is checked by its sha256 instead, computed in the same thread hops, before its last
    bytes are handed out. A version-1 part has no blocks: reads are then exactly the requested
    bytes, checked only by the sha256 of a whole-part read.
    """

    def __init__(
        self,
        store: FilePartStore,
        key: str,
        fd: int,
        header: PartHeader,
        crcs: tuple[int, ...],
        start: int,
        end: int,
        chunk: int,
    ) -> None:
        self._store = store
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
        # A whole-part read is read in order from 0, so it checks the sha256 as it goes, and
        # that check alone: it covers every byte before the last chunk is handed out, which
        # is what a reader of the whole part can use (block CRCs on top cost a third more).
        whole = start == 0 and end == header.length and header.length > 0
        self._sha256 = hashlib.sha256() if whole else None
        self._checksum = header.checksum
        self._verify = bool(header.block_size) and not whole

    def __aiter__(self) -> _ChunkReader:
        return self

    async def __anext__(self) -> bytes:
        if self._fd is None:
            raise trio.ClosedResourceError("part reader is closed")
        if self._pos >= self._end:
            raise StopAsyncIteration
        want = min(self._chunk, self._end - self._pos)
        if self._pos + want > self._buf_start + len(self._buf):
            await self._fill(self._fd, self._pos + want)
        at = self._pos - self._buf_start
        data = self._buf if at == 0 and want == len(self._buf) else self._buf[at : at + want]
        self._pos += want
        return data

    async def _fill(self, fd: int, need: int) -> None:
        """Read and verify whole blocks so that ``_buf`` covers ``[_pos, need)``."""
        block, key, crcs = self._block, self._key, self._crcs
        buf_end = self._buf_start + len(self._buf)
        keep = self._buf[self._pos - self._buf_start :] if buf_end > self._pos else b""
        # The buffer ends on a block boundary, so reading on from its end reads whole blocks.
        first = buf_end if keep else self._pos // block * block
        last = min(-(-need // block) * block, self._length)
        verify, sha256, length = self._verify, self._sha256, self._length

        def read_blocks() -> bytes:
            data = pread_exact(fd, last - first, HEADER_SIZE + first)
            if len(data) < last - first:
                raise IntegrityError(f"part {key} ended early")
            if verify and not check_blocks(data, first // block, block, crcs):
                raise IntegrityError(f"part {key} does not match its block checksums")
            if sha256 is not None:
                sha256.update(data)
                if last == length and sha256.hexdigest() != self._checksum:
                    raise IntegrityError(f"part {key} does not match its checksum")
            return data

        try:
            data = await self._store._run_small(read_blocks, last - first)
        except OSError as exc:
            raise storage_error(exc, "reading a part") from None
        if keep:
            self._buf, self._buf_start = keep + data, self._pos
        else:
            self._buf, self._buf_start = data, first

    def close(self) -> None:
        """Close the file; idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            close_quietly(fd)
        self._buf = b""
