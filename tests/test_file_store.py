"""The file-backed part store (karma8.store.files.store) on a real temporary directory."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from karma8.core.errors import DiskFull, IntegrityError, NotFound, StorageFailure, UploadConflict
from karma8.ports import PartStore, StoredPart
from karma8.store import groupsync
from karma8.store.diskio import pread_exact
from karma8.store.files import reader
from karma8.store.files.format import BLOCK, HEADER_SIZE
from karma8.store.files.store import FilePartStore
from karma8.store.groupsync import GroupSync, SyncGroups

MIB = 1 << 20
BIG = 1 << 30


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes that differ at every position (catches off-by-one reads)."""
    return bytes((seed + i * 7 + i // 251) % 256 for i in range(size))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def put(store: PartStore, key: str, data: bytes, *, chunk: int = 4096) -> StoredPart:
    writer = await store.create(key)
    try:
        for pos in range(0, len(data), chunk):
            await writer.write(data[pos : pos + chunk])
        stored = await writer.commit()
    except BaseException:
        with trio.CancelScope(shield=True):
            await writer.discard()
        raise
    assert stored == StoredPart(key=key, size=len(data), checksum=sha(data))
    return stored


async def read(store: PartStore, key: str, offset: int, length: int) -> list[bytes]:
    async with store.open(key, offset=offset, length=length) as chunks:
        return [chunk async for chunk in chunks]


def flip_bit(path: Path, pos: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0x01]))


def tmp_files(root: Path) -> list[str]:
    return sorted(os.listdir(root / "tmp"))


def new_store(root: Path, **kwargs: Any) -> FilePartStore:
    kwargs.setdefault("capacity_bytes", BIG)
    return FilePartStore(root, **kwargs)


@pytest.mark.parametrize("size", [0, 1, 5, MIB + 3])
async def test_round_trip(tmp_path: Path, size: int) -> None:
    store: PartStore = new_store(tmp_path)
    data = payload(size)
    await put(store, "9f3a0c1d2e4b5a67.3", data)
    assert await store.stat("9f3a0c1d2e4b5a67.3") == StoredPart(
        key="9f3a0c1d2e4b5a67.3", size=size, checksum=sha(data)
    )
    assert b"".join(await read(store, "9f3a0c1d2e4b5a67.3", 0, size)) == data
    assert await store.used_bytes() == size
    assert await store.keys() == ["9f3a0c1d2e4b5a67.3"]
    assert tmp_files(tmp_path) == []


async def test_one_big_write_and_many_tiny_writes(tmp_path: Path) -> None:
    store = new_store(tmp_path, write_buffer=1000)
    big = payload(3 * MIB + 1, seed=1)
    tiny = payload(5000, seed=2)
    await put(store, "a.0", big, chunk=len(big))
    await put(store, "a.1", tiny, chunk=1)
    assert b"".join(await read(store, "a.0", 0, len(big))) == big
    assert b"".join(await read(store, "a.1", 0, len(tiny))) == tiny
    assert await store.verify("a.0")
    assert await store.verify("a.1")


