"""A storage node's disk with two engines: :class:`TieredPartStore`.

Parts of at most ``small_part_max`` bytes are packed into volumes
(:mod:`karma8.store.packed`); larger ones are files (:mod:`karma8.store.files`). A writer
buffers in memory up to the threshold: a part that grows past it spills into a file writer
(fed the buffered bytes) and stays a file; one that ends below is appended to a volume at
commit. Reads, deletes and checks look in the packed index first (in memory), then at the
files. Keys are immutable across both engines: a commit of a key either holds, or one in
flight, fails with :class:`~karma8.core.errors.UploadConflict`. One quota counts both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import attrs
import trio

from karma8.core.errors import IntegrityError, InvalidRequest, NotFound, Unavailable, UploadConflict
from karma8.ports import Appended, Loan, PartWriter, PendingWrite, StepRunner, StoredPart
from karma8.store.files.store import FilePartStore
from karma8.store.files.tree import check_key
from karma8.store.groupsync import GroupSync
from karma8.store.packed.store import DEFAULT_COMPACT_RATIO, DEFAULT_VOLUME_SIZE, PackedStore

__all__ = ["DEFAULT_SMALL_PART_MAX", "DEFAULT_VOLUME_SIZE", "TieredPartStore", "open_part_store"]

DEFAULT_SMALL_PART_MAX = 64 << 10


class TieredPartStore:
    """:class:`karma8.ports.PartStore` over the packed engine and the file engine.

    Attributes:
        files: The file engine (large parts; also owns the quota).
        packed: The packed engine (small parts).
        small_part_max: Parts of at most this many bytes are packed (0: none; parts packed
            before stay readable).
    """

    def __init__(
        self,
        root: Path,
        *,
        capacity_bytes: int,
        small_part_max: int = DEFAULT_SMALL_PART_MAX,
        volume_size: int = DEFAULT_VOLUME_SIZE,
        compact_ratio: float = DEFAULT_COMPACT_RATIO,
        group_sync: bool | GroupSync = True,
        inline_io: int = 1 << 16,
    ) -> None:
        """Open both engines on ``root`` (blocking: see their constructors)."""
        if small_part_max < 0:
            raise ValueError("small_part_max must not be negative")
        self.files = FilePartStore(
            root, capacity_bytes=capacity_bytes, group_sync=group_sync, inline_io=inline_io
        )
        context = self.files.context
        self.packed = PackedStore(
            root,
            quota=context.quota,
            io=context.io,
            group_sync=context.group_sync,
            volume_size=volume_size,
            compact_ratio=compact_ratio,
        )
        self.small_part_max = small_part_max
        self.root = self.files.root
        self._committing: set[str] = set()

    @property
    def capacity_bytes(self) -> int:
        return self.files.capacity_bytes

    @capacity_bytes.setter
    def capacity_bytes(self, value: int) -> None:
        self.files.capacity_bytes = value

    @property
    def group_sync(self) -> GroupSync | None:
        return self.files.group_sync

    @property
    def in_flight_bytes(self) -> int:
        return self.files.in_flight_bytes

    async def create(self, key: str) -> TieredWriter:
        """Start writing a part (in memory until it passes ``small_part_max``).

        Raises:
            InvalidRequest: The key is not a plain file name.
        """
        check_key(key)
        await trio.lowlevel.checkpoint_if_cancelled()  # cheap: no yield for a few bytes
        return TieredWriter(self, key)

    def whole_runner(self, size: int) -> StepRunner | None:
        """What runs the write of a whole part of ``size`` bytes begun by
        :meth:`begin_whole`, or None if it would not be packed (too large, packing off)."""
        if not self.small_part_max or size > self.small_part_max:
            return None
        return self.packed.group_sync

    async def lend(self, borrower: str) -> Loan:
        """:class:`karma8.ports.LendingStore`: a new packed volume for ``borrower``.

        Raises:
            Unavailable: Small parts are not packed here (``small_part_max`` is 0).
        """
        if not self.small_part_max:
            raise Unavailable("this node does not pack small parts")
        return await self.packed.lend(borrower)

    def adopt(self, borrower: str, appended: Appended) -> StoredPart:
        """A needle ``borrower`` appended to a volume lent to it, made a part (see
        :meth:`karma8.store.packed.store.PackedStore.adopt`; blocking, brief)."""
        check_key(appended.key)
        if not 0 <= appended.length <= self.small_part_max:
            raise InvalidRequest(f"a part of {appended.length} bytes is not packed here")
        if appended.key in self._committing:
            raise UploadConflict(f"part {appended.key} already exists")
        return self.packed.adopt(borrower, appended)

    async def give_back(self, borrower: str, volume: int, end: int) -> None:
        await self.packed.give_back(borrower, volume, end)

    def end_loans(self) -> None:
        self.packed.end_loans()

    async def begin_whole(self, key: str, data: bytes) -> PendingWrite:
        """Begin storing a whole small part (:meth:`whole_runner` says it is one): as a writer
        fed ``data`` and committed would, up to the needle's write (see
        :class:`karma8.ports.PendingWrite`).

        Raises:
            InvalidRequest: The key is not a plain file name.
            UploadConflict: The key is committed in either engine, or being committed.
            DiskFull: The quota would be exceeded.
        """
        check_key(key)
        if self.whole_runner(len(data)) is None:
            raise ValueError(f"a part of {len(data)} bytes is not packed here")
        if key in self._committing:
            raise UploadConflict(f"part {key} already exists")
        quota = self.files.context.quota
        quota.reserve(len(data))
        self._committing.add(key)
        try:
            pending = await self.packed.begin_put(
                key, data, held_elsewhere=partial(self.files.holds_blocking, key)
            )
        except BaseException:
            self._committing.discard(key)
            quota.release(len(data))
            raise
        packed_end = pending.end

        def end(error: BaseException | None) -> StoredPart:
            try:
                return packed_end(error)
            finally:
                self._committing.discard(key)
                quota.release(len(data))

        return attrs.evolve(pending, end=end)

    @asynccontextmanager
    async def open(
        self, key: str, *, offset: int, length: int
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """Read ``length`` bytes from ``offset``: a packed part in one chunk (its CRC checked
        first), a file part as :meth:`FilePartStore.open` reads it.

        Raises:
            NotFound, IntegrityError, InvalidRequest: As :meth:`FilePartStore.open`.
        """
        check_key(key)
        if offset < 0 or length < 0:
            raise InvalidRequest("offset and length must not be negative")
        data = await self.packed.read(key)
        if data is None:
            async with self.files.open(key, offset=offset, length=length) as chunks:
                yield chunks
            return
        if offset + length > len(data):
            raise IntegrityError(f"part {key} is shorter than {offset + length} bytes")
        yield OneChunk(
            data[offset : offset + length] if (offset, length) != (0, len(data)) else data
        )

    async def stat(self, key: str) -> StoredPart | None:
        check_key(key)
        return self.packed.stat(key) or await self.files.stat(key)

    async def delete(self, key: str) -> bool:
        check_key(key)
        return await self.packed.delete(key) or await self.files.delete(key)

    async def quarantine(self, key: str) -> bool:
        check_key(key)
        return await self.packed.quarantine(key) or await self.files.quarantine(key)

    async def verify(self, key: str) -> bool:
        check_key(key)
        if key in self.packed.index:
            try:
                return await self.packed.verify(key)
            except NotFound:
                pass  # deleted meanwhile: it cannot be a file either (keys are immutable)
        return await self.files.verify(key)

    async def keys(self) -> list[str]:
        return sorted({*self.packed.index.keys(), *await self.files.keys()})

    async def used_bytes(self) -> int:
        """Payload bytes of committed parts, both engines (one counter)."""
        return await self.files.used_bytes()

    async def free_bytes(self) -> int:
        return await self.files.free_bytes()

    async def compact(self) -> int:
        """Compact the sealed volumes whose garbage passes the ratio now; how many."""
        return await self.packed.compact()

    def close(self) -> None:
        """Close the packed volumes' descriptors (see :meth:`karma8.ports.PartStore.close`)."""
        self.packed.close()


