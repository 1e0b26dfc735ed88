"""An in-memory disk for a simulated storage node, with injectable faults.

Committed parts survive a crash of their node (they were fsynced); writes still in progress do
not. Write faults fail a write at a byte offset or with a probability, during a time window;
the disk also fails writes when full. Reads yield chunks of ``read_chunk`` bytes.

Small parts (at most ``small_part_max`` bytes) are packed as a real node packs them
(:mod:`karma8.store.packed`): needles of the same format appended to an in-memory volume,
found through the same index, tombstones for deletes, compaction once half the volume is
garbage. A commit appends its needle, waits ``fsync_latency``, then indexes it; a node crash
(:meth:`MemoryDisk.crash`) loses the needles of commits still waiting (zeroed, a hole, or the
volume's tail torn within its header), and the disk recovers with the engine's own scan, which
skips holes and truncates the torn tail. Not modelled: several volumes and their roll-over,
compaction running concurrently with appends (here it runs at once, between them), and
write-back errors of the sync rounds.

Opening a part for reading first checks its bytes against its sha256, so every read, a range
read included, fails with :class:`IntegrityError` on a damaged part, as a real node's
per-block checksums make it (:mod:`karma8.store.files`). The simulator's parts are small, so
hashing the whole part on every open is cheap.
"""

from __future__ import annotations

import hashlib
import random
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager

import attrs
import trio

from karma8.core.errors import DiskFull, IntegrityError, NotFound, StorageFailure, UploadConflict
from karma8.ports import StoredPart
from karma8.store.packed.format import HEADER_SIZE, encode, encode_tombstone, scan
from karma8.store.packed.index import NeedleRef, PackedIndex

VOLUME = 1  # the one volume's id
# Its salt: the same on every simulated disk (a real volume's is random; what the salt keeps
# out, needles forged inside payloads, no simulated client writes).
SALT = b"karma8.s"
COMPACT_AFTER = 64 * 1024  # bytes a volume must reach before it is compacted


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
    """:class:`karma8.ports.PartStore` in memory: large parts as objects, small ones packed."""

    def __init__(
        self,
        *,
        capacity_bytes: int,
        rng: random.Random,
        sleep: Callable[[float], Awaitable[None]],
        fsync_latency: float = 0.0005,
        read_chunk: int = 64 * 1024,
        small_part_max: int = 64 * 1024,
    ) -> None:
        self.capacity_bytes = capacity_bytes
        self.files: dict[str, _Part] = {}  # parts over small_part_max, one object each
        self.quarantined: dict[str, _Part] = {}
        self.faults: list[WriteFault] = []
        self.full_until = 0.0
        self.failed_writes = 0
        self.small_part_max = small_part_max
        self.volume = bytearray()
        self.generation = 0
        self.index = PackedIndex()
        self.compactions = 0
        self.torn_bytes = 0  # dropped by crash recoveries
        self._unsynced: dict[int, int] = {}  # offset -> end of needles whose commit waits
        self._pending: set[str] = set()
        self._epoch = 0  # crashes so far: a commit that spans one never completes
        self._rng = rng
        self._sleep = sleep
        self._fsync_latency = fsync_latency
        self._read_chunk = read_chunk
        self._used = 0
        self._in_flight = 0

    @property
    def parts(self) -> Mapping[str, _Part | _PackedPart]:
        """Every committed part by key, packed or not (``data`` may be rewritten to damage
        it, as a test or fault does to bytes on a real disk)."""
        return _PartsView(self)

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
        ref = self.index.get(key)
        if ref is not None:
            data = self._payload(ref)
            if zlib.crc32(data) != ref.crc:
                raise IntegrityError(f"part {key} does not match its checksum")
            checksum = ref.sha256.hex()
        else:
            part = self.files.get(key)
            if part is None:
                raise NotFound(f"part {key} is not on this node")
            data, checksum = part.data, part.checksum
            if hashlib.sha256(data).hexdigest() != checksum:
                raise IntegrityError(f"part {key} does not match its checksum")
        if offset + length > len(data):
            raise IntegrityError(f"part {key} is shorter than {offset + length} bytes")
        yield _ChunkReader(data, offset, offset + length, self._read_chunk)

    async def stat(self, key: str) -> StoredPart | None:
        ref = self.index.get(key)
        if ref is not None:
            return StoredPart(key=key, size=ref.length, checksum=ref.sha256.hex())
        part = self.files.get(key)
        return (
            None
            if part is None
            else StoredPart(key=key, size=len(part.data), checksum=part.checksum)
        )

    async def delete(self, key: str) -> bool:
        await trio.lowlevel.checkpoint()
        return self._remove(key) is not None

    def wipe(self) -> list[str]:
        """Lose every part (a disk replaced): the keys that were on it."""
        keys = sorted(self.parts)
        for key in keys:
            self._remove(key)
        return keys

    def _remove(self, key: str) -> bytes | None:
        """Take a part out (a tombstone for a packed one, durable at once); its bytes."""
        ref = self.index.get(key)
        if ref is not None:
            data = self._payload(ref)
            self._append(encode_tombstone(key, salt=SALT))
            self.index.remove(key)
            self._used -= ref.length
            self._maybe_compact()
            return data
        part = self.files.pop(key, None)
        if part is None:
            return None
        self._used -= len(part.data)
        return part.data

    async def keys(self) -> list[str]:
        return sorted({*self.files, *self.index.keys()})

    async def verify(self, key: str) -> bool:
        await trio.lowlevel.checkpoint()
        ref = self.index.get(key)
        if ref is not None:
            data = self._payload(ref)
            return zlib.crc32(data) == ref.crc and hashlib.sha256(data).digest() == ref.sha256
        part = self.files.get(key)
        if part is None:
            raise NotFound(f"part {key} is not on this node")
        return hashlib.sha256(part.data).hexdigest() == part.checksum

    def close(self) -> None:
        """Nothing to release: the disk is memory."""

    async def quarantine(self, key: str) -> bool:
        stored = self.parts.get(key)
        if stored is None:
            return False
        checksum = stored.checksum
        data = self._remove(key)
        assert data is not None
        self.quarantined[key] = _Part(data=data, checksum=checksum)
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

    # -- the packed volume --------------------------------------------------------------------

    def _payload(self, ref: NeedleRef) -> bytes:
        return bytes(self.volume[ref.data_offset : ref.data_offset + ref.length])

    def _append(self, needle: bytes) -> int:
        offset = len(self.volume)
        self.volume += needle
        return offset

    async def _commit_packed(self, key: str, data: bytes) -> StoredPart:
        """Append a needle, wait for its sync, then index it (see the module doc)."""
        if key in self.files or key in self.index or key in self._pending:
            raise UploadConflict(f"part {key} already exists")
        sha256 = hashlib.sha256(data).digest()
        needle = encode(key, data, sha256=sha256, salt=SALT)
        epoch = self._epoch
        self._pending.add(key)
        offset = self._append(needle)
        self._unsynced[offset] = offset + len(needle)
        synced = False
        try:
            await self._sleep(self._fsync_latency)
            synced = True
        finally:
            self._pending.discard(key)
            if self._epoch == epoch:
                end = self._unsynced.pop(offset)
                if not synced:  # cancelled before its sync: as if never written, a hole
                    self.volume[offset:end] = bytes(end - offset)
        if self._epoch != epoch:
            raise StorageFailure("the node crashed before the part was durable")
        self.index.add(
            NeedleRef(
                key=key,
                volume=VOLUME,
                generation=self.generation,
                offset=offset,
                size=len(needle),
                length=len(data),
                data_offset=offset + HEADER_SIZE + len(key.encode()),
                crc=zlib.crc32(data),
                sha256=sha256,
            )
        )
        self._used += len(data)
        return StoredPart(key=key, size=len(data), checksum=sha256.hex())

    def crash(self) -> None:
        """The node died: needles not yet synced are lost (zeroed; the volume's last one
        may instead be torn in its header), then the disk recovers by scanning."""
        self._epoch += 1
        tail = len(self.volume)
        for offset, end in sorted(self._unsynced.items()):
            keep = 0
            if end == tail and self._rng.random() < 0.5:
                # Torn inside the header: a tail that completed by chance would bring back
                # a part whose commit failed, which a real disk may do but the checker's
                # reference model does not allow.
                keep = self._rng.randrange(HEADER_SIZE)
            self.volume[offset + keep : end] = bytes(end - offset - keep)
        self._unsynced.clear()
        self._pending.clear()
        image = bytes(self.volume)
        found = scan(lambda at, n: image[at : at + n], len(image), SALT)
        self.torn_bytes += len(image) - found.end
        del self.volume[found.end :]
        self.index = PackedIndex()
        self.index.load(VOLUME, self.generation, found.needles)
        self._used = self.index.payload_bytes + sum(len(p.data) for p in self.files.values())

    def _maybe_compact(self) -> None:
        """Rewrite the volume with its live needles once half of it is garbage (at once:
        only when no commit is waiting, so no offset moves under one)."""
        if len(self.volume) < COMPACT_AFTER or self._pending:
            return
        if self.index.live_bytes(VOLUME) * 2 > len(self.volume):
            return
        compacted = bytearray()
        self.generation += 1
        for ref in self.index.refs_in(VOLUME):
            moved = ref.moved(self.generation, len(compacted))
            compacted += self.volume[ref.offset : ref.offset + ref.size]
            self.index.move(ref, moved)
        self.volume = compacted
        self.compactions += 1


