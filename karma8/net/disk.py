"""A storage node's disk as a directory of part files: :class:`karma8.ports.PartStore` for net mode.

Theory of operation
===================

Directory layout::

    root/
      tmp/<key>~<random>.tmp     writes in progress (deleted on start: they never committed)
      parts/<aa>/<bb>/<key>      committed parts; aa, bb = first 4 hex digits of blake2b(key)

A write goes to its own file in ``tmp/``. :meth:`FilePartWriter.commit` writes the header,
fsyncs the file, creates the leaf directory if needed (fsyncing its parent), hard-links the file
into ``parts/aa/bb/`` and fsyncs the leaf directory, then unlinks the temporary name. Link plus
unlink is a rename that refuses to replace: parts are immutable, so a second commit of the same
key fails with :class:`UploadConflict` instead of silently swapping bytes under a reader (and
the used-bytes counter cannot double-count). Because the file was fsynced *before* it got its
final name, any name that survives a crash points at complete, durable bytes; a crash at any
earlier point leaves only a temporary, which the next start deletes. Deleting a part fsyncs its
leaf directory too, so a deletion the node reports to discovery cannot come back after a crash.

Part file format (all integers big-endian), a fixed 96-byte header then the part's bytes::

    offset  size  field
    0       6     magic b"K8PART"
    6       2     format version (1)
    8       64    sha256 of the part's bytes, lowercase hex, ASCII
    72      8     length of the part's bytes
    80      4     CRC-32 of bytes 0..79 (tells a damaged header from damaged data)
    84      12    reserved, zero
    96      ...   the part's bytes

Why a header and not a sidecar file or an extended attribute: the checksum and length then
travel with the bytes in one inode and one atomic link, so they can never be orphaned or
mismatched, and a backup or ``cp`` keeps them (xattrs are easily lost and not on every file
system). :meth:`FilePartStore.stat` reads only the first 96 bytes; reads ``pread`` from
``96 + offset``. A temporary starts with 96 zero bytes and gets its header only at commit, so a
file without the magic was never committed. The recorded length lets :meth:`FilePartStore.open`
detect truncation up front (file shorter than header + length: :class:`IntegrityError`), and
the checksum lets :meth:`FilePartStore.verify` (a future scrubber) detect bit rot. The store
does not recompute the checksum while writing: the storage actor already hashes the stream it
passes to :meth:`FilePartWriter.write` and hands the digest to commit.

Fan-out and how much a node can hold
------------------------------------
Keys hash uniformly over 256 x 256 = 65,536 leaf directories, so a node holding N parts has
about N / 65,536 entries per leaf: 1 million parts is ~15 per leaf, 65 million ~1,000, and a
leaf reaches ~10,000 entries (where listing it starts to cost) only at ~650 million parts.
Directory size is therefore not what limits a node; inodes are. Every part is one inode and
at least one file-system block (4 KiB on ext4, so tiny parts cost 4 KiB each), and ext4 created
with defaults has one inode per 16 KiB of disk: a 1 TiB disk has ~67 million inodes, i.e. about
1,000 parts per leaf at the limit (check ``df -i``). Each leaf directory also costs an inode
and a 4 KiB block once it exists, ~256 MiB for all 65,536 leaves: noise on a multi-terabyte
disk, but a small test node with a few thousand parts pays one directory block per part.
ext4 without ``large_dir`` caps a directory at ~10 million entries, which at this fan-out would
need ~650 billion parts.

Accounting and threads
----------------------
``used_bytes`` counts the payload bytes of committed parts (not headers or block rounding). It
is computed once on start by stat-ing every part file (one ``stat`` per part, no reads: seconds
for millions of parts on an SSD) and then kept as a counter. :attr:`capacity_bytes` is a quota
on payload bytes: a write fails with :class:`DiskFull` when committed plus in-flight bytes would
exceed it, and also when the file system itself reports ``ENOSPC``/``EDQUOT``. Leave headroom
below the real disk size for headers, block rounding and directories.

All blocking file-system calls run in ``trio.to_thread.run_sync`` (never abandoned on
cancellation, so no call is ever left running behind a task). Writes are buffered up to
``write_buffer`` bytes (1 MiB) per thread hop; reads hop once per ``read_chunk`` bytes. Any other
``OSError`` becomes :class:`StorageFailure` with a message that names no paths.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import struct
import zlib
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, suppress
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import attrs
import trio

from karma8.core.errors import (
    DiskFull,
    IntegrityError,
    InvalidRequest,
    NotFound,
    StorageFailure,
    UploadConflict,
)
from karma8.ports import StoredPart

T = TypeVar("T")

MAGIC = b"K8PART"
FORMAT_VERSION = 1
_HEADER_BODY = struct.Struct("!6sH64sQ")
_HEADER_CRC = struct.Struct("!I")
HEADER_SIZE = 96
_RESERVED = HEADER_SIZE - _HEADER_BODY.size - _HEADER_CRC.size
assert _RESERVED == 12

DEFAULT_WRITE_BUFFER = 1 << 20

# Defence in depth: the storage actor validates keys; this only guarantees a key is one plain
# file name (no separators, no leading dot, no "~" used by temporary names).
_SAFE_KEY = re.compile(r"[0-9A-Za-z_-][0-9A-Za-z_.-]{0,127}")
_CHECKSUM = re.compile(r"[0-9a-f]{64}")
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


@attrs.frozen
class PartHeader:
    """The decoded header of a part file."""

    checksum: str
    length: int

    def encode(self) -> bytes:
        """The 96 header bytes for this part."""
        body = _HEADER_BODY.pack(MAGIC, FORMAT_VERSION, self.checksum.encode("ascii"), self.length)
        return body + _HEADER_CRC.pack(zlib.crc32(body)) + bytes(_RESERVED)

    @classmethod
    def decode(cls, data: bytes, key: str) -> PartHeader:
        """Parse a header.

        Args:
            data: The first bytes of a part file (at least :data:`HEADER_SIZE` expected).
            key: The part's key, for error messages.

        Raises:
            IntegrityError: The header is short, has a bad magic, version or CRC.
        """
        if len(data) < HEADER_SIZE:
            raise IntegrityError(f"part {key} has a truncated header")
        body = data[: _HEADER_BODY.size]
        magic, version, checksum, length = _HEADER_BODY.unpack(body)
        (crc,) = _HEADER_CRC.unpack_from(data, _HEADER_BODY.size)
        if magic != MAGIC or crc != zlib.crc32(body):
            raise IntegrityError(f"part {key} has a damaged header")
        if version != FORMAT_VERSION:
            raise IntegrityError(f"part {key} has unknown format version {version}")
        text = checksum.decode("ascii", errors="replace")
        if not _CHECKSUM.fullmatch(text):
            raise IntegrityError(f"part {key} has a damaged header")
        return cls(checksum=text, length=length)


def _storage_error(exc: OSError, doing: str) -> Exception:
    """Map an OSError to the karma8 error a caller may see (never naming paths)."""
    if exc.errno in _FULL_ERRNOS:
        return DiskFull("no space left on the node")
    reason = exc.strerror or type(exc).__name__
    return StorageFailure(f"disk error while {doing}: {reason}")


def _check_key(key: str) -> str:
    if not _SAFE_KEY.fullmatch(key):
        raise InvalidRequest(f"invalid part key {key!r}")
    return key


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pread_exact(fd: int, size: int, pos: int) -> bytes:
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


def _pwrite_all(fd: int, data: bytes, pos: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, pos)
        view = view[written:]
        pos += written


def _close_quietly(fd: int) -> None:
    with suppress(OSError):
        os.close(fd)


class FilePartStore:
    """:class:`karma8.ports.PartStore` on a local directory (see the module docstring).

    Attributes:
        root: The store's directory.
        capacity_bytes: The quota on committed plus in-flight payload bytes.
    """

    def __init__(
        self,
        root: Path,
        *,
        capacity_bytes: int,
        read_chunk: int = 1 << 20,
        write_buffer: int = DEFAULT_WRITE_BUFFER,
    ) -> None:
        """Open (creating if needed) a store and recover from a previous run.

        This blocks: it deletes leftover temporaries and stat-s every part to compute
        ``used_bytes``. For a very large store construct it in a worker thread.

        Args:
            root: The data directory; ``parts/`` and ``tmp/`` are created inside it.
            capacity_bytes: Quota on payload bytes (see the module docstring).
            read_chunk: Largest chunk a reader yields.
            write_buffer: Bytes a writer buffers before handing them to a thread.
        """
        if read_chunk <= 0 or write_buffer <= 0:
            raise ValueError("read_chunk and write_buffer must be positive")
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        self._read_chunk = read_chunk
        self._write_buffer = write_buffer
        self._parts = self.root / "parts"
        self._tmp = self.root / "tmp"
        self._parts.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._in_flight = 0
        self.cleaned_temporaries = self._clean_tmp()
        self._used = self._scan_used()

    # -- start-up ---------------------------------------------------------------------------

    def _clean_tmp(self) -> int:
        removed = 0
        with os.scandir(self._tmp) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
                    removed += 1
        return removed

    def _leaf_dirs(self) -> list[str]:
        leaves: list[str] = []
        with os.scandir(self._parts) as top:
            for first in top:
                if not first.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(first.path) as second:
                    leaves.extend(e.path for e in second if e.is_dir(follow_symlinks=False))
        return leaves

    def _scan_used(self) -> int:
        used = 0
        for leaf in self._leaf_dirs():
            with os.scandir(leaf) as entries:
                for entry in entries:
                    if entry.is_file(follow_symlinks=False) and _SAFE_KEY.fullmatch(entry.name):
                        used += max(0, entry.stat(follow_symlinks=False).st_size - HEADER_SIZE)
        return used

    # -- paths ------------------------------------------------------------------------------

    def _leaf(self, key: str) -> tuple[Path, Path]:
        """The two fan-out directories of a key: ``parts/aa`` and ``parts/aa/bb``."""
        digest = hashlib.blake2b(key.encode("ascii"), digest_size=2).hexdigest()
        first = self._parts / digest[:2]
        return first, first / digest[2:]

    def part_path(self, key: str) -> Path:
        """Where a committed part with this key lives (whether or not it exists)."""
        return self._leaf(_check_key(key))[1] / key

    async def _run(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn)

    # -- PartStore --------------------------------------------------------------------------

    async def create(self, key: str) -> FilePartWriter:
        """Start writing a part; it stays invisible until :meth:`FilePartWriter.commit`.

        Raises:
            InvalidRequest: The key is not a plain file name.
            DiskFull, StorageFailure: The temporary file could not be created.
        """
        _check_key(key)
        tmp = self._tmp / f"{key}~{secrets.token_hex(8)}.tmp"

        def start() -> int:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o644)
            try:
                _pwrite_all(fd, bytes(HEADER_SIZE), 0)
            except BaseException:
                _close_quietly(fd)
                tmp.unlink(missing_ok=True)
                raise
            return fd

        try:
            fd = await self._run(start)
        except OSError as exc:
            raise _storage_error(exc, "creating a part") from None
        return FilePartWriter(self, key, tmp, fd)

    def open(self, key: str, *, offset: int, length: int) -> _PartRead:
        """Read ``length`` bytes of a part from ``offset``, as chunks of at most ``read_chunk``.

        Use as ``async with store.open(key, offset=0, length=n) as chunks: async for ...``.
        The file is opened on entry and closed on exit.

        Raises:
            NotFound: No such part (on entry).
            IntegrityError: The header is damaged, the file is shorter than its header says,
                or the range goes past the part's end (on entry); or the file ends early
                while reading (from the iterator).
            InvalidRequest: A bad key, or a negative offset or length.
        """
        _check_key(key)
        if offset < 0 or length < 0:
            raise InvalidRequest("offset and length must not be negative")
        return _PartRead(self, key, offset, length)

    def _open_part(self, key: str) -> tuple[int, PartHeader, int]:
        """Open a part for reading (in a thread): its fd, header and file size.

        Raises NotFound or IntegrityError (the header); closes the fd on failure.
        """
        try:
            fd = os.open(self.part_path(key), os.O_RDONLY | _O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"part {key} is not on this node") from None
        try:
            header = PartHeader.decode(_pread_exact(fd, HEADER_SIZE, 0), key)
            size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        return fd, header, size

    async def stat(self, key: str) -> StoredPart | None:
        """The committed part's size and checksum from its header, or None if absent.

        Reads only the header: a part whose body was truncated is still reported (``open`` and
        ``verify`` detect that).

        Raises:
            IntegrityError: The part's header is damaged.
        """
        _check_key(key)

        def read_header() -> PartHeader | None:
            try:
                fd, header, _ = self._open_part(key)
            except NotFound:
                return None
            os.close(fd)
            return header

        try:
            header = await self._run(read_header)
        except OSError as exc:
            raise _storage_error(exc, "reading a part") from None
        if header is None:
            return None
        return StoredPart(key=key, size=header.length, checksum=header.checksum)

    async def delete(self, key: str) -> bool:
        """Delete a part durably (the leaf directory is fsynced); False if it was absent."""
        _check_key(key)
        path = self.part_path(key)

        def remove() -> int | None:
            try:
                size = os.stat(path).st_size
                os.unlink(path)
            except FileNotFoundError:
                return None
            _fsync_dir(path.parent)
            return size

        try:
            size = await self._run(remove)
        except OSError as exc:
            raise _storage_error(exc, "deleting a part") from None
        if size is None:
            return False
        self._used = max(0, self._used - max(0, size - HEADER_SIZE))
        return True

    async def quarantine(self, key: str) -> bool:
        """Move a part out of service into ``root/quarantine`` (kept for inspection).

        Returns False if the part was absent.
        """
        _check_key(key)
        path = self.part_path(key)
        target_dir = self.root / "quarantine"

        def move() -> int | None:
            target_dir.mkdir(exist_ok=True)
            try:
                size = os.stat(path).st_size
                os.replace(path, target_dir / key)
            except FileNotFoundError:
                return None
            _fsync_dir(path.parent)
            _fsync_dir(target_dir)
            return size

        try:
            size = await self._run(move)
        except OSError as exc:
            raise _storage_error(exc, "quarantining a part") from None
        if size is None:
            return False
        self._used = max(0, self._used - max(0, size - HEADER_SIZE))
        return True

    async def keys(self) -> list[str]:
        """The keys of all committed parts, sorted (walks the tree in a thread)."""

        def walk() -> list[str]:
            found: list[str] = []
            for leaf in self._leaf_dirs():
                with os.scandir(leaf) as entries:
                    found.extend(
                        e.name
                        for e in entries
                        if _SAFE_KEY.fullmatch(e.name) and e.is_file(follow_symlinks=False)
                    )
            found.sort()
            return found

        try:
            return await self._run(walk)
        except OSError as exc:
            raise _storage_error(exc, "listing parts") from None

    async def used_bytes(self) -> int:
        """Payload bytes of committed parts (a counter; no disk access)."""
        await trio.lowlevel.checkpoint()
        return self._used

    @property
    def in_flight_bytes(self) -> int:
        """Bytes accepted by writers that have neither committed nor discarded."""
        return self._in_flight

    async def verify(self, key: str) -> bool:
        """Re-read a part and check it against its header.

        Returns:
            True if the header is intact, the file is exactly header + recorded length long
            and the bytes hash to the recorded sha256; False otherwise.

        Raises:
            NotFound: No such part.
            StorageFailure: The disk failed while reading.
        """
        _check_key(key)
        try:
            fd, header, size = await self._run(lambda: self._open_part(key))
        except IntegrityError:
            return False
        except OSError as exc:
            raise _storage_error(exc, "verifying a part") from None
        try:
            if size != HEADER_SIZE + header.length:
                return False
            digest = hashlib.sha256()
            pos = HEADER_SIZE
            end = HEADER_SIZE + header.length
            while pos < end:
                want = min(self._read_chunk, end - pos)

                def hash_chunk(at: int = pos, want: int = want) -> int:
                    data = _pread_exact(fd, want, at)
                    digest.update(data)
                    return len(data)

                got = await self._run(hash_chunk)
                if got < want:
                    return False
                pos += got
            return secrets.compare_digest(digest.hexdigest(), header.checksum)
        except OSError as exc:
            raise _storage_error(exc, "verifying a part") from None
        finally:
            _close_quietly(fd)


class FilePartWriter:
    """:class:`karma8.ports.PartWriter` for one temporary file. Use from one task at a time."""

    def __init__(self, store: FilePartStore, key: str, tmp: Path, fd: int) -> None:
        self._store = store
        self._key = key
        self._tmp = tmp
        self._fd: int | None = fd
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._accepted = 0  # bytes counted in the store's in-flight total
        self._file_pos = HEADER_SIZE
        self._done = False

    def _check_open(self) -> int:
        if self._done or self._fd is None:
            raise trio.ClosedResourceError("part writer already committed or discarded")
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

    def _flush_sync(self, fd: int, chunks: list[bytes], pos: int) -> None:
        _pwrite_all(fd, chunks[0] if len(chunks) == 1 else b"".join(chunks), pos)

    async def _flush(self) -> None:
        fd = self._check_open()
        if not self._buffer:
            return
        chunks, size, pos = self._buffer, self._buffered, self._file_pos
        try:
            await self._store._run(lambda: self._flush_sync(fd, chunks, pos))
        except OSError as exc:
            raise _storage_error(exc, "writing a part") from None
        self._buffer, self._buffered = [], 0
        self._file_pos += size

    async def commit(self, checksum: str) -> None:
        """Write the header, fsync, and link the part into place; then it is visible.

        Either returns with the part durable and visible, or raises with it not visible (the
        caller then calls :meth:`discard`).

        Args:
            checksum: The sha256 of the bytes written, as 64 lowercase hex digits.

        Raises:
            ValueError: The checksum is not 64 lowercase hex digits.
            UploadConflict: A part with this key is already committed.
            DiskFull, StorageFailure: The disk failed.
        """
        fd = self._check_open()
        if not _CHECKSUM.fullmatch(checksum):
            raise ValueError("checksum must be a sha256 as 64 lowercase hex digits")
        store = self._store
        length = self._file_pos - HEADER_SIZE + self._buffered
        header = PartHeader(checksum=checksum, length=length).encode()
        chunks, pos = self._buffer, self._file_pos
        first, leaf = store._leaf(self._key)
        final = leaf / self._key

        def finish() -> None:
            if chunks:
                self._flush_sync(fd, chunks, pos)
            _pwrite_all(fd, header, 0)
            os.fsync(fd)
            self._fd = None  # before close: a failed close still frees the number for reuse
            os.close(fd)
            new_dirs: list[Path] = []
            for directory in (first, leaf):
                if not directory.is_dir():
                    # Also fsync the parent when another thread won the mkdir race: it may not
                    # have fsynced yet, and our part must not depend on its progress.
                    new_dirs.append(directory)
                    with suppress(FileExistsError):
                        directory.mkdir()
            for directory in new_dirs:
                _fsync_dir(directory.parent)
            try:
                os.link(self._tmp, final)
            except FileExistsError:
                raise UploadConflict(f"part {self._key} already exists") from None
            try:
                _fsync_dir(leaf)
            except BaseException:
                final.unlink(missing_ok=True)
                raise
            # The part is committed now; a temporary name left behind is removed on start.
            with suppress(OSError):
                self._tmp.unlink(missing_ok=True)

        try:
            await store._run(finish)
        except OSError as exc:
            raise _storage_error(exc, "committing a part") from None
        # No checkpoint from here on: a commit that returns has taken effect.
        self._release()
        store._used += length

    async def discard(self) -> None:
        """Close and delete the temporary. Idempotent, safe after any failure, no-op after
        a successful commit. Disk errors are swallowed: the next start cleans ``tmp/``."""
        if self._done:
            await trio.lowlevel.checkpoint()
            return
        self._release()
        fd, self._fd = self._fd, None
        tmp = self._tmp

        def remove() -> None:
            if fd is not None:
                _close_quietly(fd)
            with suppress(OSError):
                tmp.unlink(missing_ok=True)

        await self._store._run(remove)

    def _release(self) -> None:
        if not self._done:
            self._done = True
            self._store._in_flight -= self._accepted
            self._accepted = 0
            self._buffer, self._buffered = [], 0


class _PartRead(AbstractAsyncContextManager["_ChunkReader"]):
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

        def open_checked() -> int:
            fd, header, size = self._store._open_part(key)
            problem = None
            if size < HEADER_SIZE + header.length:
                problem = f"part {key} is truncated"
            elif offset + length > header.length:
                problem = f"part {key} is shorter than {offset + length} bytes"
            if problem is not None:
                os.close(fd)
                raise IntegrityError(problem)
            return fd

        try:
            fd = await self._store._run(open_checked)
        except OSError as exc:
            raise _storage_error(exc, "opening a part") from None
        start = HEADER_SIZE + offset
        self._reader = _ChunkReader(
            self._store, key, fd, start, start + length, self._store._read_chunk
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
    """Chunks of a part file's byte range, one thread hop each. A class, not an async
    generator, so a reader abandoned part-way needs no finaliser task."""

    def __init__(
        self, store: FilePartStore, key: str, fd: int, start: int, end: int, chunk: int
    ) -> None:
        self._store = store
        self._key = key
        self._fd: int | None = fd
        self._pos = start
        self._end = end
        self._chunk = chunk

    def __aiter__(self) -> _ChunkReader:
        return self

    async def __anext__(self) -> bytes:
        if self._fd is None:
            raise trio.ClosedResourceError("part reader is closed")
        if self._pos >= self._end:
            raise StopAsyncIteration
        fd, pos, want = self._fd, self._pos, min(self._chunk, self._end - self._pos)
        try:
            data = await self._store._run(lambda: _pread_exact(fd, want, pos))
        except OSError as exc:
            raise _storage_error(exc, "reading a part") from None
        if len(data) < want:
            raise IntegrityError(f"part {self._key} ended early")
        self._pos += want
        return data

    def close(self) -> None:
        """Close the file; idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            _close_quietly(fd)
