"""The file-backed part store (karma8.store.files.store) on a real temporary directory:
writes, commits, reads, faults and space."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import trio
import trio.testing

from karma8.core.errors import DiskFull, IntegrityError, NotFound, StorageFailure, UploadConflict
from karma8.ports import PartStore, StoredPart
from karma8.store.files.format import BLOCK, HEADER_SIZE

from storehelpers import MIB, flip_bit, new_store, payload, put, read, sha, tmp_files


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


def open_fds(under: Path) -> list[str]:
    """The files under `under` this process holds open: other tests' sockets and the garbage
    collector open and close descriptors of their own while this one runs."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed between the listing and the look
        if target.startswith(str(under)):
            held.append(target)
    return sorted(held)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_readers_and_writers_close_their_files(tmp_path: Path) -> None:
    store = new_store(tmp_path, read_chunk=10)
    await put(store, "r.0", payload(100))
    before = open_fds(tmp_path)  # the store may hold its directory open
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
    async with store.open("r.0", offset=0, length=100):
        assert len(open_fds(tmp_path)) > len(before)  # the probe sees the store's files
    await writer.discard()
    assert open_fds(tmp_path) == before


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


async def test_free_bytes_is_what_the_file_system_has_left(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    free = await store.free_bytes()
    usage = shutil.disk_usage(tmp_path)  # f_bavail in units of f_frsize, as the store counts
    assert 0 < free <= usage.total
    assert abs(free - usage.free) < 1 << 30  # other writers on the machine meanwhile
