"""The file store's part format and durability: per-block checksums and range reads,
read-ahead, version-1 parts, and group sync rounds."""

from __future__ import annotations

import errno
import os
import random
import struct
import threading
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from karma8.core.errors import IntegrityError, StorageFailure
from karma8.ports import StoredPart
from karma8.store import groupsync
from karma8.store.diskio import pread_exact
from karma8.store.files import reader
from karma8.store.files.format import BLOCK, HEADER_SIZE
from karma8.store.files.store import FilePartStore
from karma8.store.groupsync import GroupSync, SyncGroups

from storehelpers import MIB, flip_bit, new_store, payload, put, read, sha, tmp_files

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


@asynccontextmanager
async def held_first_round(group: GroupSync) -> AsyncIterator[None]:
    """Holds the first sync round until every task waits (for it, or for the round after),
    so how many rounds the commits share depends on the code, not on the machine's speed."""
    release = threading.Event()
    real = group._sync

    def held() -> None:
        release.wait()
        real()

    group._sync = held
    try:
        yield
        await trio.testing.wait_all_tasks_blocked()
    finally:
        release.set()
        group._sync = real


@pytest.mark.skipif(GroupSync.open(Path(".")) is None, reason="syncfs is Linux only")
async def test_concurrent_commits_share_sync_rounds(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    group = store.group_sync
    assert group is not None
    before = group.rounds
    async with trio.open_nursery() as nursery, held_first_round(group):
        for i in range(40):
            nursery.start_soon(put, store, f"g.{i}", payload(100, seed=i))
    assert sorted(await store.keys()) == sorted(f"g.{i}" for i in range(40))
    # 40 commits, two syncs: the first round, then one round for every commit that waited.
    assert 1 <= group.rounds - before <= 2


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
    async with trio.open_nursery() as nursery, held_first_round(group):
        for i, store in enumerate(stores):
            for j in range(8):
                nursery.start_soon(put, store, f"h.{j}", payload(100, seed=i * 8 + j))
    for store in stores:
        assert sorted(await store.keys()) == sorted(f"h.{j}" for j in range(8))
    # 40 commits on five stores, two syncs.
    assert 1 <= group.rounds - before <= 2


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
