"""A storage node's disk as a directory of part files: :class:`karma8.ports.PartStore` for net mode.

Theory of operation
===================

Directory layout::

    root/
      tmp/<key>~<random>.tmp     writes in progress (deleted on start: they never committed)
      parts/<aa>/<bb>/<key>      committed parts; aa, bb = first 4 hex digits of blake2b(key)

A write goes to its own file in ``tmp/``. :meth:`FilePartWriter.commit` writes the block
checksum trailer and the header, creates the leaf directory if needed, hard-links the file into
``parts/aa/bb/`` and unlinks the temporary name; the part counts as stored only once it is
durable. With group sync (the default on Linux) that is once a ``syncfs`` that started after
the link has completed (:mod:`karma8.store.groupsync`; the writing and linking is a step that
round's thread runs before it syncs); a commit whose round fails or is cancelled unlinks the
part again. Without it, the file is fsynced before the link, and the
new directory's parent and the leaf directory after it. Link plus unlink is a rename that
refuses to replace: parts are immutable, so a second commit of the same key fails with
:class:`UploadConflict` instead of silently swapping bytes under a reader (and the used-bytes
counter cannot double-count). A crash before a part is durable can leave its name with
incomplete bytes (group sync links first); such a part fails its header or checksums, and its
version was never committed (discovery commits only after every part is durable), so it is an
orphan the node deletes. A crash leaves temporaries too, which the next start deletes.
Deleting a part fsyncs its leaf directory, so a deletion the node reports to discovery
cannot come back after a crash.

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
system). :meth:`FilePartStore.stat` reads only the first 96 bytes. A temporary's first 96
bytes stay a hole (zeros) until commit writes the trailer and the header, so a file without
the magic was never committed. The temporary is created by the writer's first flush
(``write_buffer`` bytes) or at commit: a part smaller than the buffer is created, written
header to trailer with one ``pwritev``, closed and linked by one step of a sync round's worker
thread (:mod:`karma8.store.groupsync`; one trip of its own without group sync).
The recorded length and block size let :meth:`FilePartStore.open` detect truncation up
front (file shorter than header + payload + trailer: :class:`IntegrityError`),
and the sha256 lets :meth:`FilePartStore.verify` (the scrubber) detect bit rot. The writer
computes the sha256 as the bytes go to the disk, in the same pass (and the same worker
thread) as the block CRCs, and :meth:`FilePartWriter.commit` returns it.

Every read is verified, block by block, before any byte of a block is handed out
---------------------------------------------------------------------------------
The payload is cut into fixed blocks of ``B`` bytes, each with a CRC-32 in the trailer. Every
read, of the whole part or of a slice at any offset and length, is widened to the whole
blocks it touches, and each block's CRC is checked (in the worker thread that ``pread`` it)
before any byte of it is handed out; a mismatch raises :class:`IntegrityError` (the storage
node then answers with an error, or cuts a streamed response short, so the client never gets
a complete body with wrong bytes, and no damaged byte leaves the node). The trailer is loaded
and checked against its own CRC when a part is opened, so a damaged trailer is reported as
such, on open. The sha256 is not checked on reads: it is what :meth:`FilePartStore.verify`
(the scrubber) checks, and what a storage client checks where bytes travel over HTTP
(:class:`karma8.net.clients.HttpStorageClient`, against the checksum discovery recorded).
A version-1 part has no blocks, so a whole-part read of one checks its sha256 as it goes,
before handing out its last chunk.

Why not the sha256 on every whole-part read, as karma8 did until 2026-11: it guards against
the same accidents as the CRCs here (it is checked against the part's own header, written in
the same pass as the CRCs), costs 1.6 times the CPU (1.4 GB/s against 2.2 GB/s per core on
the development machine), and can only fail at the end of the part, after its damaged bytes
went out.

Why CRC-32 (``zlib.crc32``) and not a sha256 per block: it is in the standard library, releases
the GIL on large buffers (it runs in the worker threads next to the ``pread``), and needs 4
bytes per block instead of 32. It is built to catch accidental damage, which is what it is
for: with 64 KiB blocks it detects every 1- and 2-bit error and every burst of up to 32 bits,
and anything else except with probability 2^-32. It is not a defence against someone forging
bytes and their CRCs; the sha256 remains for that (checked by ``verify`` and by the HTTP
storage client).

Costs: the trailer is 4 bytes per 64 KiB (0.006 % of the payload; 16 KiB per GiB). Writing
computes one CRC pass (next to the sha256) over the bytes, in the thread hop that writes
them, and one extra ``pwrite`` of the trailer at commit. Opening a part for reading reads its
whole trailer (one ``pread``; 64 bytes for a 1 MiB part). A read costs one CRC pass over what
it reads and reads at most two partial blocks more than asked (< 128 KiB; nothing more for a
whole-part read).

Reading ahead: a reader that hands out a chunk read by a worker thread starts reading the
next one in a worker thread right away, so the disk read and its checks overlap with
whatever the consumer does with the chunk (a gateway sending it on, a storage node writing
it to a socket). One read at a time, in order, and only while trio's default thread limiter
has a token to spare. A reader holds at most ``read_chunk`` plus two blocks of verified
bytes, and one more chunk being read.

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

Blocking file-system calls run in ``trio.to_thread.run_sync`` (never abandoned on cancellation,
so no call is ever left running behind a task), except a reader's read-ahead, which nobody
waits for: a reader closed while it runs leaves the file descriptor to that thread, which
closes it after its ``pread`` (so the number is never reused under it). Small calls run on the
event loop: opening a part, reading its header and trailer, and reading or writing at most
``inline_io`` bytes (64 KiB) to an open file, as nginx reads files by default. Creating a
temporary and every commit (which writes, links and may make a directory) go to a thread. A
thread hop costs more CPU than such a call served from the page cache (profiled: 4 KiB GETs
spent most of their time handing calls to threads and back); fsync and bulk transfers always go
to a thread. ``inline_io=0`` sends everything to threads. Writes are buffered up to
``write_buffer`` bytes (1 MiB) per thread hop; reads hop once per ``read_chunk`` bytes (widened
to whole blocks, so with the default 4 MiB an aligned read reads exactly 64 blocks; 4 MiB
rather than 1 MiB, net mode's stripe unit: a 256 MiB GET took 0.24-0.28 s and 34 CPU-cs instead
of 0.32-0.39 s and 42, for up to two chunks held per part being read). Any other ``OSError``
becomes :class:`StorageFailure` with a message that names no paths.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

import trio

from karma8.core.errors import IntegrityError, InvalidRequest, NotFound
from karma8.ports import StoredPart
from karma8.store.diskio import (
    BlockingIO,
    close_quietly,
    fsync_dir,
    pread_exact,
    storage_error,
)
from karma8.store.files.context import (
    DEFAULT_READ_CHUNK,
    DEFAULT_WRITE_BUFFER,
    FileStoreContext,
)
from karma8.store.files.format import (
    HEADER_SIZE,
    PartHeader,
    check_blocks,
    payload_bytes,
    read_trailer,
)
from karma8.store.files.reader import PartRead
from karma8.store.files.tree import PartTree, check_key
from karma8.store.files.writer import FilePartWriter
from karma8.store.groupsync import GroupSync
from karma8.store.quota import SpaceQuota


class FilePartStore:
    """:class:`karma8.ports.PartStore` on a local directory (see the module docstring).

    Attributes:
        root: The store's directory.
        context: What the store shares with its writers and readers.
        cleaned_temporaries: How many leftover temporaries opening the store deleted.
    """

    def __init__(
        self,
        root: Path,
        *,
        capacity_bytes: int,
        read_chunk: int = DEFAULT_READ_CHUNK,
        write_buffer: int = DEFAULT_WRITE_BUFFER,
        inline_io: int = 1 << 16,
        group_sync: bool | GroupSync = True,
    ) -> None:
        """Open (creating if needed) a store and recover from a previous run.

        This blocks: it deletes leftover temporaries and stat-s every part to compute
        ``used_bytes``. For a very large store construct it in a worker thread.

        Args:
            root: The data directory; ``parts/`` and ``tmp/`` are created inside it.
            capacity_bytes: Quota on payload bytes (see the module docstring).
            read_chunk: Largest chunk a reader yields.
            write_buffer: Bytes a writer buffers before handing them to a thread.
            inline_io: Reads and writes of at most this many bytes, and opening parts, run
                on the event loop instead of a thread (0: always a thread).
            group_sync: Make committed parts durable with shared ``syncfs`` rounds
                (:mod:`karma8.store.groupsync`; Linux) instead of two fsyncs per part; True
                for a syncer of the store's own, or one shared with other stores on the same
                file system (:class:`karma8.store.groupsync.SyncGroups`).
        """
        if read_chunk <= 0 or write_buffer <= 0:
            raise ValueError("read_chunk and write_buffer must be positive")
        self.root = Path(root)
        tree = PartTree(self.root)
        tree.make()
        syncer = group_sync if isinstance(group_sync, GroupSync) else None
        if group_sync is True:
            syncer = GroupSync.open(self.root)
        self.cleaned_temporaries = tree.clean_temporaries()
        self.context = FileStoreContext(
            tree=tree,
            quota=SpaceQuota(capacity_bytes, used_bytes=tree.payload_total()),
            io=BlockingIO(inline_io=inline_io),
            read_chunk=read_chunk,
            write_buffer=write_buffer,
            group_sync=syncer,
        )

    @property
    def capacity_bytes(self) -> int:
        """The quota on committed plus in-flight payload bytes."""
        return self.context.quota.capacity_bytes

    @capacity_bytes.setter
    def capacity_bytes(self, value: int) -> None:
        self.context.quota.capacity_bytes = value

    @property
    def group_sync(self) -> GroupSync | None:
        """The syncer commits wait for, or None where each commit fsyncs itself."""
        return self.context.group_sync

    def part_path(self, key: str) -> Path:
        """Where a committed part with this key lives (whether or not it exists)."""
        return self.context.tree.part_path(key)

    # -- PartStore --------------------------------------------------------------------------

    async def create(self, key: str) -> FilePartWriter:
        """Start writing a part; it stays invisible until :meth:`FilePartWriter.commit`.

        Touches no disk: the writer creates its temporary file with its first flush, or in
        its commit (so a failure to create it is raised from there).

        Raises:
            InvalidRequest: The key is not a plain file name.
        """
        check_key(key)
        await trio.lowlevel.checkpoint()
        return FilePartWriter(self.context, key)

    def open(self, key: str, *, offset: int, length: int) -> PartRead:
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
        check_key(key)
        if offset < 0 or length < 0:
            raise InvalidRequest("offset and length must not be negative")
        return PartRead(self.context, key, offset, length)

    async def stat(self, key: str) -> StoredPart | None:
        """The committed part's size and checksum from its header, or None if absent.

        Reads only the header: a part whose body was truncated is still reported (``open`` and
        ``verify`` detect that).

        Raises:
            IntegrityError: The part's header is damaged.
        """
        check_key(key)
        tree = self.context.tree

        def read_header() -> PartHeader | None:
            try:
                fd, header, _ = tree.open_part(key)
            except NotFound:
                return None
            os.close(fd)
            return header

        try:
            header = await self.context.io.run_small(read_header)
        except OSError as exc:
            raise storage_error(exc, "reading a part") from None
        if header is None:
            return None
        return StoredPart(key=key, size=header.length, checksum=header.checksum)

    async def delete(self, key: str) -> bool:
        """Delete a part durably (the leaf directory is fsynced); False if it was absent."""
        return await self._take_out(key, into=None, doing="deleting a part")

    async def quarantine(self, key: str) -> bool:
        """Move a part out of service into ``root/quarantine`` (kept for inspection).

        Returns False if the part was absent.
        """
        return await self._take_out(key, into=self.root / "quarantine", doing="quarantining a part")

    async def _take_out(self, key: str, *, into: Path | None, doing: str) -> bool:
        """Remove a part from ``parts/`` (deleted, or moved ``into`` a directory), durably."""
        check_key(key)
        path = self.part_path(key)

        def take_out() -> int | None:
            if into is not None:
                into.mkdir(exist_ok=True)
            try:
                size = os.stat(path).st_size
                if into is None:
                    os.unlink(path)
                else:
                    os.replace(path, into / key)
            except FileNotFoundError:
                return None
            fsync_dir(path.parent)
            if into is not None:
                fsync_dir(into)
            return size

        try:
            size = await self.context.io.run(take_out)
        except OSError as exc:
            raise storage_error(exc, doing) from None
        if size is None:
            return False
        self.context.quota.remove_used(payload_bytes(size))
        return True

    async def keys(self) -> list[str]:
        """The keys of all committed parts, sorted (walks the tree in a thread)."""
        try:
            return await self.context.io.run(self.context.tree.keys)
        except OSError as exc:
            raise storage_error(exc, "listing parts") from None

    async def used_bytes(self) -> int:
        """Payload bytes of committed parts (a counter; no disk access)."""
        await trio.lowlevel.checkpoint()
        return self.context.quota.used_bytes

    @property
    def in_flight_bytes(self) -> int:
        """Bytes accepted by writers that have neither committed nor discarded."""
        return self.context.quota.in_flight_bytes

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
        check_key(key)
        try:
            fd, header, size = await self.context.io.run(lambda: self.context.tree.open_part(key))
        except IntegrityError:
            return False
        except OSError as exc:
            raise storage_error(exc, "verifying a part") from None
        try:
            if size != header.file_size:
                return False
            try:
                crcs = await self.context.io.run(lambda: read_trailer(fd, header, key))
            except IntegrityError:
                return False
            digest = hashlib.sha256()
            block = header.block_size
            # Whole blocks per hop (about read_chunk bytes), so each block is checked in one go.
            chunk = self.context.read_chunk
            step = max(block, chunk // block * block) if block else chunk
            pos = 0
            while pos < header.length:
                want = min(step, header.length - pos)

                def check_chunk(at: int = pos, want: int = want) -> bool:
                    data = pread_exact(fd, want, HEADER_SIZE + at)
                    if len(data) < want:
                        return False
                    digest.update(data)
                    return not block or check_blocks(data, at // block, block, crcs)

                if not await self.context.io.run(check_chunk):
                    return False
                pos += want
            return secrets.compare_digest(digest.hexdigest(), header.checksum)
        except OSError as exc:
            raise storage_error(exc, "verifying a part") from None
        finally:
            close_quietly(fd)
