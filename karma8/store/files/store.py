"""A storage node's disk as a directory of part files: :class:`karma8.ports.PartStore` for net
mode. The theory of operation (layout, commit protocol, format, checks) is in
:mod:`karma8.store.files`.
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
    DIR_MODE,
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
    """:class:`karma8.ports.PartStore` on a local directory (see :mod:`karma8.store.files`).

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
            capacity_bytes: Quota on committed plus in-flight payload bytes.
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

    def holds_blocking(self, key: str) -> bool:
        """Whether any file is where part ``key`` would be (committed, or damaged): a
        blocking check for a thread that is about to store the key elsewhere."""
        return os.path.lexists(self.context.tree.part_file(check_key(key)))

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

    def close(self) -> None:
        """Nothing stays open between calls: each reader and writer closes its own file."""

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
                into.mkdir(mode=DIR_MODE, exist_ok=True)
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

    async def free_bytes(self) -> int:
        """Bytes an unprivileged writer can still put on the store's file system."""
        try:
            stats = await self.context.io.run(lambda: os.statvfs(self.root))
        except OSError as exc:
            raise storage_error(exc, "reading free space") from None
        return stats.f_bavail * stats.f_frsize

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
