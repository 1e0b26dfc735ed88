"""The packed engine (karma8.store.packed) behind the routing store (karma8.store.tiered):
small parts as needles in volume files, large ones as files."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from karma8.core.errors import IntegrityError, Karma8Error, NotFound, UploadConflict
from karma8.core.tomlconf import ConfigError
from karma8.net.settings import load_net_config
from karma8.ports import PartStore, StoredPart
from karma8.store import diskio
from karma8.store.groupsync import GroupSync
from karma8.store.packed import format as format_module
from karma8.store.packed import store as packed_store
from karma8.store.packed import volumes
from karma8.store.packed.format import HEADER_SIZE, needle_size, scan
from karma8.store.packed.reader import PackedReader
from karma8.store.tiered import TieredPartStore, open_part_store

from storehelpers import (
    BIG,
    SMALL,
    flip_bit,
    forged_header,
    new_tiered,
    payload,
    put,
    read,
    sha,
)

T = SMALL  # small_part_max in these tests


def files_under(root: Path) -> int:
    return sum(len(files) + len(dirs) for _, dirs, files in os.walk(root))


def volume_paths(store: TieredPartStore) -> list[Path]:
    return [v.path for _, v in sorted(store.packed.volumes.items())]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    size=st.one_of(st.integers(0, 3 * T), st.sampled_from([T - 1, T, T + 1])),
    chunk=st.integers(1, 2 * T),
    span=st.tuples(st.integers(0, 3 * T), st.integers(0, 3 * T)),
)
def test_round_trip_around_the_threshold(
    tmp_path_factory: pytest.TempPathFactory, size: int, chunk: int, span: tuple[int, int]
) -> None:
    root = tmp_path_factory.mktemp("tiered")

    async def main() -> None:
        store = new_tiered(root)
        data = payload(size, seed=size)
        await put(store, "k.1", data, chunk=chunk)
        assert (store.packed.stat("k.1") is not None) == (size <= T)
        assert await store.stat("k.1") == StoredPart(key="k.1", size=size, checksum=sha(data))
        assert b"".join(await read(store, "k.1", 0, size)) == data
        offset = min(span[0], size)
        length = min(span[1], size - offset)
        assert b"".join(await read(store, "k.1", offset, length)) == data[offset : offset + length]
        assert await store.verify("k.1")
        assert await store.used_bytes() == size
        assert store.in_flight_bytes == 0
        assert await store.keys() == ["k.1"]
        store.close()
        again = new_tiered(root)
        assert b"".join(await read(again, "k.1", 0, size)) == data
        assert await again.used_bytes() == size
        assert await again.delete("k.1")
        assert await again.stat("k.1") is None
        assert await again.used_bytes() == 0
        again.close()

    trio.run(main)


async def test_range_past_the_end_and_missing(tmp_path: Path) -> None:
    store = new_tiered(tmp_path)
    await put(store, "k.0", payload(10))
    with pytest.raises(IntegrityError):
        await read(store, "k.0", 5, 6)
    with pytest.raises(NotFound):
        await read(store, "nope.0", 0, 0)
    with pytest.raises(NotFound):
        await store.verify("nope.0")
    assert not await store.delete("nope.0")
    assert await read(store, "k.0", 10, 0) == []


@pytest.mark.parametrize(("first", "second"), [(10, 5000), (5000, 10), (10, 10), (5000, 5000)])
async def test_keys_are_immutable_across_engines(tmp_path: Path, first: int, second: int) -> None:
    store = new_tiered(tmp_path)
    await put(store, "k.0", payload(first))
    writer = await store.create("k.0")
    await writer.write(payload(second, seed=3))
    with pytest.raises(UploadConflict):
        await writer.commit()
    await writer.discard()
    assert await store.stat("k.0") == StoredPart(
        key="k.0", size=first, checksum=sha(payload(first))
    )
    assert store.in_flight_bytes == 0


@pytest.mark.parametrize("group_sync", [False, True])
async def test_a_damaged_part_file_refuses_a_small_part_and_the_hole_is_harmless(
    tmp_path: Path, group_sync: bool
) -> None:
    if group_sync and GroupSync.open(tmp_path) is None:
        pytest.skip("syncfs is Linux only")
    store = new_tiered(tmp_path, group_sync=group_sync)
    await put(store, "k.0", payload(5000))  # a part file
    flip_bit(store.files.part_path("k.0"), 3)  # its header damaged
    await put(store, "a.0", payload(10))
    writer = await store.create("k.0")
    await writer.write(payload(10, seed=3))
    with pytest.raises(UploadConflict):  # looked for in the thread that appends
        await writer.commit()
    await writer.discard()
    await put(store, "b.0", payload(20, seed=4))  # after the hole the refused put left
    store.close()
    again = new_tiered(tmp_path)
    assert b"".join(await read(again, "a.0", 0, 10)) == payload(10)
    assert b"".join(await read(again, "b.0", 0, 20)) == payload(20, seed=4)
    assert again.packed.stat("k.0") is None
    again.close()


async def test_concurrent_commits_of_one_key_one_wins(tmp_path: Path) -> None:
    store = new_tiered(tmp_path)
    results: list[str] = []

    async def one(size: int) -> None:
        writer = await store.create("k.0")
        await writer.write(payload(size))
        try:
            await writer.commit()
            results.append("ok")
        except UploadConflict:
            await writer.discard()
            results.append("conflict")

    async with trio.open_nursery() as nursery:
        for size in (10, 20, 5000):
            nursery.start_soon(one, size)
    assert sorted(results) == ["conflict", "conflict", "ok"]


async def test_discard_leaves_nothing(tmp_path: Path) -> None:
    store = new_tiered(tmp_path)
    for size in (10, 5000):
        writer = await store.create("k.0")
        await writer.write(payload(size))
        assert store.in_flight_bytes == size
        await writer.discard()
        await writer.discard()
        assert store.in_flight_bytes == 0
        assert await store.stat("k.0") is None
    assert await store.keys() == []


def _three(root: Path) -> tuple[TieredPartStore, list[bytes]]:
    store = new_tiered(root)
    return store, [payload(n, seed=n) for n in (100, 7, 333)]


async def test_a_torn_last_needle_is_dropped_at_every_offset(tmp_path: Path) -> None:
    store, datas = _three(tmp_path / "src")
    for i, data in enumerate(datas):
        await put(store, f"k.{i}", data)
    (path,) = volume_paths(store)
    image = path.read_bytes()
    last = needle_size(3, len(datas[2]))
    start = len(image) - last
    store.close()
    for cut in range(start, len(image)):
        root = tmp_path / f"cut{cut}"
        (root / "volumes").mkdir(parents=True)
        (root / "volumes" / path.name).write_bytes(image[:cut])
        again = new_tiered(root)
        assert await again.keys() == ["k.0", "k.1"]
        for i in (0, 1):
            assert b"".join(await read(again, f"k.{i}", 0, len(datas[i]))) == datas[i]
        assert await again.used_bytes() == len(datas[0]) + len(datas[1])
        assert (root / "volumes" / path.name).stat().st_size == start
        await put(again, "k.2", datas[2])  # appends go on where the good bytes end
        again.close()


async def test_a_flipped_byte_fails_reads_and_verify(tmp_path: Path) -> None:
    store, datas = _three(tmp_path)
    for i, data in enumerate(datas):
        await put(store, f"k.{i}", data)
    ref = store.packed.index.get("k.1")
    assert ref is not None
    flip_bit(volume_paths(store)[0], ref.data_offset + 3)
    with pytest.raises(IntegrityError):
        await read(store, "k.1", 0, 1)
    assert not await store.verify("k.1")
    assert await store.verify("k.0")
    assert await store.verify("k.2")
    assert await store.quarantine("k.1")
    assert await store.stat("k.1") is None
    assert (tmp_path / "quarantine" / "k.1").exists()
    assert not await store.quarantine("k.1")


async def test_a_damaged_header_in_the_middle_skips_one_needle(tmp_path: Path) -> None:
    store, datas = _three(tmp_path)
    for i, data in enumerate(datas):
        await put(store, f"k.{i}", data)
    ref = store.packed.index.get("k.1")
    assert ref is not None
    flip_bit(volume_paths(store)[0], ref.offset + 9)
    store.close()
    again = new_tiered(tmp_path)
    assert await again.keys() == ["k.0", "k.2"]
    assert b"".join(await read(again, "k.2", 0, len(datas[2]))) == datas[2]


async def test_needles_a_client_forged_in_a_payload_stay_out_past_a_damaged_header(
    tmp_path: Path,
) -> None:
    """A payload holding well-formed unsalted needles (what a client can compute: a part of
    a version not stored yet, a tombstone of the next part, a header claiming a payload
    that reaches over the needles after it) behind a damaged header: the reopened store
    finds none of them, and every real needle after the carrier stays, indexed and whole."""
    store = new_tiered(tmp_path)
    sha256 = bytes(32)
    after = {f"after.{i}": payload(100, seed=i) for i in range(3)}
    pad = bytes(-(HEADER_SIZE + len("carrier.0")) % format_module.ALIGN)
    two = format_module.encode("future.0", b"forged", sha256=sha256, salt=None)
    two += format_module.encode_tombstone("after.0", salt=None)
    # A header whose payload would end exactly where the volume will end: the needles after
    # the carrier inside it, and popped with it as a torn tail (its CRC cannot match them).
    long_at = HEADER_SIZE + len("carrier.0") + len(pad) + len(two)
    carrier_size = needle_size(len("carrier.0"), len(pad + two + forged_header("long.0", 0, None)))
    volume_end = carrier_size + sum(needle_size(len(key), 100) for key in after)
    long_length = volume_end - long_at - HEADER_SIZE - len("long.0")
    await put(store, "carrier.0", pad + two + forged_header("long.0", long_length, None))
    for key, data in after.items():
        await put(store, key, data)
    carrier = store.packed.index.get("carrier.0")
    assert carrier is not None
    flip_bit(volume_paths(store)[0], carrier.offset + 9)
    assert store.packed.volumes[1].end == volume_end
    store.close()
    again = new_tiered(tmp_path)
    assert await again.keys() == sorted(after)
    for key, data in after.items():
        assert b"".join(await read(again, key, 0, 100)) == data
    assert again.packed.truncated_bytes == 0
    reader = PackedReader(tmp_path)
    assert reader.read("future.0") is None
    assert all(reader.read(key) == data for key, data in after.items())
    reader.close()
    again.close()


async def test_a_volume_from_before_salts_is_read_deleted_in_and_compacted(
    tmp_path: Path,
) -> None:
    """A volume written before volumes had salts (no salt in its name, unsalted needles)
    opens and serves its parts; appends go to a new, salted volume; deletes of its parts
    append unsalted tombstones to it, and its compaction keeps it unsalted."""
    legacy = {f"old.{i}": payload(300, seed=i) for i in range(6)}
    (tmp_path / "volumes").mkdir(parents=True)
    (tmp_path / "volumes" / "00000001.0.vol").write_bytes(
        b"".join(
            format_module.encode(key, data, sha256=hashlib.sha256(data).digest(), salt=None)
            for key, data in legacy.items()
        )
    )
    store = new_tiered(tmp_path, compact_ratio=1.0)  # nothing compacts before the reopen
    assert sorted(store.packed.volumes) == [1, 2]
    assert store.packed.volumes[1].salt is None
    assert store.packed.volumes[2].salt is not None
    await put(store, "new.0", payload(100, seed=9))
    assert store.packed.index.get("new.0").volume == 2  # type: ignore[union-attr]
    for i in range(4):
        assert await store.delete(f"old.{i}")
        del legacy[f"old.{i}"]
    # The tombstones, unsalted in the unsalted volume, are read back as such.
    store.close()
    store = new_tiered(tmp_path, compact_ratio=0.5)
    assert store.packed.truncated_bytes == 0
    assert await store.keys() == sorted([*legacy, "new.0"])
    reader = PackedReader(tmp_path)
    assert reader.read("old.0") is None
    assert reader.read("old.5") == legacy["old.5"]
    reader.close()
    await store.compact()
    assert store.packed.volumes[1].generation == 1
    salt = store.packed.volumes[2].salt
    assert salt is not None
    assert sorted(os.listdir(tmp_path / "volumes")) == [
        "00000001.1.vol",
        f"00000002.0.{salt.hex()}.vol",
    ]
    store.close()
    again = new_tiered(tmp_path)
    assert await again.keys() == sorted([*legacy, "new.0"])
    for key, data in legacy.items():
        assert b"".join(await read(again, key, 0, 300)) == data
    reader = PackedReader(tmp_path)
    for key, data in legacy.items():
        assert reader.read(key) == data
    assert reader.read("new.0") == payload(100, seed=9)
    reader.close()
    again.close()


async def test_two_volumes_of_one_id_and_two_salts_are_both_kept(tmp_path: Path) -> None:
    """A karma8 from before salts run again on a directory does not see the salted volumes
    and may create an unsalted one of the same id (and a newer one after it): on the next
    open both hold acknowledged parts, so one moves to a free id, and none is lost."""
    store = new_tiered(tmp_path)
    await put(store, "salted.0", payload(100, seed=1))
    salted_name = store.packed.volumes[1].path.name
    store.close()
    (tmp_path / "volumes" / "00000001.0.vol").write_bytes(
        format_module.encode("old.0", b"old", sha256=hashlib.sha256(b"old").digest(), salt=None)
    )
    again = new_tiered(tmp_path)
    assert await again.keys() == ["old.0", "salted.0"]
    assert b"".join(await read(again, "old.0", 0, 3)) == b"old"
    assert sorted(os.listdir(tmp_path / "volumes")) == sorted(
        [salted_name, "00000002.0.vol", again.packed.volumes[3].path.name]
    )
    await put(again, "new.0", payload(10))
    again.close()
    third = new_tiered(tmp_path)
    assert await third.keys() == ["new.0", "old.0", "salted.0"]
    third.close()


def test_volume_names_are_sorted_into_what_to_open_delete_and_renumber() -> None:
    s1, s2 = "11" * 8, "22" * 8
    plan = volumes.plan_volumes(
        [
            f"00000001.0.{s1}.vol",
            f"00000001.1.{s1}.vol",  # its compaction's output: the older one goes
            "00000001.3.vol",  # another volume of id 1
            f"00000002.0.{s2}.vol",
            "00000003.0.vol",
            "00000003.1.vol",
            "00000004.0.ABCDEF0123456789.vol",  # not a volume's name
            "notes.txt",
        ]
    )
    assert plan.current == {
        1: (1, bytes.fromhex(s1)),
        2: (0, bytes.fromhex(s2)),
        3: (1, None),
        4: (3, None),
    }
    assert plan.superseded == [f"00000001.0.{s1}.vol", "00000003.0.vol"]
    assert plan.renumber == [("00000001.3.vol", 4)]
    assert plan.unknown == ["00000004.0.ABCDEF0123456789.vol"]


@pytest.mark.parametrize("case", ["unsalted name", "other salt", "hole first", "one damaged"])
async def test_a_volume_none_of_whose_needles_checks_out_is_set_aside_not_cut(
    tmp_path: Path, case: str
) -> None:
    """Renamed (or copied under another name) a volume's needles do not check out under the
    salt its name gives; nor do they when every header is damaged. Whole needles are in it
    all the same, so it is no torn tail: the store moves it to volumes/refused/ whole, opens
    without it, and under its own name again it serves its parts."""
    store = new_tiered(tmp_path)
    for i in range(1 if case == "one damaged" else 3):
        await put(store, f"k.{i}", payload(100, seed=i))
    path = store.packed.volumes[1].path
    store.close()
    name = {"unsalted name": "00000001.0.vol", "other salt": f"00000001.0.{'ab' * 8}.vol"}
    moved = path.with_name(name.get(case, path.name))
    os.rename(path, moved)
    if case == "hole first":  # the first append cancelled before it was written: zeros
        overwrite = bytearray(moved.read_bytes())
        overwrite[: needle_size(3, 100)] = bytes(needle_size(3, 100))
        moved.write_bytes(bytes(overwrite))
        os.rename(moved, moved.with_name(f"00000001.0.{'cd' * 8}.vol"))
        moved = moved.with_name(f"00000001.0.{'cd' * 8}.vol")
    if case == "one damaged":
        flip_bit(moved, 53)  # the only needle's header check
    size = moved.stat().st_size
    again = new_tiered(tmp_path)
    assert await again.keys() == []
    assert again.packed.truncated_bytes == 0
    aside = tmp_path / "volumes" / "refused" / moved.name
    assert aside.stat().st_size == size
    again.close()
    if case in name:  # back under its own name: every part again
        os.rename(aside, path)
        third = new_tiered(tmp_path)
        assert await third.keys() == ["k.0", "k.1", "k.2"]
        third.close()


@pytest.mark.parametrize("tear", ["short", "payload"])
async def test_a_first_append_torn_is_still_cut(tmp_path: Path, tear: str) -> None:
    store = new_tiered(tmp_path)
    await put(store, "k.0", payload(100))
    path = store.packed.volumes[1].path
    store.close()
    if tear == "short":
        os.truncate(path, path.stat().st_size - 1)  # its last byte (padding) never landed
    else:
        flip_bit(path, HEADER_SIZE + len("k.0") + 50)  # its payload landed only in part
    again = new_tiered(tmp_path)
    assert await again.keys() == []
    assert path.stat().st_size == 0
    assert not (tmp_path / "volumes" / "refused").exists()
    again.close()


async def test_a_key_written_again_after_a_torn_append_reads_back_after_reopen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A failed append can leave a needle whose header is whole and which nothing indexed; the
    # key may then be written again into the same volume (a move retried onto this node).
    # After a restart the later needle is the part, as it was before.
    store = new_tiered(tmp_path)
    real = diskio.pwrite_all

    def torn(fd: int, data: bytes, offset: int) -> None:
        monkeypatch.setattr(packed_store, "pwrite_all", real)
        real(fd, data[: len(data) // 2], offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(packed_store, "pwrite_all", torn)
    with pytest.raises(Karma8Error):
        await put(store, "k.1", payload(300))
    await put(store, "k.1", payload(300, seed=2))
    (volume,) = volume_paths(store)
    salt = store.packed.volumes[1].salt
    store.close()
    image = volume.read_bytes()
    found = scan(lambda at, n: image[at : at + n], len(image), salt).needles
    assert [n.key for n in found] == ["k.1", "k.1"]  # the torn one's header is whole
    again = new_tiered(tmp_path)
    assert b"".join(await read(again, "k.1", 0, 300)) == payload(300, seed=2)
    assert await again.verify("k.1")


async def test_tombstones_and_used_bytes_survive_reopen(tmp_path: Path) -> None:
    store = new_tiered(tmp_path)
    for i in range(10):
        await put(store, f"k.{i}", payload(50 + i))
    await put(store, "big.0", payload(5000))
    for i in range(0, 10, 2):
        assert await store.delete(f"k.{i}")
    used = await store.used_bytes()
    store.close()
    again = new_tiered(tmp_path)
    assert await again.keys() == sorted(["big.0"] + [f"k.{i}" for i in range(1, 10, 2)])
    assert await again.used_bytes() == used == 5000 + sum(50 + i for i in range(1, 10, 2))
    await put(again, "k.0", payload(3, seed=9))  # a deleted key may be written again
    again.close()
    third = new_tiered(tmp_path)
    assert b"".join(await read(third, "k.0", 0, 3)) == payload(3, seed=9)


async def test_volumes_roll_over_and_compaction_frees_space(tmp_path: Path) -> None:
    store = new_tiered(tmp_path, volume_size=4096, compact_ratio=0.5)
    datas = {f"k.{i}": payload(200, seed=i) for i in range(100)}
    for key, data in datas.items():
        await put(store, key, data)
    assert len(store.packed.volumes) > 4
    before = sum(p.stat().st_size for p in volume_paths(store))
    for i in range(0, 100, 3):
        assert await store.delete(f"k.{i}")
        del datas[f"k.{i}"]
    for i in range(1, 100, 3):
        assert await store.delete(f"k.{i}")
        del datas[f"k.{i}"]
    await store.compact()
    after = sum(p.stat().st_size for p in volume_paths(store))
    assert store.packed.compactions > 0
    assert after < before / 2
    for key, data in datas.items():
        assert b"".join(await read(store, key, 0, 200)) == data
    assert await store.used_bytes() == 200 * len(datas)
    assert sorted(os.listdir(tmp_path / "volumes")) == sorted(p.name for p in volume_paths(store))
    store.close()
    again = new_tiered(tmp_path, volume_size=4096)
    assert sorted(await again.keys()) == sorted(datas)
    assert await again.used_bytes() == 200 * len(datas)


async def test_compaction_under_concurrent_writes_reads_and_deletes(tmp_path: Path) -> None:
    store = new_tiered(tmp_path, volume_size=8192, compact_ratio=0.3, group_sync=True)
    live: dict[str, bytes] = {}
    for i in range(200):
        live[f"a.{i}"] = payload(100 + i % 50, seed=i)
        await put(store, f"a.{i}", live[f"a.{i}"])
    stop = trio.Event()

    async def reader() -> None:
        while not stop.is_set():
            for key, data in list(live.items()):
                try:
                    got = b"".join(await read(store, key, 0, len(data)))
                except NotFound:
                    if key in live:
                        raise
                    continue
                assert got == data
            await trio.lowlevel.checkpoint()

    async def writer() -> None:
        for i in range(200):
            data = payload(60, seed=1000 + i)
            await put(store, f"b.{i}", data)
            live[f"b.{i}"] = data

    async def deleter() -> None:
        for i in range(0, 200, 2):
            del live[f"a.{i}"]
            assert await store.delete(f"a.{i}")
            if i % 20 == 0:
                await store.compact()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        nursery.start_soon(reader)
        async with trio.open_nursery() as work:
            work.start_soon(writer)
            work.start_soon(deleter)
        await store.compact()
        stop.set()
    assert store.packed.compactions > 0
    for key, data in live.items():
        assert b"".join(await read(store, key, 0, len(data))) == data
    assert await store.used_bytes() == sum(len(d) for d in live.values())
    store.close()
    again = new_tiered(tmp_path, volume_size=8192)
    assert sorted(await again.keys()) == sorted(live)
    for key, data in live.items():
        assert b"".join(await read(again, key, 0, len(data))) == data


async def test_a_read_started_before_a_switch_gets_the_old_bytes(tmp_path: Path) -> None:
    store = new_tiered(tmp_path, volume_size=1024, inline_io=0)
    for i in range(20):
        await put(store, f"k.{i}", payload(100, seed=i))
    for i in range(0, 20, 2):
        await store.delete(f"k.{i}")
    results: list[bytes] = []
    async with trio.open_nursery() as nursery:
        for i in range(1, 20, 2):
            nursery.start_soon(_collect, store, f"k.{i}", results)
        nursery.start_soon(store.compact)
    assert sorted(results) == sorted(payload(100, seed=i) for i in range(1, 20, 2))


async def _collect(store: PartStore, key: str, into: list[bytes]) -> None:
    into.append(b"".join(await read(store, key, 0, 100)))


async def test_small_parts_add_few_inodes(tmp_path: Path) -> None:
    store = new_tiered(tmp_path, small_part_max=64 << 10, group_sync=True)
    before = files_under(tmp_path)
    limiter = trio.CapacityLimiter(100)

    async def one(i: int) -> None:
        async with limiter:
            await put(store, f"{i:016x}.{i % 5}", payload(820, seed=i))

    async with trio.open_nursery() as nursery:
        for i in range(2000):
            nursery.start_soon(one, i)
    assert files_under(tmp_path) - before < 10
    assert len(await store.keys()) == 2000
    assert await store.used_bytes() == 2000 * 820


def test_header_is_aligned() -> None:
    assert HEADER_SIZE % 8 == 0


async def test_packing_off_keeps_packed_parts_readable(tmp_path: Path) -> None:
    store = new_tiered(tmp_path)
    await put(store, "old.0", payload(10))
    store.close()
    off = open_part_store(tmp_path, capacity_bytes=BIG, small_part_max=0, group_sync=False)
    assert isinstance(off, TieredPartStore)
    for size in (0, 10):
        await put(off, f"new.{size}", payload(size))
    assert off.files.part_path("new.0").exists()
    assert off.files.part_path("new.10").exists()
    assert b"".join(await read(off, "old.0", 0, 10)) == payload(10)
    off.close()
    fresh = open_part_store(tmp_path / "fresh", capacity_bytes=BIG, small_part_max=0)
    assert not isinstance(fresh, TieredPartStore)


async def _sealed_with_garbage(root: Path) -> TieredPartStore:
    """A store whose volume 1 is sealed and holds parts k.0..k.9, k.0..k.5 deleted."""
    store = new_tiered(root, volume_size=2048, compact_ratio=1.0)  # nothing compacts yet
    for i in range(10):
        await put(store, f"k.{i}", payload(150, seed=i))
    await put(store, "next.0", payload(150))
    assert len(store.packed.volumes) >= 2
    for i in range(6):
        assert await store.delete(f"k.{i}")
    store.packed.compact_ratio = 0.5
    return store


async def test_a_delete_during_the_copy_stays_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await _sealed_with_garbage(tmp_path)
    copying, go_on = threading.Event(), threading.Event()
    real_copy = volumes.copy_needles

    def slow_copy(*args: Any) -> Any:
        copying.set()
        go_on.wait()
        return real_copy(*args)

    monkeypatch.setattr(volumes, "copy_needles", slow_copy)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.compact)
        await trio.to_thread.run_sync(copying.wait)
        assert await store.delete("k.7")  # its needle is being copied right now
        go_on.set()
    assert store.packed.compactions == 1
    assert await store.stat("k.7") is None
    store.close()
    again = new_tiered(tmp_path, volume_size=2048)
    assert sorted(await again.keys()) == ["k.6", "k.8", "k.9", "next.0"]
    assert b"".join(await read(again, "k.8", 0, 150)) == payload(150, seed=8)


async def test_a_read_pinned_across_the_switch_reads_the_old_file(tmp_path: Path) -> None:
    store = await _sealed_with_garbage(tmp_path)
    reading, go_on = threading.Event(), threading.Event()
    packed = store.packed
    real_io = packed._io

    class SlowReads:
        inline_io = 0

        async def run(self, fn: Any) -> Any:
            return await real_io.run(fn)

        async def run_small(self, fn: Any, nbytes: int = 0) -> Any:
            def slow() -> Any:
                reading.set()
                go_on.wait()
                return fn()

            return await trio.to_thread.run_sync(slow)

    packed._io = SlowReads()  # type: ignore[assignment]
    got: list[bytes] = []

    async def read_k9() -> None:
        got.append(b"".join(await read(store, "k.9", 0, 150)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_k9)
        await trio.to_thread.run_sync(reading.wait)
        packed._io = real_io
        await store.compact()  # switches and unlinks the generation the read holds
        assert packed.compactions == 1
        assert not any(p.name.startswith("00000001.0.") for p in (tmp_path / "volumes").iterdir())
        go_on.set()
    assert got == [payload(150, seed=9)]
    assert b"".join(await read(store, "k.9", 0, 150)) == payload(150, seed=9)


def test_the_settings_read_sizes_and_zero(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('small_part_max = "32 KiB"\nvolume_size = "256 MiB"\n')
    loaded = load_net_config(config, {})
    assert (loaded.small_part_max, loaded.volume_size) == (32 << 10, 256 << 20)
    config.write_text("small_part_max = 0\n")
    assert load_net_config(config, {}).small_part_max == 0
    config.write_text("volume_size = 0\n")
    with pytest.raises(ConfigError, match="volume_size"):
        load_net_config(config, {})


async def test_a_volume_compacted_to_nothing_goes_away(tmp_path: Path) -> None:
    store = new_tiered(tmp_path, volume_size=2048)
    for i in range(30):
        await put(store, f"k.{i}", payload(150, seed=i))
    first = {ref.key for ref in store.packed.index.refs_in(1)}
    assert first
    assert len(store.packed.volumes) >= 3
    for key in first:
        assert await store.delete(key)
    await store.compact()
    assert 1 not in store.packed.volumes
    assert not any(name.startswith("00000001.") for name in os.listdir(tmp_path / "volumes"))
    left = sorted(f"k.{i}" for i in range(30) if f"k.{i}" not in first)
    assert await store.keys() == left
    store.close()
    again = new_tiered(tmp_path, volume_size=2048)
    assert await again.keys() == left
    await put(again, "after.0", payload(10))
