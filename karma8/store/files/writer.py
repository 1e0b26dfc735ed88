"""The part file: its on-disk format and the per-file writer.

See :mod:`karma8.store.files.store` for the theory of operation (layout, commit protocol,
format table, costs). This module holds the mechanics of one file: header and trailer
encoding, block CRC checks and :class:`FilePartWriter` (a write in progress);
:mod:`karma8.store.files.reader` holds the reader.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import struct
import zlib
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import attrs
import trio

from karma8.core.errors import (
    DiskFull,
    IntegrityError,
    InvalidRequest,
    StorageFailure,
    UploadConflict,
)
from karma8.ports import StoredPart
from karma8.store.crc32 import combined_crc
from karma8.store.groupsync import start_writeback

if TYPE_CHECKING:
    from karma8.store.files.store import FilePartStore

T = TypeVar("T")

MAGIC = b"K8PART"
FORMAT_VERSION = 2
_V1 = 1
_HEADER_BODY = struct.Struct("!6sH64sQ")
_HEADER_CRC = struct.Struct("!I")
_HEADER_V2 = struct.Struct("!III")  # block size, trailer CRC, reserved
HEADER_SIZE = 96
assert _HEADER_BODY.size + _HEADER_CRC.size + _HEADER_V2.size == HEADER_SIZE

BLOCK = 64 * 1024
"""Bytes of payload per block checksum (written into every version-2 header)."""
_BLOCK_CRC_SIZE = 4

DEFAULT_WRITE_BUFFER = 1 << 20
# Flushes at least this large start their write-back at once (see groupsync.start_writeback).
WRITEBACK_BYTES = 1 << 20

# Defence in depth: the storage actor validates keys; this only guarantees a key is one plain
# file name (no separators, no leading dot, no "~" used by temporary names).
SAFE_KEY = re.compile(r"[0-9A-Za-z_-][0-9A-Za-z_.-]{0,127}")
_CHECKSUM = re.compile(r"[0-9a-f]{64}")
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


@attrs.frozen
class PartHeader:
    """The decoded header of a part file.

    ``block_size`` is 0 for a version-1 part, which has no block checksums and no trailer.
    """

    checksum: str
    length: int
    block_size: int = BLOCK
    trailer_crc: int = 0

    @property
    def version(self) -> int:
        return FORMAT_VERSION if self.block_size else _V1

    @property
    def blocks(self) -> int:
        """How many block checksums the trailer holds."""
        return -(-self.length // self.block_size) if self.block_size else 0

    @property
    def trailer_size(self) -> int:
        return _BLOCK_CRC_SIZE * self.blocks

    @property
    def file_size(self) -> int:
        """The size of a complete part file with this header."""
        return HEADER_SIZE + self.length + self.trailer_size

    def encode(self) -> bytes:
        """The 96 header bytes for this part (version 2 only: nothing writes version 1)."""
        if not self.block_size:
            raise ValueError("only version-2 headers are written")
        body = _HEADER_BODY.pack(MAGIC, FORMAT_VERSION, self.checksum.encode("ascii"), self.length)
        rest = _HEADER_V2.pack(self.block_size, self.trailer_crc, 0)
        return body + _HEADER_CRC.pack(zlib.crc32(rest, zlib.crc32(body))) + rest

    @classmethod
    def decode(cls, data: bytes, key: str) -> PartHeader:
        """Parse a header (version 2, or version 1 without block checksums).

        Args:
            data: The first bytes of a part file (at least :data:`HEADER_SIZE` expected).
            key: The part's key, for error messages.

        Raises:
            IntegrityError: The header is short, has a bad magic, version, CRC or block size.
        """
        if len(data) < HEADER_SIZE:
            raise IntegrityError(f"part {key} has a truncated header")
        body = data[: _HEADER_BODY.size]
        rest = data[_HEADER_BODY.size + _HEADER_CRC.size : HEADER_SIZE]
        magic, version, checksum, length = _HEADER_BODY.unpack(body)
        (crc,) = _HEADER_CRC.unpack_from(data, _HEADER_BODY.size)
        # Version 1 covers bytes 0..79; version 2 (and any later one) the whole header.
        expected = zlib.crc32(body)
        if version != _V1:
            expected = zlib.crc32(rest, expected)
        if magic != MAGIC or crc != expected:
            raise IntegrityError(f"part {key} has a damaged header")
        if version not in (_V1, FORMAT_VERSION):
            raise IntegrityError(f"part {key} has unknown format version {version}")
        text = checksum.decode("ascii", errors="replace")
        if not _CHECKSUM.fullmatch(text):
            raise IntegrityError(f"part {key} has a damaged header")
        if version == _V1:
            return cls(checksum=text, length=length, block_size=0)
        block_size, trailer_crc, _ = _HEADER_V2.unpack(rest)
        if block_size <= 0:
            raise IntegrityError(f"part {key} has a damaged header")
        return cls(checksum=text, length=length, block_size=block_size, trailer_crc=trailer_crc)


def storage_error(exc: OSError, doing: str) -> Exception:
    """Map an OSError to the karma8 error a caller may see (never naming paths)."""
    if exc.errno in _FULL_ERRNOS:
        return DiskFull("no space left on the node")
    reason = exc.strerror or type(exc).__name__
    return StorageFailure(f"disk error while {doing}: {reason}")


def check_key(key: str) -> str:
    if not SAFE_KEY.fullmatch(key):
        raise InvalidRequest(f"invalid part key {key!r}")
    return key


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | _O_DIRECTORY | O_CLOEXEC)
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


def _block_crcs_trailer(crcs: list[int]) -> bytes:
    return struct.pack(f"!{len(crcs)}I", *crcs)


def read_trailer(fd: int, header: PartHeader, key: str) -> tuple[int, ...]:
    """Read and check a part's block checksums (in a thread); () for a version-1 part.

    Raises:
        IntegrityError: The trailer is cut short or does not match its CRC.
    """
    if not header.blocks:
        return ()
    size = header.trailer_size
    data = pread_exact(fd, size, HEADER_SIZE + header.length)
    if len(data) < size:
        raise IntegrityError(f"part {key} is truncated")
    if zlib.crc32(data) != header.trailer_crc:
        raise IntegrityError(f"part {key} has a damaged block checksum trailer")
    return struct.unpack(f"!{header.blocks}I", data)


def check_blocks(data: bytes, first_block: int, block: int, crcs: tuple[int, ...]) -> bool:
    """Whether whole blocks ``first_block, ...`` read as ``data`` match their checksums.

    One CRC pass over all of ``data`` (one GIL release), compared with the blocks' CRCs
    combined (:mod:`karma8.store.crc32`).
    """
    if not data:
        return True
    count = -(-len(data) // block)
    window = crcs[first_block : first_block + count]
    if len(window) != count:  # more bytes than the part has blocks
        return False
    last = len(data) - (count - 1) * block
    return zlib.crc32(data) == combined_crc(window, block, last)


def payload_bytes(file_size: int) -> int:
    """Payload length of a version-2 part file of this size written with :data:`BLOCK`.

    The file holds ``L + 4 * ceil(L / BLOCK)`` bytes after the header, and that determines L.
    """
    after_header = max(0, file_size - HEADER_SIZE)
    return after_header - _BLOCK_CRC_SIZE * -(-after_header // (BLOCK + _BLOCK_CRC_SIZE))


class FilePartWriter:
    """:class:`karma8.ports.PartWriter` for one temporary file. Use from one task at a time."""

    def __init__(self, store: FilePartStore, key: str, tmp: Path) -> None:
        self._store = store
        self._key = key
        self._tmp = tmp
        # The temporary file is created by the first flush, or by the commit: a part smaller
        # than the write buffer then costs no thread trip of its own (its commit is a step
        # of a sync round's trip, or one trip without group sync).
        self._fd: int | None = None
        self._created = False
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._accepted = 0  # bytes counted in the store's in-flight total
        self._file_pos = HEADER_SIZE
        self._done = False
        self._sealed = False  # commit was called: one attempt only (then discard)
        # Checksums of what is written so far: the part's sha256, the finished blocks' CRCs
        # and the running CRC of the open block.
        self._sha256 = hashlib.sha256()
        self._block_crcs: list[int] = []
        self._block_crc = 0
        self._block_fill = 0

    def _check_open(self) -> None:
        if self._done or self._sealed:
            raise trio.ClosedResourceError("part writer already committed or discarded")

    def _open_sync(self) -> int:
        """The temporary's descriptor, creating the file first if needed (in a thread:
        allocating an inode takes ext4 hundreds of microseconds while sync rounds run)."""
        if self._fd is None:
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_CLOEXEC, 0o644)
            self._created = True
        return self._fd

    async def write(self, data: bytes) -> None:
        """Append bytes, handing them to a thread once ``write_buffer`` bytes are pending.

        Raises:
            DiskFull: The quota (committed + in-flight) would be exceeded, or ENOSPC.
            StorageFailure: Another disk error.
        """
        self._check_open()
        store = self._store
        if store._used + store._in_flight + len(data) > store.capacity_bytes:
            raise DiskFull("no space left on the node")
        if data:
            self._buffer.append(bytes(data))
            self._buffered += len(data)
            self._accepted += len(data)
            store._in_flight += len(data)
        if self._buffered >= store._write_buffer:
            await self._flush()
        else:
            await trio.lowlevel.checkpoint()

    def _add_checksums(self, data: bytes) -> None:
        """Add bytes just written to the part's sha256 and block CRCs (both release the GIL
        for big buffers, so a flush thread runs them next to the event loop)."""
        self._sha256.update(data)
        view = memoryview(data)
        crc, fill = self._block_crc, self._block_fill
        while view:
            take = min(BLOCK - fill, len(view))
            crc = zlib.crc32(view[:take], crc)
            fill += take
            view = view[take:]
            if fill == BLOCK:
                self._block_crcs.append(crc)
                crc, fill = 0, 0
        self._block_crc, self._block_fill = crc, fill

    def _flush_sync(self, chunks: list[bytes], pos: int) -> None:
        """Write buffered bytes at ``pos`` and add them to the checksums (in a thread, or
        inline for a few bytes to a file that exists).

        The checksums are only updated once the bytes are written, so a failed write can be
        retried from the same state.
        """
        fd = self._open_sync()
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        pwrite_all(fd, data, pos)
        if len(data) >= WRITEBACK_BYTES and self._store._group_sync is not None:
            start_writeback(fd, pos, len(data))
        self._add_checksums(data)

    async def _flush(self) -> None:
        self._check_open()
        if not self._buffer:
            return
        chunks, size, pos = self._buffer, self._buffered, self._file_pos
        store = self._store
        try:
            if self._created:
                await store._run_small(lambda: self._flush_sync(chunks, pos), size)
            else:
                await store._run(lambda: self._flush_sync(chunks, pos))
        except OSError as exc:
            raise storage_error(exc, "writing a part") from None
        self._buffer, self._buffered = [], 0
        self._file_pos += size
        if store._group_sync is not None and size >= WRITEBACK_BYTES:
            store._group_sync.written(size)  # may start an early sync round

    async def commit(self) -> StoredPart:
        """Write the trailer and header, link the part into place and make it durable: with
        the store's group sync (one ``syncfs`` shared by concurrent commits) where available,
        else an fsync of the file and of its directory.

        Either returns the part (size and sha256) durable and visible, or raises with it not
        visible (the caller then calls :meth:`discard`).

        Raises:
            UploadConflict: A part with this key is already committed.
            DiskFull, StorageFailure: The disk failed.
        """
        self._check_open()
        store = self._store
        group = store._group_sync
        if self._created and self._buffer and group is not None:
            # What is left of a large part is written here, not in the sync round's step:
            # steps run one after another in the round's thread, and its sync waits for them.
            await self._flush()
        # A commit is tried once: a failed one may have consumed the buffer into checksums
        # and the temporary into a link, so after it the writer only discards.
        self._sealed = True
        length = self._file_pos - HEADER_SIZE + self._buffered
        chunks, pos = self._buffer, self._file_pos
        first, leaf = store._leaf(self._key)
        final = leaf / self._key

        def write_out() -> None:
            """Write the rest, the trailer and the header, and close; syncs the file only
            without group sync. A part that never filled the write buffer is written here
            whole, header to trailer, with one system call."""
            fd = self._open_sync()
            whole = pos == HEADER_SIZE  # nothing flushed yet: written below in one call
            data = b"".join(chunks) if whole else b""
            if whole:
                self._add_checksums(data)
            elif chunks:
                self._flush_sync(chunks, pos)
            crcs = self._block_crcs + ([self._block_crc] if self._block_fill else [])
            trailer = _block_crcs_trailer(crcs)
            header = PartHeader(
                checksum=self._sha256.hexdigest(),
                length=length,
                block_size=BLOCK,
                trailer_crc=zlib.crc32(trailer),
            )
            assert header.blocks == len(crcs)
            if whole:
                pwritev_all(fd, [header.encode(), data, trailer], 0)
            else:
                pwrite_all(fd, trailer, HEADER_SIZE + length)
                pwrite_all(fd, header.encode(), 0)
            if group is None:
                os.fsync(fd)
            self._fd = None  # before close: a failed close still frees the number for reuse
            os.close(fd)

        def link_in() -> None:
            """Make the part visible under its final name (synced only without group sync)."""
            new_dirs: list[Path] = []
            for directory in (first, leaf):
                if directory not in store._known_dirs and not directory.is_dir():
                    # Also sync the parent when another thread won the mkdir race: it may not
                    # have synced yet, and our part must not depend on its progress.
                    new_dirs.append(directory)
                    with suppress(FileExistsError):
                        directory.mkdir()
            if group is None:
                for directory in new_dirs:
                    fsync_dir(directory.parent)
            try:
                os.link(self._tmp, final)
            except FileExistsError:
                raise UploadConflict(f"part {self._key} already exists") from None
            if group is None:
                try:
                    fsync_dir(leaf)
                except BaseException:
                    final.unlink(missing_ok=True)
                    raise
            # Durable or about to be; a temporary name left behind is removed on start.
            with suppress(OSError):
                self._tmp.unlink(missing_ok=True)
            store._known_dirs.update((first, leaf))

        linked = False

        def finish() -> None:
            nonlocal linked
            write_out()
            link_in()
            linked = True

        try:
            # In a worker thread: creating the file (for a small part), linking it and making
            # a directory all modify directories, which ext4 makes wait behind running sync
            # rounds (measured: open(O_CREAT) 330 us then, 30 us alone). With group sync, in
            # the thread of the round that then makes it durable, with the other writers'.
            if group is None:
                await store._run(finish)
            else:
                try:
                    await group.sync(before=finish)
                except BaseException:
                    # Not durable (a failed round, or cancelled while waiting): not visible.
                    if linked:
                        with suppress(OSError):
                            final.unlink(missing_ok=True)
                    raise
        except OSError as exc:
            raise storage_error(exc, "committing a part") from None
        # No checkpoint from here on: a commit that returns has taken effect.
        self._release()
        store._used += length
        return StoredPart(key=self._key, size=length, checksum=self._sha256.hexdigest())

    async def discard(self) -> None:
        """Close and delete the temporary. Idempotent, safe after any failure, no-op after
        a successful commit. Disk errors are swallowed: the next start cleans ``tmp/``."""
        if self._done:
            await trio.lowlevel.checkpoint()
            return
        self._release()
        fd, self._fd = self._fd, None
        tmp = self._tmp
        if not self._created:  # never reached the disk
            await trio.lowlevel.checkpoint()
            return

        def remove() -> None:
            if fd is not None:
                close_quietly(fd)
            with suppress(OSError):
                tmp.unlink(missing_ok=True)

        await self._store._run(remove)

    def _release(self) -> None:
        if not self._done:
            self._done = True
            self._store._in_flight -= self._accepted
            self._accepted = 0
            self._buffer, self._buffered = [], 0