class _PackedPart:
    """A packed part as a view of its needle in the volume."""

    def __init__(self, disk: MemoryDisk, ref: NeedleRef) -> None:
        self._disk = disk
        self._ref = ref

    @property
    def checksum(self) -> str:
        return self._ref.sha256.hex()

    @property
    def data(self) -> bytes:
        return self._disk._payload(self._ref)

    @data.setter
    def data(self, value: bytes) -> None:
        assert len(value) == self._ref.length, "damage keeps the length"
        start = self._ref.data_offset
        self._disk.volume[start : start + len(value)] = value


class _PartsView(Mapping[str, "_Part | _PackedPart"]):
    def __init__(self, disk: MemoryDisk) -> None:
        self._disk = disk

    def __getitem__(self, key: str) -> _Part | _PackedPart:
        ref = self._disk.index.get(key)
        if ref is not None:
            return _PackedPart(self._disk, ref)
        return self._disk.files[key]

    def __iter__(self) -> Iterator[str]:
        yield from self._disk.files
        yield from self._disk.index.keys()

    def __len__(self) -> int:
        return len(self._disk.files) + len(self._disk.index)


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
        disk = self._disk
        data = b"".join(self._chunks)
        if len(data) <= disk.small_part_max:
            stored = await disk._commit_packed(self._key, data)
            self._release()
            return stored
        await disk._sleep(disk._fsync_latency)
        if self._key in disk.parts:  # parts are immutable, as on a real disk
            raise UploadConflict(f"part {self._key} already exists")
        checksum = hashlib.sha256(data).hexdigest()
        self._release()
        disk.files[self._key] = _Part(data=data, checksum=checksum)
        disk._used += len(data)
        return StoredPart(key=self._key, size=len(data), checksum=checksum)

    async def discard(self) -> None:
        self._release()
        await trio.lowlevel.checkpoint()

    def _release(self) -> None:
        if not self._done:
            self._done = True
            self._disk._in_flight -= self._size
            self._chunks = []
