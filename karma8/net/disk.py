"""A storage node's disk as a directory of part files: :class:`karma8.ports.PartStore` for net mode.

Theory of operation
===================

Directory layout::

    root/
      tmp/<key>~<random>.tmp     writes in progress (deleted on start: they never committed)
      parts/<aa>/<bb>/<key>      committed parts; aa, bb = first 4 hex digits of blake2b(key)

A write goes to its own file in ``tmp/``. :meth:`FilePartWriter.commit` writes the block
checksum trailer and the header, fsyncs the file, creates the leaf directory if needed (fsyncing
its parent), hard-links the file into ``parts/aa/bb/`` and fsyncs the leaf directory, then
unlinks the temporary name. Link plus unlink is a rename that refuses to replace: parts are
immutable, so a second commit of the same key fails with :class:`UploadConflict` instead of
silently swapping bytes under a reader (and the used-bytes counter cannot double-count). Because
the file was fsynced *before* it got its final name, any name that survives a crash points at
complete, durable bytes; a crash at any earlier point leaves only a temporary, which the next
start deletes. Deleting a part fsyncs its leaf directory too, so a deletion the node reports to
discovery cannot come back after a crash.

Part file format (all integers big-endian): a fixed 96-byte header, the part's bytes (the
payload), then a trailer of per-block checksums::

    offset   size  field
    0        6     magic b"K8PART"
    6        2     format version (2; version 1 is still read, see below)
    8        64    sha256 of the payload, lowercase hex, ASCII
    72       8     payload length L
    80       4     CRC-32 of header bytes 0..79 then 84..95 (tells a damaged header from
                   damaged data)
    84       4     block size B (65,536 = :data:`BLOCK`)
    88       4     CRC-32 of the trailer (tells a damaged trailer from a damaged block)
    92       4     reserved, zero
    96       L     the payload
    96+L     4*n   trailer: CRC-32 of each B-byte block of the payload in order (the last block
                   may be short), n = ceil(L / B); nothing for an empty part

Version 1 (the first format) has the same first 80 bytes, a header CRC over bytes 0..79 only,
12 reserved zero bytes and no trailer. Such parts are still read, and ``verify`` and
whole-part reads still check their sha256, but a read of a slice of one is not verified (as
before); nothing writes version 1 any more.

Why a header and not a sidecar file or an extended attribute: the checksums and length then
travel with the bytes in one inode and one atomic link, so they can never be orphaned or
mismatched, and a backup or ``cp`` keeps them (xattrs are easily lost and not on every file
system). :meth:`FilePartStore.stat` reads only the first 96 bytes. A temporary starts with 96
zero bytes and gets its trailer and header only at commit, so a file without the magic was
never committed. The recorded length and block size let :meth:`FilePartStore.open` detect
truncation up front (file shorter than header + payload + trailer: :class:`IntegrityError`),
and the sha256 lets :meth:`FilePartStore.verify` (the scrubber) detect bit rot. The store does
not compute the sha256 while writing: the storage actor already hashes the stream it passes to
:meth:`FilePartWriter.write` and hands the digest to commit.

Block checksums: every read is verified
---------------------------------------
The sha256 covers the whole part, so it can only be checked by a reader that reads the whole
part (the gateway does so on a whole-file GET). A Range GET reads a slice of each part, and a
flipped byte inside the slice would be served silently. So the payload is also cut into fixed
blocks of ``B`` bytes, each with a CRC-32 in the trailer, and *every* read, at any offset and
length, is widened to the whole blocks it touches; each block's CRC is checked before any byte
of it is handed out, and a mismatch raises :class:`IntegrityError` (the storage node then cuts
its response short, so the client never gets wrong bytes). The trailer is loaded and checked
against its own CRC when a part is opened, so a damaged trailer is reported as such, on open.

Why CRC-32 (``zlib.crc32``) and not a sha256 per block: it is in the standard library, releases
the GIL on large buffers (it runs in the worker threads next to the ``pread``), needs 4 bytes per
block instead of 32, and is much faster (~3 GB/s against ~1.4 GB/s for sha256 with SHA-NI, per
core, on the development machine; the gap is larger without SHA extensions). It is built to
catch accidental damage, which is what it is for: with 64 KiB blocks it detects every 1- and
2-bit error and every burst of up to 32 bits, and anything else except with probability 2^-32.
It is not a defence against someone forging bytes; the end-to-end sha256 remains for that (and
is still checked on whole-part reads and by ``verify``).

Costs: the trailer is 4 bytes per 64 KiB (0.006 % of the payload; 16 KiB per GiB). Writing
computes one CRC pass over the bytes, in the thread hop that writes them, and one extra
``pwrite`` of the trailer at commit. Opening a part for reading reads its whole trailer (one
``pread``; 64 bytes for a 1 MiB part). A read costs one CRC pass over what it reads, and a
range read reads at most two partial blocks more than asked (< 128 KiB); a reader holds at most
``read_chunk`` plus two blocks of verified bytes. Aligned whole-part reads read nothing extra.

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
``used_bytes`` counts the payload bytes of committed parts (not headers, trailers or block
rounding). It is computed once on start by stat-ing every part file (one ``stat`` per part, no
reads: seconds for millions of parts on an SSD) and then kept as a counter. The payload length
is derived from the file size assuming the version-2 layout with ``B`` = :data:`BLOCK` (the size
is 96 + L + 4*ceil(L/B), which determines L); a version-1 part is therefore counted 4 bytes per
64 KiB short. The same formula is used when a part is deleted, so the counter stays
consistent. :attr:`capacity_bytes` is a quota on payload bytes: a write fails with
:class:`DiskFull` when committed plus in-flight bytes would exceed it, and also when the file
system itself reports ``ENOSPC``/``EDQUOT``. Leave headroom below the real disk size for
headers, trailers, block rounding and directories.

All blocking file-system calls run in ``trio.to_thread.run_sync`` (never abandoned on
cancellation, so no call is ever left running behind a task). Writes are buffered up to
``write_buffer`` bytes (1 MiB) per thread hop; reads hop once per ``read_chunk`` bytes (widened
to whole blocks, so with the default 1 MiB an aligned read reads exactly 16 blocks). Any other
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

# Defence in depth: the storage actor validates keys; this only guarantees a key is one plain
# file name (no separators, no leading dot, no "~" used by temporary names).
_SAFE_KEY = re.compile(r"[0-9A-Za-z_-][0-9A-Za-z_.-]{0,127}")
_CHECKSUM = re.compile(r"[0-9a-f]{64}")
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
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


def _block_crcs_trailer(crcs: list[int]) -> bytes:
    return struct.pack(f"!{len(crcs)}I", *crcs)


def _read_trailer(fd: int, header: PartHeader, key: str) -> tuple[int, ...]:
    """Read and check a part's block checksums (in a thread); () for a version-1 part.

    Raises:
        IntegrityError: The trailer is cut short or does not match its CRC.
    """
    if not header.blocks:
        return ()
    size = header.trailer_size
    data = _pread_exact(fd, size, HEADER_SIZE + header.length)
    if len(data) < size:
        raise IntegrityError(f"part {key} is truncated")
    if zlib.crc32(data) != header.trailer_crc:
        raise IntegrityError(f"part {key} has a damaged block checksum trailer")
    return struct.unpack(f"!{header.blocks}I", data)


def _check_blocks(data: bytes, first_block: int, block: int, crcs: tuple[int, ...]) -> bool:
    """Whether whole blocks ``first_block, ...`` read as ``data`` match their checksums."""
    view = memoryview(data)
    for index, at in enumerate(range(0, len(data), block), start=first_block):
        if zlib.crc32(view[at : at + block]) != crcs[index]:
            return False
    return True


def _payload_bytes(file_size: int) -> int:
    """Payload length of a version-2 part file of this size written with :data:`BLOCK`.

    The file holds ``L + 4 * ceil(L / BLOCK)`` bytes after the header, and that determines L.
    """
    after_header = max(0, file_size - HEADER_SIZE)
    return after_header - _BLOCK_CRC_SIZE * -(-after_header // (BLOCK + _BLOCK_CRC_SIZE))


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
                        used += _payload_bytes(entry.stat(follow_symlinks=False).st_size)
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
            IntegrityError: The header or the block checksum trailer is damaged, the file is
                shorter than its header says, or the range goes past the part's end (on
                entry); or, from the iterator, a block the range touches does not match its
                checksum (raised before any byte of that block is yielded) or the file ends
                early.
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
        self._used = max(0, self._used - _payload_bytes(size))
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
        self._used = max(0, self._used - _payload_bytes(size))
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
        """Re-read a part and check it against its header and trailer.

        Returns:
            True if the header is intact, the file is exactly as long as the header says
            (header + payload + trailer), the trailer matches its CRC, every block matches its
            CRC and the payload hashes to the recorded sha256; False otherwise.

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
            if size != header.file_size:
                return False
            try:
                crcs = await self._run(lambda: _read_trailer(fd, header, key))
            except IntegrityError:
                return False
            digest = hashlib.sha256()
            block = header.block_size
            # Whole blocks per hop (about read_chunk bytes), so each block is checked in one go.
            step = max(block, self._read_chunk // block * block) if block else self._read_chunk
            pos = 0
            while pos < header.length:
                want = min(step, header.length - pos)

                def check_chunk(at: int = pos, want: int = want) -> bool:
                    data = _pread_exact(fd, want, HEADER_SIZE + at)
                    if len(data) < want:
                        return False
                    digest.update(data)
                    return not block or _check_blocks(data, at // block, block, crcs)

                if not await self._run(check_chunk):
                    return False
                pos += want
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
        # Block checksums so far: finished blocks, and the running CRC of the open block.
        self._block_crcs: list[int] = []
        self._block_crc = 0
        self._block_fill = 0

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
        """Write buffered bytes at ``pos`` and add them to the block checksums (in a thread).

        The checksums are only updated once the bytes are written, so a failed write can be
        retried from the same state.
        """
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        _pwrite_all(fd, data, pos)
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
        """Write the trailer and header, fsync, and link the part into place; then it is visible.

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
        chunks, pos = self._buffer, self._file_pos
        first, leaf = store._leaf(self._key)
        final = leaf / self._key

        def finish() -> None:
            if chunks:
                self._flush_sync(fd, chunks, pos)
            crcs = self._block_crcs + ([self._block_crc] if self._block_fill else [])
            trailer = _block_crcs_trailer(crcs)
            header = PartHeader(
                checksum=checksum, length=length, block_size=BLOCK, trailer_crc=zlib.crc32(trailer)
            )
            assert header.blocks == len(crcs)
            _pwrite_all(fd, trailer, HEADER_SIZE + length)
            _pwrite_all(fd, header.encode(), 0)
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

        def open_checked() -> tuple[int, PartHeader, tuple[int, ...]]:
            fd, header, size = self._store._open_part(key)
            try:
                if size < header.file_size:
                    raise IntegrityError(f"part {key} is truncated")
                if offset + length > header.length:
                    raise IntegrityError(f"part {key} is shorter than {offset + length} bytes")
                crcs = _read_trailer(fd, header, key)
            except BaseException:
                os.close(fd)
                raise
            return fd, header, crcs

        try:
            fd, header, crcs = await self._store._run(open_checked)
        except OSError as exc:
            raise _storage_error(exc, "opening a part") from None
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
    not yet handed out wait in ``_buf`` (at most one chunk plus two blocks). A version-1 part
    has no blocks: reads are then exactly the requested bytes, unverified.
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
        self._verify = bool(header.block_size)
        self._crcs = crcs
        self._length = header.length
        self._pos = start
        self._end = end
        self._chunk = chunk
        self._buf = b""  # verified payload bytes from _buf_start; ends on a block boundary
        self._buf_start = start

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
        verify = self._verify

        def read_blocks() -> bytes:
            data = _pread_exact(fd, last - first, HEADER_SIZE + first)
            if len(data) < last - first:
                raise IntegrityError(f"part {key} ended early")
            if verify and not _check_blocks(data, first // block, block, crcs):
                raise IntegrityError(f"part {key} does not match its block checksums")
            return data

        try:
            data = await self._store._run(read_blocks)
        except OSError as exc:
            raise _storage_error(exc, "reading a part") from None
        if keep:
            self._buf, self._buf_start = keep + data, self._pos
        else:
            self._buf, self._buf_start = data, first

    def close(self) -> None:
        """Close the file; idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            _close_quietly(fd)
        self._buf = b""
