"""A read-only view of a node's packed volumes (karma8.store.packed.reader), as a gateway
worker keeps one beside the node that writes them (karma8.net.direct): it finds what the
node appended, deleted and compacted since it last looked, and answers None (ask the node)
for anything it cannot vouch for."""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable, ItemsView, Iterator, KeysView, ValuesView
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from karma8.store.packed.format import HEADER_SIZE, encode
from karma8.store.packed.reader import (
    MISS_REFRESH_EVERY,
    REFRESH_EVERY,
    STALE_SHARE,
    PackedReader,
)
from karma8.store.tiered import TieredPartStore

from storehelpers import SMALL, flip_bit, new_tiered, packed_parts, payload, put

T = SMALL  # small_part_max in these tests


def overwrite(path: Path, at: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


def ticking() -> Callable[[], float]:
    """A clock 10 ms further on at every reading: every miss may refresh."""
    return itertools.count(0.0, 0.01).__next__


def deleted_files_open(under: Path) -> list[str]:
    """Files under ``under`` this process holds open that were unlinked (a retired volume
    generation): only the test's own, as other tests of the process may hold theirs."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return [t for t in targets if t.startswith(f"{under}/") and t.endswith(".vol (deleted)")]


def indexed(reader: PackedReader) -> dict[str, tuple[int, bytes]]:
    """What the reader's index says of each key, its generation by volume id (the serial is
    the reader's own number for it, in the order it opened them); only entries of the
    generations it has open."""
    volume_of = {volume.serial: volume_id for volume_id, volume in reader._volumes.items()}
    return {
        key: (volume_of[serial], found[4:])
        for key, found in reader._index.items()
        if (serial := int.from_bytes(found[:4], "little")) in volume_of
    }


def stale_entries(reader: PackedReader) -> int:
    return sum(int.from_bytes(f[:4], "little") not in reader._open for f in reader._index.values())


class CountedWalks(dict[str, bytes]):
    """An index that counts the passes over it (by items, keys, values or iteration)."""

    walks = 0

    def items(self) -> ItemsView[str, bytes]:  # type: ignore[override]
        self.walks += 1
        return super().items()

    def keys(self) -> KeysView[str]:  # type: ignore[override]
        self.walks += 1
        return super().keys()

    def values(self) -> ValuesView[bytes]:  # type: ignore[override]
        self.walks += 1
        return super().values()

    def __iter__(self) -> Iterator[str]:
        self.walks += 1
        return super().__iter__()


async def test_it_finds_what_the_node_appends_after_it_opened(tmp_path: Path) -> None:
    store = new_tiered(tmp_path)
    await put(store, "a.0", payload(100, seed=1))
    reader = PackedReader(tmp_path, clock=ticking())
    assert reader.read("a.0") == payload(100, seed=1)
    assert reader.read("a.1") is None
    for i in range(1, 30):
        await put(store, f"a.{i}", payload(10 * i, seed=i))
    refreshes = reader.refreshes
    assert reader.read("a.29") == payload(290, seed=29)  # a miss: one refresh finds it
    assert reader.refreshes == refreshes + 1
    for i in range(1, 29):
        assert reader.read(f"a.{i}") == payload(10 * i, seed=i)
    assert reader.refreshes == refreshes + 1  # the rest were indexed by that refresh
    reader.close()
    store.close()


async def test_large_parts_and_unknown_keys_are_none(tmp_path: Path) -> None:
    store = new_tiered(tmp_path)
    await put(store, "big.0", payload(T + 1))  # a part file: not the reader's
    reader = PackedReader(tmp_path, clock=ticking())
    assert reader.read("big.0") is None
    assert reader.read("nowhere.0") is None
    reader.close()
    store.close()


async def test_a_corrupt_payload_is_none_not_bytes(tmp_path: Path) -> None:
    store = new_tiered(tmp_path)
    await put(store, "c.0", payload(200, seed=3))
    reader = PackedReader(tmp_path, clock=ticking())
    path, offset = packed_parts(tmp_path)["c.0"]
    flip_bit(path, offset + 17)
    assert reader.read("c.0") is None
    reader.close()
    store.close()


async def test_deleted_parts_leave_its_index_on_the_next_refresh(tmp_path: Path) -> None:
    store = new_tiered(tmp_path)
    for i in range(4):
        await put(store, f"d.{i}", payload(50, seed=i))
    reader = PackedReader(tmp_path, clock=ticking())
    await store.delete("d.1")
    await put(store, "d.9", payload(5))
    assert reader.read("d.9") == payload(5)  # the refresh also read d.1's tombstone
    assert reader.read("d.1") is None
    assert reader.read("d.2") == payload(50, seed=2)
    reader.close()
    store.close()


async def test_compaction_moves_needles_and_it_follows(tmp_path: Path) -> None:
    store = new_tiered(tmp_path, volume_size=2048)
    for i in range(40):
        await put(store, f"e.{i}", payload(100, seed=i))
    reader = PackedReader(tmp_path, clock=ticking())
    assert reader.read("e.3") == payload(100, seed=3)
    for i in range(40):
        if i % 3:
            await store.delete(f"e.{i}")
    await store.compact()
    assert store.packed.compactions > 0
    await put(store, "e.new", payload(7))
    assert reader.read("e.new") == payload(7)  # a refresh that saw the new generations
    assert not deleted_files_open(tmp_path), "the reader still holds a retired generation"
    for i in range(40):
        assert reader.read(f"e.{i}") == (None if i % 3 else payload(100, seed=i))
    reader.close()
    store.close()


async def test_a_compacted_generation_is_dropped_without_a_pass_over_the_index(
    tmp_path: Path,
) -> None:
    # Its entries go stale at once and are passed over; the next generation's needles
    # replace them as the reader catches up, and what stays stale (deletes it had not seen
    # before the compaction) is swept in one pass once it has caught up.
    store = new_tiered(tmp_path, volume_size=2048)
    for i in range(40):
        await put(store, f"s.{i}", payload(100, seed=i))
    now = [0.0]
    reader = PackedReader(tmp_path, clock=lambda: now[0])
    reader._index = walked = CountedWalks(reader._index)
    for i in range(40):
        if i % 3:
            await store.delete(f"s.{i}")  # tombstones the reader does not see before...
    await store.compact()  # ...they are gone with the needles they deleted
    assert store.packed.compactions > 0
    assert not reader.refresh(budget=1)  # generations dropped, new ones a needle at a time
    assert walked.walks == 0
    assert reader._stale > 0
    while not reader.refresh(budget=1):
        assert walked.walks == 0  # no sweep before it has caught up
    assert reader._stale == 0
    live = {f"s.{i}" for i in range(40) if i % 3 == 0}
    assert set(reader._index) == live  # the deleted parts' entries swept
    for i in range(40):
        assert reader.read(f"s.{i}") == (payload(100, seed=i) if i % 3 == 0 else None)
    assert not deleted_files_open(tmp_path), "the reader still holds a retired generation"
    reader.close()
    store.close()


async def forty_in_small_volumes(tmp_path: Path, prefix: str) -> tuple[TieredPartStore, list[str]]:
    """A node with 40 small parts in volumes of 2 KiB, and the keys in its first volume."""
    store = new_tiered(tmp_path, volume_size=2048)
    for i in range(40):
        await put(store, f"{prefix}.{i}", payload(100, seed=i))
    first = sorted({path for path, _ in packed_parts(tmp_path).values()})[0]
    return store, sorted(k for k, (path, _) in packed_parts(tmp_path).items() if path == first)


async def test_a_stale_entry_read_is_none_and_leaves_the_index(tmp_path: Path) -> None:
    # One volume compacted, most of its parts deleted unseen: too few stale entries for a
    # sweep, so one is still there when read, without a refresh.
    store, in_first = await forty_in_small_volumes(tmp_path, "t")
    now = [0.0]
    reader = PackedReader(tmp_path, clock=lambda: now[0])
    doomed = in_first[: len(in_first) // 2 + 1]
    for key in doomed:
        await store.delete(key)
    await store.compact()
    assert store.packed.compactions == 1
    assert reader.refresh(budget=None)  # caught up: the first volume's next generation
    assert 0 < reader._stale <= STALE_SHARE * len(reader._index)  # no sweep
    now[0] += MISS_REFRESH_EVERY  # no refresh due for a key it has
    refreshes = reader.refreshes
    assert reader.read(doomed[0]) is None
    assert reader.refreshes == refreshes
    assert doomed[0] not in reader._index
    assert reader._stale == len(doomed) - 1
    for key in in_first:
        assert reader.read(key) == (None if key in doomed else payload(100, seed=int(key[2:])))
    reader.close()
    store.close()


async def test_the_stale_count_is_the_stale_entries(tmp_path: Path) -> None:
    # A delete the reader saw before the compaction leaves no entry behind, so it is not
    # counted stale when its generation is dropped (else sweeps would come too early).
    store, in_first = await forty_in_small_volumes(tmp_path, "u")
    now = [0.0]
    reader = PackedReader(tmp_path, clock=lambda: now[0])
    await store.delete(in_first[0])  # too little garbage to compact: the reader sees it
    assert store.packed.compactions == 0
    assert reader.refresh(budget=None)
    for key in in_first[1 : len(in_first) // 2 + 1]:
        await store.delete(key)
    await store.compact()
    assert store.packed.compactions == 1
    assert reader.refresh(budget=None)
    assert reader._stale == stale_entries(reader) > 0
    reader.close()
    store.close()


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cut=st.integers(1, HEADER_SIZE + 16 + 300))
def test_a_needle_half_written_is_not_read_until_it_is_whole(
    tmp_path_factory: pytest.TempPathFactory, cut: int
) -> None:
    """The node's append of the last needle is seen in part (a ``pwrite`` in flight): the
    reader neither returns it nor loses its place, and finds it once it is whole."""
    root = tmp_path_factory.mktemp("torn")

    async def write() -> None:
        store = new_tiered(root)
        await put(store, "f.0", payload(100, seed=1))
        await put(store, "f.1", payload(300, seed=2))
        store.close()

    trio.run(write)
    (volume,) = (root / "volumes").iterdir()
    whole = volume.read_bytes()
    _, offset = packed_parts(root)["f.1"]
    cut_at = min(len(whole) - 1, offset - HEADER_SIZE - len("f.1") + cut)
    with open(volume, "r+b") as f:
        f.truncate(cut_at)
    reader = PackedReader(root, clock=ticking())
    assert reader.read("f.0") == payload(100, seed=1)
    assert reader.read("f.1") is None
    with open(volume, "r+b") as f:  # the rest of the write lands
        f.seek(cut_at)
        f.write(whole[cut_at:])
    assert reader.read("f.1") == payload(300, seed=2)
    reader.close()


def test_a_directory_without_volumes_reads_nothing(tmp_path: Path) -> None:
    reader = PackedReader(tmp_path, clock=ticking())
    assert reader.read("g.0") is None
    os.makedirs(tmp_path / "volumes")
    assert reader.read("g.0") is None
    reader.close()


async def test_a_gap_skipped_while_its_append_was_in_flight_is_read_once_filled(
    tmp_path: Path,
) -> None:
    """Appends may land out of order (each from its own thread, without group sync): a
    needle past a gap is indexed, and the gap is scanned again until its needle is there."""
    store = new_tiered(tmp_path)
    for i in range(3):
        await put(store, f"h.{i}", payload(100, seed=i))
    store.close()
    (volume,) = (tmp_path / "volumes").iterdir()
    whole = volume.read_bytes()
    _, offset = packed_parts(tmp_path)["h.1"]
    start = offset - HEADER_SIZE - len("h.1")
    end = packed_parts(tmp_path)["h.2"][1] - HEADER_SIZE - len("h.2")
    overwrite(volume, start, bytes(end - start))  # h.1's bytes not there yet: zeros
    reader = PackedReader(tmp_path, clock=ticking())
    assert reader.read("h.0") == payload(100, seed=0)
    assert reader.read("h.2") == payload(100, seed=2)
    assert reader.read("h.1") is None
    overwrite(volume, start, whole[start:end])
    assert reader.read("h.1") == payload(100, seed=1)
    reader.close()


async def test_the_first_needle_of_a_key_stays_and_whole_reads_check_the_sha256(
    tmp_path: Path,
) -> None:
    """Bytes that look like a needle for a part already indexed (say, inside a payload
    someone uploaded) do not replace it; a whole read is checked against the metadata's
    sha256 of the part."""
    store = new_tiered(tmp_path)
    real = payload(200, seed=5)
    await put(store, "k.0", real)
    forged = payload(200, seed=6)
    # Forged with the volume's own salt, as if the forger knew it: the first needle of a key
    # still stays (a forgery without the salt is not a needle at all: test_packed_store).
    salt = store.packed.volumes[max(store.packed.volumes)].salt
    fake = encode("k.0", forged, sha256=hashlib.sha256(forged).digest(), salt=salt)
    pad = bytes(-(HEADER_SIZE + len("carrier.0")) % 8)  # the needle at an aligned offset
    await put(store, "carrier.0", pad + fake)  # a payload that holds a whole, valid needle
    path, at = packed_parts(tmp_path)["carrier.0"]
    flip_bit(path, at - HEADER_SIZE - len("carrier.0") + 30)  # the carrier's header: a scan
    # now skips to the next magic, inside its payload, and finds the forged k.0 there
    reader = PackedReader(tmp_path, clock=ticking())
    assert reader.read("k.0") == real
    assert reader.read("k.0", hashlib.sha256(real).hexdigest()) == real
    assert reader.read("k.0", hashlib.sha256(forged).hexdigest()) is None
    reader.close()
    store.close()


async def test_misses_close_together_ask_the_node_without_rescanning(tmp_path: Path) -> None:
    store = new_tiered(tmp_path)
    now = [0.0]
    reader = PackedReader(tmp_path, clock=lambda: now[0])
    await put(store, "m.0", payload(10))
    assert reader.read("m.0") is None  # refreshed at 0.0 when opened: too soon
    refreshes = reader.refreshes
    now[0] += MISS_REFRESH_EVERY
    assert reader.read("m.0") == payload(10)
    assert reader.refreshes == refreshes + 1
    reader.close()
    store.close()


async def test_a_reader_far_behind_catches_up_a_bounded_step_at_a_time(tmp_path: Path) -> None:
    # A burst of writes while the reader read nothing: each refresh indexes at most its
    # budget, and the steps together index what one unbounded refresh would.
    store = new_tiered(tmp_path, volume_size=64 << 10)  # several volumes
    now = [0.0]
    reader = PackedReader(tmp_path, clock=lambda: now[0])
    parts = {f"b{i}.0": payload(50 + (i * 37) % 900, seed=i) for i in range(300)}
    for key, data in parts.items():
        await put(store, key, data)
    steps = 0
    while not reader.refresh(budget=8 << 10):
        assert reader.behind
        steps += 1
    assert not reader.behind
    assert steps >= sum(len(d) for d in parts.values()) // (8 << 10) - 1
    assert all(reader.read(key) == data for key, data in parts.items())
    whole = PackedReader(tmp_path, clock=lambda: now[0])  # one unbounded scan on opening
    assert indexed(whole) == indexed(reader)
    # A budget smaller than one needle still moves on, a needle at a time.
    await put(store, "big.0", payload(T, seed=99))
    assert reader.refresh(budget=10)
    assert reader.read("big.0") == payload(T, seed=99)
    for opened in (reader, whole):
        opened.close()
    store.close()


async def test_a_reader_behind_goes_on_catching_up_at_each_read(tmp_path: Path) -> None:
    store = new_tiered(tmp_path)
    now = [0.0]
    reader = PackedReader(tmp_path, clock=lambda: now[0])
    await put(store, "old.0", payload(10))
    now[0] += MISS_REFRESH_EVERY
    assert reader.read("old.0") == payload(10)
    for i in range(400):
        await put(store, f"n{i}.0", payload(900, seed=i))
    now[0] += 2 * REFRESH_EVERY  # the once-a-second refresh is due
    refreshes = reader.refreshes
    assert reader.read("old.0") == payload(10)  # one bounded step, not the whole burst
    assert reader.behind
    for _ in range(100):  # no time passes: each read refreshes while behind
        if not reader.behind:
            break
        reader.read("old.0")
    assert not reader.behind
    assert reader.refreshes - refreshes > 1
    assert reader.read("n399.0") == payload(900, seed=399)
    reader.close()
    store.close()