class TieredWriter:
    """:class:`karma8.ports.PartWriter` that picks its engine by the part's size."""

    def __init__(self, store: TieredPartStore, key: str) -> None:
        self._store = store
        self._key = key
        self._buffer: list[bytes] = []
        self._buffered = 0  # also what this writer holds of the quota's in-flight bytes
        self._file: PartWriter | None = None
        self._done = False

    async def write(self, data: bytes) -> None:
        """Buffer the bytes, or pass them to the file writer once the part is large.

        Raises:
            DiskFull: The quota would be exceeded (or ENOSPC once a file).
            StorageFailure: Another disk error.
        """
        if self._done:
            raise trio.ClosedResourceError("part writer already committed or discarded")
        if self._file is not None:
            await self._file.write(data)
            return
        store = self._store
        if self._buffered + len(data) <= store.small_part_max:
            store.files.context.quota.reserve(len(data))
            self._buffer.append(bytes(data))
            self._buffered += len(data)
            await trio.lowlevel.checkpoint_if_cancelled()
            return
        await self._spill(data)

    async def _spill(self, data: bytes = b"") -> PartWriter:
        """Become a file writer, fed what was buffered (it reserves its own bytes)."""
        buffered, self._buffer = self._buffer, []
        self._store.files.context.quota.release(self._buffered)
        self._buffered = 0
        self._file = file = await self._store.files.create(self._key)
        for chunk in (*buffered, data):
            await file.write(chunk)
        return file

    async def commit(self) -> StoredPart:
        """Make the part durable and visible in its engine (see the module doc).

        Raises:
            UploadConflict: The key is committed in either engine, or being committed.
            DiskFull, StorageFailure: The disk failed.
        """
        if self._done:
            raise trio.ClosedResourceError("part writer already committed or discarded")
        store, key = self._store, self._key
        if key in store._committing:
            raise UploadConflict(f"part {key} already exists")
        store._committing.add(key)
        try:
            if self._file is None and not store.small_part_max:
                await self._spill()  # packing is off
            if self._file is not None:
                if store.packed.has(key):
                    raise UploadConflict(f"part {key} already exists")
                part = await self._file.commit()
                self._done = True
                return part
            # A part file of this key (whole or damaged) refuses it; looked for in the
            # sync round's thread, not on the event loop.
            part = await store.packed.put(
                key, b"".join(self._buffer), held_elsewhere=partial(store.files.holds_blocking, key)
            )
            self._release()
            return part
        finally:
            store._committing.discard(key)

    async def discard(self) -> None:
        """Drop what was written. Idempotent; a no-op after a successful commit."""
        self._release()
        if self._file is not None:
            await self._file.discard()
        else:
            await trio.lowlevel.checkpoint()

    def _release(self) -> None:
        if not self._done:
            self._done = True
            self._store.files.context.quota.release(self._buffered)
            self._buffered = 0
            self._buffer = []


class OneChunk:
    """An iterator over one chunk (a class, not an async generator: nothing to finalise)."""

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def __aiter__(self) -> OneChunk:
        return self

    async def __anext__(self) -> bytes:
        await trio.lowlevel.checkpoint()
        data, self._data = self._data, None
        if not data:  # an empty range yields nothing, as the file engine's reader does
            raise StopAsyncIteration
        return data


def open_part_store(
    root: Path,
    *,
    capacity_bytes: int,
    small_part_max: int = DEFAULT_SMALL_PART_MAX,
    volume_size: int = DEFAULT_VOLUME_SIZE,
    group_sync: bool | GroupSync = True,
) -> TieredPartStore | FilePartStore:
    """A node's store on ``root``: small parts packed, or every part a file when
    ``small_part_max`` is 0 and nothing was ever packed there (blocking: it opens and scans
    the disk)."""
    if small_part_max <= 0 and not (root / "volumes").exists():
        return FilePartStore(root, capacity_bytes=capacity_bytes, group_sync=group_sync)
    return TieredPartStore(
        root,
        capacity_bytes=capacity_bytes,
        small_part_max=small_part_max,
        volume_size=volume_size,
        group_sync=group_sync,
    )