async def test_range_reads_and_read_chunk(tmp_path: Path) -> None:
    store = new_store(tmp_path, read_chunk=10)
    data = payload(95)
    await put(store, "k.0", data)
    for offset, length in [(0, 95), (0, 0), (3, 7), (10, 10), (17, 41), (94, 1), (95, 0)]:
        chunks = await read(store, "k.0", offset, length)
        assert b"".join(chunks) == data[offset : offset + length]
        assert all(0 < len(c) <= 10 for c in chunks)
        assert len(chunks) == -(-length // 10)


async def test_range_past_the_end_and_missing_part(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    await put(store, "k.0", payload(10))
    with pytest.raises(IntegrityError):
        await read(store, "k.0", 5, 6)
    with pytest.raises(NotFound):
        await read(store, "nope.0", 0, 0)
    assert await store.stat("nope.0") is None
    with pytest.raises(NotFound):
        await store.verify("nope.0")


async def test_part_visible_only_after_commit(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    data = payload(100)
    writer = await store.create("v.1")
    await writer.write(data)
    assert await store.keys() == []
    assert await store.stat("v.1") is None
    assert await store.used_bytes() == 0
    with pytest.raises(NotFound):
        await read(store, "v.1", 0, 0)
    assert tmp_files(tmp_path) == []  # less than the write buffer: not on disk before commit
    await writer.commit()
    assert await store.keys() == ["v.1"]
    assert await store.stat("v.1") == StoredPart(key="v.1", size=100, checksum=sha(data))
    assert tmp_files(tmp_path) == []
    await writer.discard()  # no-op after commit
    assert await store.keys() == ["v.1"]


async def test_writers_use_distinct_temporaries(tmp_path: Path) -> None:
    store = new_store(tmp_path, write_buffer=2)
    first = await store.create("same.0")
    second = await store.create("same.0")
    assert tmp_files(tmp_path) == []  # created by the first flush
    await first.write(b"one")
    await second.write(b"two")
    assert len(tmp_files(tmp_path)) == 2
    assert (await first.commit()).checksum == sha(b"one")
    with pytest.raises(UploadConflict):
        await second.commit()
    with pytest.raises(trio.ClosedResourceError):  # a failed commit is not retried
        await second.commit()
    await second.discard()
    assert tmp_files(tmp_path) == []
    assert b"".join(await read(store, "same.0", 0, 3)) == b"one"
    assert await store.used_bytes() == 3


async def test_discard_removes_temporary_and_is_idempotent(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    writer = await store.create("d.0")
    await writer.write(payload(3 * MIB))
    assert len(tmp_files(tmp_path)) == 1
    await writer.discard()
    assert tmp_files(tmp_path) == []
    await writer.discard()
    assert await store.keys() == []
    assert store.in_flight_bytes == 0
    with pytest.raises(trio.ClosedResourceError):
        await writer.write(b"x")


@pytest.mark.parametrize("size", [10, 3 * MIB])
async def test_a_temporary_that_cannot_be_created_fails_cleanly(tmp_path: Path, size: int) -> None:
    # The temporary is created late (first flush, or commit for a small part): the failure
    # surfaces there as a StorageFailure, and nothing becomes visible or stays counted.
    store = new_store(tmp_path)
    await put(store, "ok.0", payload(10))
    (tmp_path / "tmp").rmdir()
    with pytest.raises(StorageFailure):
        await put(store, "bad.0", payload(size))
    assert await store.keys() == ["ok.0"]
    assert store.in_flight_bytes == 0
    assert await store.used_bytes() == 10
    (tmp_path / "tmp").mkdir()
    await put(store, "bad.0", payload(size))  # the disk is back: the same key works
    assert b"".join(await read(store, "bad.0", 0, size)) == payload(size)


async def test_discarding_a_write_that_never_flushed(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    writer = await store.create("n.0")
    await writer.write(payload(1000))
    assert store.in_flight_bytes == 1000
    await writer.discard()
    assert store.in_flight_bytes == 0
    assert tmp_files(tmp_path) == []
    assert await store.keys() == []
    with pytest.raises(trio.ClosedResourceError):
        await writer.commit()


async def test_cancelled_write_is_discarded(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    written = 0
    with trio.CancelScope() as scope:
        writer = await store.create("c.0")
        try:
            while True:
                await writer.write(b"z" * 65536)
                written += 65536
                if written >= 3 * MIB:
                    scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await writer.discard()
    assert scope.cancelled_caught
    assert tmp_files(tmp_path) == []
    assert store.in_flight_bytes == 0
    assert await store.keys() == []


async def test_reopened_store_sees_the_same_parts(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    parts = {f"{i:016x}.{i % 5}": payload(i * 1000 + 1, seed=i) for i in range(12)}
    for key, data in parts.items():
        await put(store, key, data)
    pending = await store.create("pending.0")
    await pending.write(payload(2 * MIB))  # more than the write buffer: flushed to tmp/
    assert len(tmp_files(tmp_path)) == 1
    used = await store.used_bytes()
    assert used == sum(len(d) for d in parts.values())

    # A new process on the same directory (the old one "died" with a write in progress).
    again = new_store(tmp_path)
    assert again.cleaned_temporaries == 1
    assert tmp_files(tmp_path) == []
    assert await again.keys() == sorted(parts)
    assert await again.used_bytes() == used
    for key, data in parts.items():
        assert await again.stat(key) == StoredPart(key=key, size=len(data), checksum=sha(data))
        assert b"".join(await read(again, key, 0, len(data))) == data
        assert await again.verify(key)


async def test_truncated_part_raises_integrity_error(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    data = payload(1000)
    await put(store, "t.0", data)
    path = store.part_path("t.0")
    os.truncate(path, HEADER_SIZE + 500)
    with pytest.raises(IntegrityError):
        await read(store, "t.0", 0, 10)
    assert not await store.verify("t.0")
    # The header is intact, so stat still reports what was recorded.
    assert await store.stat("t.0") == StoredPart(key="t.0", size=1000, checksum=sha(data))
    # A header cut short is damage too.
    os.truncate(path, 10)
    with pytest.raises(IntegrityError):
        await read(store, "t.0", 0, 0)
    with pytest.raises(IntegrityError):
        await store.stat("t.0")


async def test_truncation_while_reading_raises_integrity_error(tmp_path: Path) -> None:
    # Several blocks: the reader has read (and verified) only the first when the file shrinks.
    store = new_store(tmp_path, read_chunk=100)
    await put(store, "t.1", payload(3 * BLOCK))
    async with store.open("t.1", offset=0, length=3 * BLOCK) as chunks:
        assert len(await chunks.__anext__()) == 100
        os.truncate(store.part_path("t.1"), HEADER_SIZE + BLOCK + 150)
        with pytest.raises(IntegrityError):
            async for _ in chunks:
                pass


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_readers_and_writers_close_their_files(tmp_path: Path) -> None:
    store = new_store(tmp_path, read_chunk=10)
    await put(store, "r.0", payload(100))
    before = open_fds()
    async with store.open("r.0", offset=0, length=100) as chunks:
        assert len(await chunks.__anext__()) == 10  # abandoned part-way
    with pytest.raises(trio.ClosedResourceError):
        await chunks.__anext__()
    with pytest.raises(IntegrityError):
        await read(store, "r.0", 0, 101)
    with pytest.raises(NotFound):
        await read(store, "r.1", 0, 1)
    await store.stat("r.0")
    await store.verify("r.0")
    await put(store, "r.2", payload(10))
    with pytest.raises(UploadConflict):
        await put(store, "r.2", payload(10))
    writer = await store.create("r.3")
    await writer.discard()
    assert open_fds() == before


async def test_flipped_byte_fails_verify(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    await put(store, "f.0", payload(5000))
    await put(store, "f.1", payload(5000))
    assert await store.verify("f.0")
    flip_bit(store.part_path("f.0"), HEADER_SIZE + 1234)
    assert not await store.verify("f.0")
    assert await store.verify("f.1")
    # A damaged header is detected by its CRC.
    flip_bit(store.part_path("f.1"), 20)
    assert not await store.verify("f.1")
    with pytest.raises(IntegrityError):
        await store.stat("f.1")


async def test_disk_full_counts_committed_and_in_flight_bytes(tmp_path: Path) -> None:
    store = new_store(tmp_path, capacity_bytes=100)
    await put(store, "full.0", payload(60))
    writer = await store.create("full.1")
    await writer.write(payload(30))
    other = await store.create("full.2")
    with pytest.raises(DiskFull):
        await other.write(payload(11))
    await other.write(payload(10))  # exactly at capacity
    with pytest.raises(DiskFull):
        await other.write(b"x")
    await other.discard()
    await writer.write(payload(10))  # the discarded bytes were released
    await writer.discard()
    assert store.in_flight_bytes == 0
    assert await store.used_bytes() == 60
    with pytest.raises(DiskFull):
        await put(store, "full.3", payload(41))
    assert tmp_files(tmp_path) == []
    assert await store.keys() == ["full.0"]


async def test_delete_is_idempotent(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    await put(store, "del.0", payload(77))
    await put(store, "del.1", payload(23))
    assert await store.used_bytes() == 100
    assert await store.delete("del.0")
    assert not await store.delete("del.0")
    assert not await store.delete("never.0")
    assert await store.used_bytes() == 23
    assert await store.keys() == ["del.1"]
    assert await store.stat("del.0") is None
    assert not store.part_path("del.0").exists()
    assert await new_store(tmp_path).used_bytes() == 23


async def test_fan_out_nests_parts_two_levels_deep(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    keys = [f"{i:016x}.{i % 5}" for i in range(64)]
    for key in keys:
        await put(store, key, key.encode())
    assert await store.keys() == sorted(keys)
    parts = tmp_path / "parts"
    leaves = set()
    for key in keys:
        relative = store.part_path(key).relative_to(parts)
        assert len(relative.parts) == 3
        first, second, name = relative.parts
        assert name == key
        assert len(first) == len(second) == 2
        int(first + second, 16)
        leaves.add((first, second))
    assert len(leaves) > 32  # hashed, not grouped by version
    assert all(p.is_dir() for p in parts.iterdir())
    assert store.part_path(keys[0]).read_bytes()[:6] == b"K8PART"


# -- per-block checksums ----------------------------------------------------------------------

MULTI = 3 * BLOCK + 123  # three whole blocks and a short last one


def trailer_size(length: int) -> int:
    return 4 * -(-length // BLOCK)


def file_size(path: Path) -> int:
    return os.path.getsize(path)


def block_ranges(size: int) -> list[tuple[int, int]]:
    """Offsets and lengths around every block boundary of a ``size``-byte part, and more."""
    ranges = [(0, 0), (0, 1), (0, size), (1, size - 1), (size - 1, 1), (size, 0)]
    for boundary in range(BLOCK, size, BLOCK):
        ranges += [
            (boundary, 0),
            (boundary - 1, 1),
            (boundary, 1),
            (boundary - 1, 2),
            (boundary - BLOCK, BLOCK),  # exactly one whole block
            (boundary - 5, BLOCK + 10),  # three blocks, two of them barely
        ]
    ranges += [
        (10, 100),  # inside one block
        (100, 2 * BLOCK),  # across several blocks
        (3 * BLOCK, size - 3 * BLOCK),  # the last, short block
        (3 * BLOCK + 100, size - 3 * BLOCK - 100),  # inside the last block, to the end
    ]
    rng = random.Random(8)
    for _ in range(40):
        offset = rng.randrange(size + 1)
        ranges.append((offset, rng.randrange(size - offset + 1)))
    return [(offset, min(length, size - offset)) for offset, length in ranges]


@pytest.mark.parametrize("inline_io", [0, 1 << 16])  # 0: every read in a thread, read ahead
@pytest.mark.parametrize("read_chunk", [7, 1000, BLOCK, MIB])
async def test_range_reads_across_blocks_return_the_right_bytes(
    tmp_path: Path, read_chunk: int, inline_io: int
) -> None:
    store = new_store(tmp_path, read_chunk=read_chunk, inline_io=inline_io)
    data = payload(MULTI, seed=5)
    await put(store, "b.0", data, chunk=5000)
    for offset, length in block_ranges(MULTI):
        chunks = await read(store, "b.0", offset, length)
        assert b"".join(chunks) == data[offset : offset + length], (offset, length)
        assert len(chunks) == -(-length // read_chunk)
        assert all(len(c) == read_chunk for c in chunks[:-1])
    assert await store.verify("b.0")


@pytest.mark.parametrize("size", [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK, 5 * BLOCK + 7])
async def test_trailer_size_and_used_bytes_count_only_the_payload(
    tmp_path: Path, size: int
) -> None:
    store = new_store(tmp_path, write_buffer=3000)
    data = payload(size, seed=size)
    await put(store, "u.0", data, chunk=4099)  # blocks straddle the writer's flushes
    assert file_size(store.part_path("u.0")) == HEADER_SIZE + size + trailer_size(size)
    assert await store.used_bytes() == size
    assert await store.verify("u.0")
    assert b"".join(await read(store, "u.0", 0, size)) == data
    again = new_store(tmp_path)
    assert await again.used_bytes() == size
    assert await again.delete("u.0")
    assert await again.used_bytes() == 0


async def test_flipped_byte_fails_the_range_reads_that_cover_it(tmp_path: Path) -> None:
    store = new_store(tmp_path, read_chunk=100)
    data = payload(MULTI, seed=3)
    await put(store, "x.0", data)
    bad = BLOCK + 1000  # in block 1
    flip_bit(store.part_path("x.0"), HEADER_SIZE + bad)
    for offset, length in [
        (bad, 1),
        (bad - 1, 3),
        (BLOCK, BLOCK),
        (500, 2 * BLOCK),
        (BLOCK + 5000, 10),  # same block, other bytes: the block as a whole is suspect
    ]:
        with pytest.raises(IntegrityError, match="block checksums"):
            await read(store, "x.0", offset, length)
    with pytest.raises(IntegrityError, match="block checksums"):
        await read(store, "x.0", 0, MULTI)  # the whole part: the same block checks
    assert not await store.verify("x.0")
    # Other blocks still read fine.
    for offset, length in [(0, BLOCK), (10, 100), (2 * BLOCK, MULTI - 2 * BLOCK), (MULTI - 1, 1)]:
        assert b"".join(await read(store, "x.0", offset, length)) == data[offset : offset + length]
    # No byte of the damaged block is handed out: the read stops at the block boundary.
    async with store.open("x.0", offset=BLOCK - 250, length=500) as chunks:
        got = [await chunks.__anext__(), await chunks.__anext__()]
        assert b"".join(got) == data[BLOCK - 250 : BLOCK - 50]
        with pytest.raises(IntegrityError):
            await chunks.__anext__()


class SlowReads:
    """Holds every ``pread`` of part bytes from file offset ``at`` on, until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: int) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        real = pread_exact

        def held(fd: int, size: int, pos: int) -> bytes:
            if pos >= at:
                self.started.set()
                self.release.wait(10)
            return real(fd, size, pos)

        monkeypatch.setattr(reader, "pread_exact", held)


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


async def test_a_reader_closed_during_its_read_ahead_closes_the_file_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = new_store(tmp_path, read_chunk=BLOCK, inline_io=0)
    data = payload(MULTI, seed=6)
    await put(store, "ra.0", data)
    slow = SlowReads(monkeypatch, at=HEADER_SIZE + 2 * BLOCK)
    async with store.open("ra.0", offset=0, length=MULTI) as chunks:
        assert await chunks.__anext__() == data[:BLOCK]
        assert await chunks.__anext__() == data[BLOCK : 2 * BLOCK]  # and block 2 is read ahead
        assert await trio.to_thread.run_sync(slow.started.wait, 120)
        fd, ahead = chunks._fd, chunks._ahead
        assert fd is not None
        assert ahead is not None
    limiter = trio.to_thread.current_default_thread_limiter()
    assert limiter.borrowed_tokens == 1  # the read-ahead's, while it runs
    # Closed while the read-ahead runs: the descriptor stays open (a reused number would be
    # read by that pread) until the read ends, and then it is closed.
    assert fd_is_open(fd)
    slow.release.set()

    def closed_soon() -> bool:
        deadline = time.monotonic() + 120  # a guard against a hang
        while fd_is_open(fd) and time.monotonic() < deadline:
            time.sleep(0.01)
        return not fd_is_open(fd)

    assert await trio.to_thread.run_sync(closed_soon)
    await ahead.wait()
    assert limiter.borrowed_tokens == 0  # and its token is back


async def test_read_ahead_leaves_thread_tokens_for_other_work(tmp_path: Path) -> None:
    store = new_store(tmp_path, read_chunk=BLOCK, inline_io=0)
    data = payload(MULTI, seed=5)
    await put(store, "rt.0", data)
    limiter = trio.to_thread.current_default_thread_limiter()
    assert b"".join(await read(store, "rt.0", 0, MULTI)) == data
    assert limiter.borrowed_tokens == 0
    # With more than half of the tokens taken, readers read only when asked.
    hogs = [object() for _ in range(int(limiter.total_tokens) // 2 + 1)]
    for hog in hogs:
        limiter.acquire_on_behalf_of_nowait(hog)
    try:
        async with store.open("rt.0", offset=0, length=MULTI) as chunks:
            assert await chunks.__anext__() == data[:BLOCK]
            assert chunks._ahead is None
            got = [data[:BLOCK]] + [chunk async for chunk in chunks]
        assert b"".join(got) == data
    finally:
        for hog in hogs:
            limiter.release_on_behalf_of(hog)


async def test_a_read_cancelled_while_its_read_ahead_runs_resumes_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A version-1 part: its whole-part read hashes every block once, in order, so a block
    # dropped or read twice after the cancellation would fail the read.
    store = new_store(tmp_path, read_chunk=1000, inline_io=0)
    data = payload(MULTI, seed=7)
    write_version_1(store, "rc.0", data)
    slow = SlowReads(monkeypatch, at=HEADER_SIZE + 2000)
    async with store.open("rc.0", offset=0, length=MULTI) as chunks:
        got = [await chunks.__anext__()]
        got.append(await chunks.__anext__())  # and bytes 2000..2999 are read ahead
        assert await trio.to_thread.run_sync(slow.started.wait, 120)
        with trio.move_on_after(0.05) as scope:
            await chunks.__anext__()
        assert scope.cancelled_caught
        slow.release.set()
        got += [chunk async for chunk in chunks]
    assert b"".join(got) == data


async def test_a_failed_read_ahead_fails_the_next_chunk(tmp_path: Path) -> None:
    store = new_store(tmp_path, read_chunk=BLOCK, inline_io=0)
    data = payload(MULTI, seed=8)
    await put(store, "rf.0", data)
    flip_bit(store.part_path("rf.0"), HEADER_SIZE + 2 * BLOCK + 9)
    async with store.open("rf.0", offset=0, length=MULTI) as chunks:
        assert await chunks.__anext__() == data[:BLOCK]
        assert await chunks.__anext__() == data[BLOCK : 2 * BLOCK]
        assert chunks._ahead is not None  # block 2 is being read ahead: its check fails
        with pytest.raises(IntegrityError, match="block checksums"):
            await chunks.__anext__()


async def test_a_damaged_trailer_is_detected(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    data = payload(MULTI, seed=4)
    await put(store, "tr.0", data)
    await put(store, "tr.1", data)
    path = store.part_path("tr.0")
    flip_bit(path, HEADER_SIZE + MULTI + 5)  # the second block's CRC
    for offset, length in [(0, 0), (0, 10), (3 * BLOCK, 10)]:
        with pytest.raises(IntegrityError, match="trailer"):
            await read(store, "tr.0", offset, length)
    assert not await store.verify("tr.0")
    assert await store.stat("tr.0") == StoredPart(key="tr.0", size=MULTI, checksum=sha(data))
    # A trailer cut short is truncation, found on open.
    path = store.part_path("tr.1")
    os.truncate(path, HEADER_SIZE + MULTI + trailer_size(MULTI) - 1)
    with pytest.raises(IntegrityError, match="truncated"):
        await read(store, "tr.1", 0, 10)
    assert not await store.verify("tr.1")
    # The header's block size is covered by the header CRC.
    await put(store, "tr.2", data)
    flip_bit(store.part_path("tr.2"), 85)
    with pytest.raises(IntegrityError, match="damaged header"):
        await store.stat("tr.2")


def write_version_1(store: FilePartStore, key: str, data: bytes) -> Path:
    """A part file as the first format wrote it: 80 bytes, their CRC, 12 zeros, the payload."""
    body = struct.pack("!6sH64sQ", b"K8PART", 1, sha(data).encode("ascii"), len(data))
    header = body + struct.pack("!I", zlib.crc32(body)) + bytes(12)
    assert len(header) == HEADER_SIZE
    path = store.part_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + data)
    return path


async def test_version_1_parts_still_read(tmp_path: Path) -> None:
    store = new_store(tmp_path, read_chunk=1000)
    data = payload(MULTI, seed=9)
    path = write_version_1(store, "old.0", data)
    write_version_1(store, "old.1", data)
    store = new_store(tmp_path, read_chunk=1000)
    # Counted from file sizes as if version 2: short by at most 4 bytes per block.
    used = await store.used_bytes()
    assert 2 * (MULTI - trailer_size(MULTI)) <= used <= 2 * MULTI
    assert await store.stat("old.0") == StoredPart(key="old.0", size=MULTI, checksum=sha(data))
    for offset, length in block_ranges(MULTI):
        chunks = await read(store, "old.0", offset, length)
        assert b"".join(chunks) == data[offset : offset + length], (offset, length)
        assert all(len(c) == 1000 for c in chunks[:-1])
    assert await store.verify("old.0")
    flip_bit(path, HEADER_SIZE + 77)
    assert not await store.verify("old.0")  # the sha256 still guards version-1 parts
    with pytest.raises(IntegrityError, match="does not match its checksum"):
        await read(store, "old.0", 0, MULTI)  # and every whole-part read of them
    os.truncate(store.part_path("old.1"), HEADER_SIZE + MULTI - 1)
    with pytest.raises(IntegrityError, match="truncated"):
        await read(store, "old.1", 0, 1)
    assert await store.delete("old.0")
    assert await store.used_bytes() == used // 2  # what was counted for it on start


# -- durability paths -------------------------------------------------------------------------

# Every store option that changes how bytes reach the disk: group sync (default) or an fsync
# per file and directory; small calls inline (default) or every call in a thread.
DURABILITY = [
    {"group_sync": True},
    {"group_sync": False},
    {"group_sync": True, "inline_io": 0},
]


@pytest.mark.parametrize("options", DURABILITY, ids=["group", "fsync", "threads"])
@pytest.mark.parametrize("size", [0, 7, 70_000, MIB + 3])
async def test_every_durability_path_round_trips(
    tmp_path: Path, options: dict[str, Any], size: int
) -> None:
    store = new_store(tmp_path, **options)
    data = payload(size, seed=size)
    await put(store, "d.0", data)
    assert b"".join(await read(store, "d.0", 0, size)) == data
    assert await store.verify("d.0")
    again = new_store(tmp_path, **options)  # as after a restart
    assert b"".join(await read(again, "d.0", 0, size)) == data
    assert tmp_files(tmp_path) == []


@pytest.mark.skipif(GroupSync.open(Path(".")) is None, reason="syncfs is Linux only")
async def test_concurrent_commits_share_sync_rounds(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    group = store.group_sync
    assert group is not None
    before = group.rounds
    async with trio.open_nursery() as nursery:
        for i in range(40):
            nursery.start_soon(put, store, f"g.{i}", payload(100, seed=i))
    assert sorted(await store.keys()) == sorted(f"g.{i}" for i in range(40))
    # 40 commits, and far fewer syncs (each round covers every commit waiting for it).
    assert 1 <= group.rounds - before < 20


@pytest.mark.skipif(GroupSync.open(Path(".")) is None, reason="syncfs is Linux only")
async def test_large_writes_start_early_sync_rounds_that_nobody_waits_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(groupsync, "EARLY_SYNC_BYTES", 3 * MIB)
    store = new_store(tmp_path)
    group = store.group_sync
    assert group is not None
    writer = await store.create("e.0")
    await writer.write(payload(2 * MIB))  # one 2 MiB flush: below the threshold
    await trio.testing.wait_all_tasks_blocked()
    assert group.ticket() == 1  # no round has started
    await writer.write(payload(MIB, seed=1))  # 3 MiB: a round starts, not awaited
    await trio.testing.wait_all_tasks_blocked()
    assert group.ticket() == 2
    await group.sync(ticket=1)  # (let it finish: the next write finds no round running)
    await writer.write(payload(MIB, seed=2))  # counting started again with that round
    await trio.testing.wait_all_tasks_blocked()
    assert group.ticket() == 2
    assert await writer.commit() == StoredPart(
        key="e.0",
        size=4 * MIB,
        checksum=sha(payload(2 * MIB) + payload(MIB, seed=1) + payload(MIB, seed=2)),
    )
    assert group.rounds >= 2  # the early round, and the one the commit waited for


@pytest.mark.skipif(GroupSync.open(Path(".")) is None, reason="syncfs is Linux only")
@pytest.mark.parametrize("error", [OSError(errno.EIO, "Input/output error"), ValueError("bug")])
async def test_a_failed_early_round_fails_the_commits_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    monkeypatch.setattr(groupsync, "EARLY_SYNC_BYTES", 2 * MIB)
    store = new_store(tmp_path)
    group = store.group_sync
    assert group is not None

    def failing_sync() -> None:
        raise error

    monkeypatch.setattr(group, "_sync", failing_sync)
    writer = await store.create("ef.0")
    await writer.write(payload(2 * MIB))  # starts an early round, which fails
    await trio.testing.wait_all_tasks_blocked()
    monkeypatch.undo()  # the disk "recovers"; the failure is remembered (fail-stop)
    with pytest.raises(StorageFailure):
        await writer.commit()
    await writer.discard()
    assert await store.keys() == []


@pytest.mark.skipif(GroupSync.open(Path(".")) is None, reason="syncfs is Linux only")
async def test_a_failed_sync_fails_the_commit_and_every_later_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = new_store(tmp_path)
    group = store.group_sync
    assert group is not None

    def failing_syncfs() -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(group, "_sync", failing_syncfs)
    with pytest.raises(StorageFailure):
        await put(store, "f.0", payload(10))
    assert await store.stat("f.0") is None  # not durable, so not visible
    monkeypatch.undo()  # the disk "recovers": write-back errors are still fail-stop
    with pytest.raises(StorageFailure):
        await put(store, "f.1", payload(10))
    assert await store.keys() == []


@pytest.mark.skipif(GroupSync.open(Path(".")) is None, reason="syncfs is Linux only")
async def test_stores_on_one_file_system_share_sync_rounds(tmp_path: Path) -> None:
    groups = SyncGroups()
    group = groups.for_path(tmp_path)
    assert group is not None
    stores = [new_store(tmp_path / f"s{i}", group_sync=group) for i in range(5)]
    assert groups.for_path(tmp_path / "s3") is group
    before = group.rounds
    async with trio.open_nursery() as nursery:
        for i, store in enumerate(stores):
            for j in range(8):
                nursery.start_soon(put, store, f"h.{j}", payload(100, seed=i * 8 + j))
    for store in stores:
        assert sorted(await store.keys()) == sorted(f"h.{j}" for j in range(8))
    # 40 commits on five stores, far fewer syncs.
    assert 1 <= group.rounds - before < 20


async def test_block_crcs_catch_accidents_and_the_sha256_catches_a_forged_block(
    tmp_path: Path,
) -> None:
    # A damaged byte whose block CRC was rewritten to match (as no accident would): every
    # read checks blocks only, so it returns the byte; the scrubber's sha256 catches it (and
    # over HTTP so does the client's check of the recorded sha256: test_integrity_net).
    store = new_store(tmp_path, read_chunk=BLOCK)
    data = payload(MULTI, seed=11)
    await put(store, "s.0", data)
    path = store.part_path("s.0")
    raw = bytearray(path.read_bytes())
    raw[HEADER_SIZE + 10] ^= 0x01
    damaged = bytes(raw[HEADER_SIZE : HEADER_SIZE + MULTI])
    blocks = [damaged[i : i + BLOCK] for i in range(0, MULTI, BLOCK)]
    trailer = struct.pack(f"!{len(blocks)}I", *(zlib.crc32(b) for b in blocks))
    raw[HEADER_SIZE + MULTI :] = trailer
    struct.pack_into("!I", raw, 88, zlib.crc32(trailer))  # the header's trailer CRC ...
    struct.pack_into("!I", raw, 80, zlib.crc32(bytes(raw[:80]) + bytes(raw[84:96])))  # ... and CRC
    path.write_bytes(bytes(raw))

    assert b"".join(await read(store, "s.0", 0, 100)) == damaged[:100]
    assert b"".join(await read(store, "s.0", 0, MULTI)) == damaged
    assert not await store.verify("s.0")
