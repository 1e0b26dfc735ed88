"""An in-memory disk for a simulated storage node, with injectable faults.

Committed parts survive a crash of their node (they were fsynced); writes still in progress do
not. Write faults fail a write at a byte offset or with a probability, during a time window;
the disk also fails writes when full. Reads yield chunks of ``read_chunk`` bytes.

Opening a part for reading first checks its bytes against its sha256, so every read, a range
read included, fails with :class:`IntegrityError` on a damaged part, as a real node's
per-block checksums make it (:mod:`karma8.store.files`). The simulator's parts are small, so
hashing the whole part on every open is cheap.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import attrs
import trio

from karma8.core.errors import DiskFull, IntegrityError, NotFound, StorageFailure, UploadConflict
from karma8.ports import StoredPart


@attrs.define(kw_only=True)
class WriteFault:
    """Fail part writes between ``start`` and ``until`` (virtual seconds)."""

    start: float
    until: float
    probability: float = 1.0
    at_byte: int = 0

    def active(self, now: float) -> bool:
        return self.start <= now < self.until


@attrs.define
class _Part:
    data: bytes
    checksum: str


class MemoryDisk:
    """:class:`karma8.ports.PartStore` in memory."""

    def __init__(
        self,
        *,
        capacity_bytes: int,
        rng: random.Random,
        sleep: Callable[[float], Awaitable[None]],
        fsync_latency: float = 0.0005,
        read_chunk: int = 64 * 1024,
    ) -> None:
        self.capacity_bytes = capacity_bytes
        self.parts: dict[str, _Part] = {}
        self.quarantined: dict[str, _Part] = {}
        self.faults: list[WriteFault] = []
        self.full_until = 0.0
        self.failed_writes = 0
        self._rng = rng
        self._sleep = sleep
        self._fsync_latency = fsync_latency
        self._read_chunk = read_chunk
        self._used = 0
        self._in_flight = 0

    def _check_fault(self, written: int, incoming: int) -> None:
        now = trio.current_time()
        for fault in self.faults:
            if not fault.active(now) or written + incoming <= fault.at_byte:
                continue
            if fault.probability >= 1.0 or self._rng.random() < fault.probability:
                self.failed_writes += 1
                raise StorageFailure("injected write failure")

    async def create(self, key: str) -> _MemoryWriter:
        return _MemoryWriter(self, key)

    @asynccontextmanager
    async def open(
        self, key: str, *, offset: int, length: int
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        part = self.parts.get(key)
        if part is None:
            raise NotFound(f"part {key} is not on this node")
        if offset + length > len(part.data):
            raise IntegrityError(f"part {key} is shorter than {offset + length} bytes")
        if hashlib.sha256(part.data).hexdigest() != part.checksum:
            raise IntegrityError(f"part {key} does not match its checksum")
        yield _ChunkReader(part.data, offset, offset + length, self._read_chunk)

    async def stat(self, key: str) -> StoredPart | None:
        part = self.parts.get(key)
        return (
            None
            if part is None
            else StoredPart(key=key, size=len(part.data), checksum=part.checksum)
        )

    async def delete(self, key: str) -> bool:
        await trio.lowlevel.checkpoint()
        part = self.parts.pop(key, None)
        if part is None:
            return False
        self._used -= len(part.data)
        return True

    async def keys(self) -> list[str]:
        return sorted(self.parts)

    async def verify(self, key: str) -> bool:
        part = self.parts.get(key)
        if part is None:
            raise NotFound(f"part {key} is not on this node")
        await trio.lowlevel.checkpoint()
        return hashlib.sha256(part.data).hexdigest() == part.checksum

    async def quarantine(self, key: str) -> bool:
        part = self.parts.pop(key, None)
        if part is None:
            return False
        self.quarantined[key] = part
        self._used -= len(part.data)
        return True

    async def used_bytes(self) -> int:
        return self._used

    async def free_bytes(self) -> int:
        """0 while a ``disk_full`` event lasts; else the capacity not yet used (the
        simulated disk is as large as the node's quota)."""
        await trio.lowlevel.checkpoint()
        if trio.current_time() < self.full_until:
            return 0
        return max(0, self.capacity_bytes - self._used)

    @property
    def used(self) -> int:
        return self._used


class _ChunkReader:
    """Chunks of ``data[start:end]``. A class, not an async generator: a reader abandoned
    part-way (a Range read, a failed GET) then needs no finaliser task."""

    def __init__(self, data: bytes, start: int, end: int, chunk: int) -> None:
        self._data = data
        self._pos = start
        self._end = end
        self._chunk = chunk

    def __aiter__(self) -> _ChunkReader:
        return self

    async def __anext__(self) -> bytes:
        if self._pos >= self._end:
            raise StopAsyncIteration
        await trio.lowlevel.checkpoint()
        start, self._pos = self._pos, min(self._pos + self._chunk, self._end)
        if start == 0 and self._pos == len(self._data):
            return self._data
        return self._data[start : self._pos]


class _MemoryWriter:
    def __init__(self, disk: MemoryDisk, key: str) -> None:
        self._disk = disk
        self._key = key
        self._chunks: list[bytes] = []
        self._size = 0
        self._done = False

    async def write(self, data: bytes) -> None:
        disk = self._disk
        disk._check_fault(self._size, len(data))
        full = trio.current_time() < disk.full_until
        if full or disk._used + disk._in_flight + len(data) > disk.capacity_bytes:
            raise DiskFull("no space left on the node")
        self._chunks.append(bytes(data))
        self._size += len(data)
        disk._in_flight += len(data)

    async def commit(self) -> StoredPart:
        if self._done:
            raise trio.ClosedResourceError("part writer already committed or discarded")
        await self._disk._sleep(self._disk._fsync_latency)
        if self._key in self._disk.parts:  # parts are immutable, as on a real disk
            raise UploadConflict(f"part {self._key} already exists")
        data = b"".join(self._chunks)
        checksum = hashlib.sha256(data).hexdigest()
        self._release()
        self._disk.parts[self._key] = _Part(data=data, checksum=checksum)
        self._disk._used += len(data)
        return StoredPart(key=self._key, size=len(data), checksum=checksum)

    async def discard(self) -> None:
        self._release()
        await trio.lowlevel.checkpoint()

    def _release(self) -> None:
        if not self._done:
            self._done = True
            self._disk._in_flight -= self._size
            self._chunks = []
