"""Writing one part file: :class:`FilePartWriter`, what ``FilePartStore.create`` returns.

A writer buffers up to ``write_buffer`` bytes and writes them to its temporary file in a worker
thread, computing the part's sha256 and block CRCs in the same pass. Its commit writes the
trailer and the header, links the file into place and waits until it is durable (see
:mod:`karma8.store.files` for the protocol); a part smaller than the buffer is written whole,
header to trailer, with one system call in that commit.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from contextlib import suppress

import trio

from karma8.core.errors import UploadConflict
from karma8.ports import StoredPart
from karma8.store.diskio import (
    FILE_MODE,
    O_CLOEXEC,
    close_quietly,
    fsync_dir,
    pwrite_all,
    pwritev_all,
    storage_error,
)
from karma8.store.files.context import FileStoreContext
from karma8.store.files.format import BLOCK, HEADER_SIZE, PartHeader, encode_trailer
from karma8.store.groupsync import start_writeback

# Flushes at least this large start their write-back at once (see groupsync.start_writeback).
WRITEBACK_BYTES = 1 << 20


class FilePartWriter:
    """:class:`karma8.ports.PartWriter` for one temporary file. Use from one task at a time."""

    def __init__(self, context: FileStoreContext, key: str) -> None:
        """A writer of the part ``key`` (already checked) into a fresh temporary name."""
        self._context = context
        self._key = key
        self._tmp = context.tree.temporary(key)
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
            self._fd = os.open(
                self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_CLOEXEC, FILE_MODE
            )
            self._created = True
        return self._fd

    async def write(self, data: bytes) -> None:
        """Append bytes, handing them to a thread once ``write_buffer`` bytes are pending.

        Raises:
            DiskFull: The quota (committed + in-flight) would be exceeded, or ENOSPC.
            StorageFailure: Another disk error.
        """
        self._check_open()
        context = self._context
        context.quota.reserve(len(data))
        if data:
            self._buffer.append(bytes(data))
            self._buffered += len(data)
            self._accepted += len(data)
        if self._buffered >= context.write_buffer:
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
        if len(data) >= WRITEBACK_BYTES and self._context.group_sync is not None:
            start_writeback(fd, pos, len(data))
        self._add_checksums(data)

    async def _flush(self) -> None:
        self._check_open()
        if not self._buffer:
            return
        chunks, size, pos = self._buffer, self._buffered, self._file_pos
        context = self._context
        try:
            if self._created:
                await context.io.run_small(lambda: self._flush_sync(chunks, pos), size)
            else:
                await context.io.run(lambda: self._flush_sync(chunks, pos))
        except OSError as exc:
            raise storage_error(exc, "writing a part") from None
        self._buffer, self._buffered = [], 0
        self._file_pos += size
        if context.group_sync is not None and size >= WRITEBACK_BYTES:
            context.group_sync.written(size)  # may start an early sync round

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
        context = self._context
        group = context.group_sync
        if self._created and self._buffer and group is not None:
            # What is left of a large part is written here, not in the sync round's step:
            # steps run one after another in the round's thread, and its sync waits for them.
            await self._flush()
        # A commit is tried once: a failed one may have consumed the buffer into checksums
        # and the temporary into a link, so after it the writer only discards.
        self._sealed = True
        length = self._file_pos - HEADER_SIZE + self._buffered
        chunks, pos = self._buffer, self._file_pos
        dirs = context.tree.leaf(self._key)
        leaf = dirs[1]
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
            trailer = encode_trailer(crcs)
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
            new_dirs = context.tree.make_dirs(dirs)
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
            context.tree.remember_dirs(dirs)

        linked = False

        def finish() -> None:
            nonlocal linked
            write_out()
            link_in()
            linked = True

        try:
            # In a worker thread: creating the file (for a small part), linking it and making
            # a directory all modify directories, which ext4 makes wait behind running sync
            # rounds. With group sync, in the thread of the round that then makes it durable,
            # with the other writers' steps.
            if group is None:
                await context.io.run(finish)
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
        context.quota.add_used(length)
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

        await self._context.io.run(remove)

    def _release(self) -> None:
        if not self._done:
            self._done = True
            self._context.quota.release(self._accepted)
            self._accepted = 0
            self._buffer, self._buffered = [], 0
