"""Volumes a packed store lends to another process (karma8.store.packed.loans): the
borrower appends needles, the node adopts them once durable, and takes the volume back."""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from karma8.core.errors import DiskFull, IntegrityError, InvalidRequest, NotFound, UploadConflict
from karma8.ports import Appended, StoredPart
from karma8.store.diskio import BlockingIO
from karma8.store.groupsync import GroupSync
from karma8.store.packed.format import encode, scan
from karma8.store.packed.loans import BorrowedVolume, adopted_needle, adopted_size
from karma8.store.packed.reader import PackedReader
from karma8.store.packed.store import PackedStore
from karma8.store.packed.volumes import WindowReader
from karma8.store.quota import SpaceQuota
from karma8.store.tiered import TieredPartStore

from storehelpers import flip_bit, new_tiered, payload, put, read, sha

W = "worker-1"


async def borrow(store: TieredPartStore, *, limit: int = 1 << 20) -> BorrowedVolume:
    return BorrowedVolume(await store.packed.lend(W), limit=limit)


def append(volume: BorrowedVolume, key: str, data: bytes) -> Appended:
    """One needle written by the borrower (the step run here; durability is not the point)."""
    appended, step = volume.begin_append(key, data)
    try:
        step()
    finally:
        volume.end_append()
    return appended


async def give_back(store: TieredPartStore, volume: BorrowedVolume) -> None:
    volume.close()
    await store.packed.give_back(W, volume.loan.volume, volume.end)


def volume_keys(path: Path) -> set[str]:
    """Every needle's key in a volume file, live or not, as a scan finds them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        found = scan(WindowReader(fd).read, os.fstat(fd).st_size, salt_of(path))
    finally:
        os.close(fd)
    return {needle.key for needle in found.needles}


def salt_of(path: Path) -> bytes:
    return bytes.fromhex(path.name.split(".")[2])


async def test_a_borrowed_needle_is_a_part_once_adopted(tmp_path: Path) -> None:
    store = new_tiered(tmp_path)
    await put(store, "own.0", payload(300, seed=1))  # the node's own volume, before the loan
    volume = await borrow(store)
    assert store.packed.lent == {volume.loan.volume: W}
    datas = {f"k.{i}": payload(100 + i, seed=i) for i in range(3)}
    appended = [append(volume, key, data) for key, data in datas.items()]
    assert not any(store.packed.has(key) for key in datas)  # written, not a part yet
    for item in appended:
        stored = store.packed.adopt(W, item)
        assert stored == StoredPart(key=item.key, size=item.length, checksum=item.sha256)
    for key, data in datas.items():
        assert b"".join(await read(store, key, 0, len(data))) == data
        assert await store.verify(key)
    assert await store.used_bytes() == 300 + sum(map(len, datas.values()))
    reader = PackedReader(tmp_path)  # what a gateway worker reads without the node
    assert reader.read(appended[1].key, sha(datas["k.1"])) == datas["k.1"]
    await put(store, "own.1", payload(300, seed=2))  # still the node's own volume
    assert store.packed.index.get("own.1").volume != volume.loan.volume  # type: ignore[union-attr]
    await give_back(store, volume)
    assert store.packed.lent == {}
    store.close()
    again = new_tiered(tmp_path)
    assert await again.keys() == sorted([*datas, "own.0", "own.1"])
    for key, data in datas.items():
        assert b"".join(await read(again, key, 0, len(data))) == data


async def test_appends_made_durable_in_the_borrowers_own_sync_rounds(tmp_path: Path) -> None:
    group = GroupSync.open(tmp_path)
    if group is None:
        pytest.skip("no syncfs here")
    store = new_tiered(tmp_path)
    volume = await borrow(store)
    pending = [volume.begin_append(f"k.{i}", payload(64, seed=i)) for i in range(8)]
    rounds = group.rounds
    try:
        errors = await group.run_steps([step for _, step in pending])
    finally:
        for _ in pending:
            volume.end_append()
    assert errors == [None] * 8
    assert group.rounds > rounds
    for appended, _ in pending:
        store.packed.adopt(W, appended)
    assert volume.in_flight == 0
    assert await store.keys() == sorted(f"k.{i}" for i in range(8))


async def test_adoption_takes_only_the_needle_it_was_told_of(tmp_path: Path) -> None:
    store = new_tiered(tmp_path, capacity_bytes=1000)
    volume = await borrow(store)
    good = append(volume, "k.0", payload(200))
    torn = append(volume, "k.1", payload(200, seed=1))
    flip_bit(volume.loan.path, torn.offset + adopted_size(torn) - 10)  # k.1's payload
    wrong = [
        attrs.evolve(good, offset=good.offset + 8),
        attrs.evolve(good, key="k.9"),
        attrs.evolve(good, length=199),
        attrs.evolve(good, length=0),
        attrs.evolve(good, sha256=sha(b"other")),
        torn,
    ]
    for item in wrong:
        with pytest.raises(IntegrityError):
            store.packed.adopt(W, item)
    with pytest.raises(NotFound):
        store.packed.adopt("another", good)
    with pytest.raises(NotFound):  # the node's own active volume is not lent
        store.packed.adopt(W, attrs.evolve(good, volume=1))
    assert await store.keys() == []
    assert await store.used_bytes() == 0
    assert store.in_flight_bytes == 0
    store.packed.adopt(W, good)
    with pytest.raises(UploadConflict):
        store.packed.adopt(W, good)
    big = append(volume, "k.2", payload(900, seed=2))  # 200 + 900 > the quota's 1000
    with pytest.raises(DiskFull):
        store.packed.adopt(W, big)
    assert await store.keys() == ["k.0"]
    assert await store.used_bytes() == 200
    assert store.in_flight_bytes == 0


def test_the_check_reads_the_needle_as_the_borrower_wrote_it() -> None:
    salt = bytes(8)
    data = payload(50)
    needle = encode("k", data, sha256=bytes.fromhex(sha(data)), salt=salt)
    appended = Appended(volume=1, offset=64, key="k", length=50, sha256=sha(data))
    assert adopted_size(appended) == len(needle)
    assert adopted_needle(needle, appended, salt).data_offset == 64 + 56 + 1
    with pytest.raises(IntegrityError):
        adopted_needle(needle, appended, bytes([1]) + salt[1:])  # another volume's salt
    with pytest.raises(IntegrityError):
        adopted_needle(needle[:-8], appended, salt)


async def test_needles_never_adopted_are_compacted_away_or_orphans_after_a_restart(
    tmp_path: Path,
) -> None:
    store = new_tiered(tmp_path)
    volume = await borrow(store)
    kept = [append(volume, f"k.{i}", payload(500, seed=i)) for i in range(2)]
    for i in range(2, 8):
        append(volume, f"failed.{i}", payload(500, seed=i))  # their uploads failed
    for item in kept:
        store.packed.adopt(W, item)
    path = volume.loan.path
    await give_back(store, volume)
    await store.compact()  # 6 of 8 needles garbage: past the ratio
    assert store.packed.compactions == 1
    current = store.packed.volumes[volume.loan.volume].path
    assert current != path
    assert volume_keys(current) == {"k.0", "k.1"}
    for item in kept:
        assert b"".join(await read(store, item.key, 0, 500)) == payload(500, seed=int(item.key[2:]))
    store.close()

    # Without the return (the process stopped), a restart finds them as parts: orphans,
    # which the orphan check collects since no version names them.
    other = tmp_path / "crashed"
    store = new_tiered(other)
    volume = await borrow(store)
    append(volume, "failed.0", payload(10))
    store.packed.adopt(W, append(volume, "k.0", payload(10, seed=1)))
    store.close()
    again = new_tiered(other)
    assert await again.keys() == ["failed.0", "k.0"]
    assert again.packed.lent == {}


async def test_a_delete_while_lent_waits_for_the_volume_to_come_back(tmp_path: Path) -> None:
    store = new_tiered(tmp_path)
    volume = await borrow(store)
    for i in range(3):
        store.packed.adopt(W, append(volume, f"k.{i}", payload(100, seed=i)))
    size = volume.loan.path.stat().st_size
    assert await store.delete("k.0")
    assert not await store.delete("k.0")
    assert volume.loan.path.stat().st_size == size  # nothing appended to a lent volume
    assert not store.packed.has("k.0")
    assert await store.used_bytes() == 200
    append(volume, "late", payload(40))  # the borrower goes on after the delete
    await give_back(store, volume)
    assert await store.delete("k.1")  # a returned volume takes tombstones at once
    store.close()
    again = new_tiered(tmp_path)
    assert await again.keys() == ["k.2", "late"]  # "late" never adopted: an orphan


async def test_a_delete_while_lent_is_written_at_close_and_lost_in_a_crash(
    tmp_path: Path,
) -> None:
    for crash in (False, True):
        root = tmp_path / f"crash-{crash}"
        store = new_tiered(root)
        volume = await borrow(store)
        store.packed.adopt(W, append(volume, "k.0", payload(100)))
        store.packed.adopt(W, append(volume, "k.1", payload(100)))
        assert await store.delete("k.0")
        if crash:  # the process is gone: no tombstone, the part is found again (an orphan)
            for file in store.packed.volumes.values():
                os.close(file.fd)
        else:  # closing ends the loan: its tombstones are written
            store.close()
        again = new_tiered(root)
        assert await again.keys() == (["k.0", "k.1"] if crash else ["k.1"])
        again.close()


async def test_the_node_leaves_a_lent_volume_alone(tmp_path: Path) -> None:
    store = new_tiered(tmp_path, volume_size=2048, compact_ratio=0.5)
    volume = await borrow(store)
    lent = volume.loan.volume
    items = [append(volume, f"b.{i}", payload(200, seed=i)) for i in range(20)]
    store.packed.adopt(W, items[0])  # 19 of 20 garbage, and the volume past its size
    for i in range(30):  # the node's own appends roll over past the lent volume's id
        await put(store, f"own.{i}", payload(200, seed=100 + i))
    assert len(store.packed.volumes) > 3
    assert all(
        store.packed.index.get(f"own.{i}").volume != lent  # type: ignore[union-attr]
        for i in range(30)
    )
    await store.compact()
    assert volume.loan.path.exists()
    assert store.packed.volumes[lent].generation == 0
    assert store.packed.lent == {lent: W}
    await give_back(store, volume)
    await store.compact()
    assert store.packed.volumes[lent].generation == 1  # compacted once it is back
    assert volume_keys(store.packed.volumes[lent].path) == {"b.0"}
    with pytest.raises(NotFound):
        await store.packed.give_back(W, lent, 0)


async def test_two_borrowers_and_the_nodes_appends_at_once(tmp_path: Path) -> None:
    store = new_tiered(tmp_path)
    first = BorrowedVolume(await store.packed.lend("w1"), limit=1 << 20)
    second = BorrowedVolume(await store.packed.lend("w2"), limit=1 << 20)
    assert first.loan.volume != second.loan.volume
    assert first.loan.path != second.loan.path
    datas = {f"k.{i}": payload(64 + i, seed=i) for i in range(30)}

    async def writer(name: str, volume: BorrowedVolume, keys: list[str]) -> None:
        for key in keys:
            appended, step = volume.begin_append(key, datas[key])
            await trio.to_thread.run_sync(step)
            volume.end_append()
            store.packed.adopt(name, appended)

    async def node(keys: list[str]) -> None:
        for key in keys:
            await put(store, key, datas[key])

    keys = sorted(datas)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer, "w1", first, keys[0::3])
        nursery.start_soon(writer, "w2", second, keys[1::3])
        nursery.start_soon(node, keys[2::3])
    with pytest.raises(NotFound):  # w2 cannot adopt into w1's volume
        store.packed.adopt("w2", append(first, "x", b"x"))
    store.close()
    again = new_tiered(tmp_path)
    assert await again.keys() == sorted([*keys, "x"])
    for key, data in datas.items():
        assert b"".join(await read(again, key, 0, len(data))) == data


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["lend", "append", "adopt", "delete", "give_back", "put", "reopen"]),
        st.integers(0, 1_000),
    ),
    max_size=40,
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=_OPS)
def test_loans_never_lose_a_part_nor_bring_back_one_taken_back(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int]]
) -> None:
    """Any sequence of loans, appends, adoptions, deletes, returns, the node's own puts and
    restarts: every part adopted (or put) and not deleted reads back exactly; a restart
    brings back only needles never adopted or deleted while lent (orphans), never a part
    whose tombstone was written."""
    root = tmp_path_factory.mktemp("loans")

    async def main() -> None:
        store = new_tiered(root, volume_size=4096)
        live: dict[str, bytes] = {}
        maybe: set[str] = set()  # may come back after a restart: never adopted, or lent-deleted
        loans: list[BorrowedVolume] = []
        written: list[tuple[BorrowedVolume, Appended, bytes]] = []
        for n, (op, arg) in enumerate(ops):
            key = f"k.{n}"
            if op == "lend":
                loans.append(await borrow(store, limit=2048))
            elif op == "append" and loans:
                volume = loans[arg % len(loans)]
                data = payload(arg % 700, seed=n)
                written.append((volume, append(volume, key, data), data))
                maybe.add(key)
            elif op == "adopt" and written:
                volume, appended, data = written.pop(arg % len(written))
                store.packed.adopt(W, appended)
                live[appended.key] = data
                maybe.discard(appended.key)
            elif op == "delete" and live:
                victim = sorted(live)[arg % len(live)]
                ref = store.packed.index.get(victim)
                assert await store.delete(victim)
                del live[victim]
                if ref is not None and ref.volume in store.packed.lent:
                    maybe.add(victim)
            elif op == "give_back" and loans:
                volume = loans.pop(arg % len(loans))
                written = [w for w in written if w[0] is not volume]
                await give_back(store, volume)
            elif op == "put":
                live[key] = payload(arg % 700, seed=n)
                await put(store, key, live[key])
            elif op == "reopen":
                for volume in loans:
                    volume.close()
                loans, written = [], []
                store.close()
                store = new_tiered(root, volume_size=4096)
                for orphan in set(await store.keys()) - set(live):
                    assert orphan in maybe
                    await store.delete(orphan)  # the orphan check's work
                maybe = set()
            for key, data in live.items():
                assert b"".join(await read(store, key, 0, len(data))) == data
        assert set(live) <= set(await store.keys()) <= set(live) | maybe
        await store.compact()
        for key, data in live.items():
            assert b"".join(await read(store, key, 0, len(data))) == data
        store.close()

    trio.run(main)


def test_a_lent_volume_is_a_packed_store_volume_like_any_other(tmp_path: Path) -> None:
    """Opening a directory whose volumes were lent needs nothing of the loans but their
    record (which volumes another process may have been appending to)."""

    async def main() -> None:
        store = new_tiered(tmp_path)
        volume = await borrow(store)
        store.packed.adopt(W, append(volume, "k.0", payload(10)))
        names = sorted(os.listdir(tmp_path / "volumes"))
        store.close()
        assert len(names) == 3  # the node's active volume, the lent one and the loans' record
        plain = PackedStore(tmp_path, quota=SpaceQuota(1 << 20), io=BlockingIO(), group_sync=None)
        assert list(plain.index.keys()) == ["k.0"]
        plain.close()

    trio.run(main)


async def test_tombstones_go_past_a_needle_the_borrower_began_and_did_not_finish(
    tmp_path: Path,
) -> None:
    store = new_tiered(tmp_path)
    volume = await borrow(store)
    keys = [f"k.{i}" for i in range(20)]
    for key in keys:
        store.packed.adopt(W, append(volume, key, payload(8)))
    appended, _ = volume.begin_append("torn", payload(900))  # its header only lands
    with open(volume.loan.path, "r+b") as file:  # noqa: ASYNC230 (a test's setup)
        file.seek(appended.offset)
        file.write(encode("torn", payload(900), sha256=bytes(32), salt=volume.loan.salt)[:64])
    volume.end_append()
    for key in keys:
        assert await store.delete(key)
    await give_back(store, volume)  # 20 tombstones: were they inside "torn", a scan skips them
    store.close()
    again = new_tiered(tmp_path)
    assert set(await again.keys()) <= {"torn"}


@pytest.mark.parametrize("delete_while_lent", [False, True], ids=["after", "while-lent"])
async def test_a_part_written_again_after_its_lent_copy_went_survives_a_restart(
    tmp_path: Path, delete_while_lent: bool
) -> None:
    """The node's own appends go to a volume above every lent one: of two live needles of a
    key, the later volume's wins at the next open (a part moved off and back again)."""
    store = new_tiered(tmp_path)
    await put(store, "own.0", payload(300, seed=1))
    volume = await borrow(store)
    data = payload(500, seed=7)
    store.packed.adopt(W, append(volume, "v.3", data))
    for i in range(5):  # other live parts: the lent volume is never compacted empty
        store.packed.adopt(W, append(volume, f"w.{i}", payload(2000, seed=i)))
    if not delete_while_lent:
        await give_back(store, volume)
    assert await store.delete("v.3")  # moved off
    await put(store, "v.3", data)  # and back
    assert store.packed.index.get("v.3").volume > volume.loan.volume  # type: ignore[union-attr]
    if delete_while_lent:
        await give_back(store, volume)  # its tombstone lands in the lent volume now
    store.close()
    again = new_tiered(tmp_path)
    assert b"".join(await read(again, "v.3", 0, len(data))) == data
    again.close()


async def test_a_delete_racing_the_return_and_a_second_delete_count_the_part_once(
    tmp_path: Path,
) -> None:
    store = new_tiered(tmp_path)
    await put(store, "own.0", payload(1000, seed=9))
    volume = await borrow(store)
    store.packed.adopt(W, append(volume, "k.0", payload(300)))
    store.packed.adopt(W, append(volume, "k.1", payload(300, seed=1)))
    results: list[bool] = []

    async def delete(key: str) -> None:
        results.append(await store.packed.delete(key))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(delete, "k.0")
        nursery.start_soon(delete, "k.0")
        nursery.start_soon(store.packed.give_back, W, volume.loan.volume, volume.end)
        nursery.start_soon(delete, "k.1")
    assert sorted(results) == [False, True, True]
    assert await store.used_bytes() == 1000
    store.close()
    again = new_tiered(tmp_path)
    assert await again.keys() == ["own.0"]
    again.close()


async def test_a_return_past_what_the_borrower_could_have_written_is_refused(
    tmp_path: Path,
) -> None:
    store = new_tiered(tmp_path, volume_size=4096)
    volume = await borrow(store)
    store.packed.adopt(W, append(volume, "k.0", payload(100)))
    with pytest.raises(InvalidRequest):
        await store.packed.give_back(W, volume.loan.volume, 1 << 40)
    assert store.packed.lent == {volume.loan.volume: W}
    with pytest.raises(InvalidRequest):  # larger than a packed part
        store.adopt(W, attrs.evolve(append(volume, "k.1", payload(10)), length=1 << 30))
    await give_back(store, volume)


async def test_restarts_do_not_pile_up_volumes(tmp_path: Path) -> None:
    """Each open starts a new volume for the node's appends and deletes the empty ones; a
    loan takes a volume with room before a new one: the count stays bounded."""
    datas: dict[str, bytes] = {}
    counts = []
    for run in range(6):
        store = new_tiered(tmp_path)
        volume = await borrow(store)
        for i in range(3):
            key = f"k.{run * 3 + i}"
            datas[key] = payload(300, seed=run * 3 + i)
            store.packed.adopt(W, append(volume, key, datas[key]))
        await put(store, f"own.{run}", payload(100, seed=run))
        datas[f"own.{run}"] = payload(100, seed=run)
        volume.close()
        store.close()  # its loan ends with it
        counts.append(len(os.listdir(tmp_path / "volumes")))
    assert max(counts) <= 4, counts  # the growth stops (it was one more or two every run)
    again = new_tiered(tmp_path)
    assert await again.keys() == sorted(datas)
    for key, data in datas.items():
        assert b"".join(await read(again, key, 0, len(data))) == data
    again.close()


async def test_a_volume_lent_again_is_appended_after_what_it_holds(tmp_path: Path) -> None:
    store = new_tiered(tmp_path)
    first = await borrow(store)
    store.packed.adopt(W, append(first, "k.0", payload(500)))
    await give_back(store, first)
    second = await borrow(store)
    assert second.loan.volume == first.loan.volume  # room left in it: lent again
    assert second.loan.start == second.end >= first.end
    store.packed.adopt(W, append(second, "k.1", payload(500, seed=1)))
    await give_back(store, second)
    store.close()
    again = new_tiered(tmp_path)
    assert b"".join(await read(again, "k.0", 0, 500)) == payload(500)
    assert b"".join(await read(again, "k.1", 0, 500)) == payload(500, seed=1)
    again.close()


async def test_a_volume_lent_when_the_node_stopped_is_never_its_active_one(
    tmp_path: Path,
) -> None:
    store = new_tiered(tmp_path)
    volume = await borrow(store)  # the highest volume, lent
    store.packed.adopt(W, append(volume, "k.0", payload(100)))
    for file in store.packed.volumes.values():  # a crash: the loan is never ended
        os.close(file.fd)
    again = new_tiered(tmp_path)
    assert again.packed.lent == {}
    await put(again, "k.1", payload(100, seed=1))
    ref = again.packed.index.get("k.1")
    assert ref is not None
    assert ref.volume > volume.loan.volume  # a new volume: a late append cannot land on it
    again.close()
    third = new_tiered(tmp_path)  # no loans this time: the last volume is appended to again
    await put(third, "k.2", payload(100, seed=2))
    assert third.packed.index.get("k.2").volume == ref.volume  # type: ignore[union-attr]
    assert await third.keys() == ["k.0", "k.1", "k.2"]
    third.close()


def crash(store: TieredPartStore) -> None:
    """The node's process dies: its loans never end, their record is not rewritten."""
    for file in store.packed.volumes.values():
        os.close(file.fd)


@pytest.mark.parametrize("damage", [b"\xff\xfe\n", "1\n\u00b2\n".encode()], ids=["bytes", "digit"])
async def test_a_damaged_lent_record_counts_every_volume_as_lent_before(
    tmp_path: Path, damage: bytes
) -> None:
    """A record that is not the ids it should be (a non-ASCII digit among them too) opens
    the store all the same, none of its volumes appended to or lent again in this run."""
    store = new_tiered(tmp_path)
    old = await borrow(store)
    store.packed.adopt(W, append(old, "k.0", payload(300)))
    crash(store)
    (tmp_path / "volumes" / "lent").write_bytes(damage)
    again = new_tiered(tmp_path)
    await put(again, "k.1", payload(100, seed=1))
    new = await borrow(again)
    assert new.loan.volume != old.loan.volume
    assert again.packed.index.get("k.1").volume not in (old.loan.volume, new.loan.volume)  # type: ignore[union-attr]
    assert await again.keys() == ["k.0", "k.1"]
    again.close()


async def test_a_volume_lent_when_the_node_crashed_is_not_lent_again(tmp_path: Path) -> None:
    """A worker of before may still append to it, at the end of what it holds: where a new
    borrower of it would begin."""
    store = new_tiered(tmp_path)
    old = await borrow(store)
    store.packed.adopt(W, append(old, "k.0", payload(300)))
    crash(store)  # the old worker lives on a little
    again = new_tiered(tmp_path)
    new = await borrow(again)
    again.packed.adopt(W, append(new, "k.1", payload(300, seed=1)))
    append(old, "k.late", payload(300, seed=2))  # the old worker's late append
    assert new.loan.volume != old.loan.volume
    assert b"".join(await read(again, "k.1", 0, 300)) == payload(300, seed=1)
    again.close()  # a clean end: the volume may be lent again in the next run
    third = new_tiered(tmp_path)
    assert (await borrow(third)).loan.volume == old.loan.volume
    third.close()


async def test_a_cancelled_lend_leaves_no_volume_lent(tmp_path: Path) -> None:
    store = new_tiered(tmp_path)
    packed = store.packed
    held = trio.Event()
    release = trio.Event()

    async def record_in_flight() -> None:
        async with packed._loans._lock:  # a write of the record in flight
            held.set()
            await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(record_in_flight)
        await held.wait()
        with trio.CancelScope() as scope:
            nursery.start_soon(lambda: _cancel_when(scope, packed))
            await packed.lend(W)
        release.set()
    assert scope.cancelled_caught
    assert packed.lent == {}
    store.close()


async def _cancel_when(scope: trio.CancelScope, packed: PackedStore) -> None:
    """Cancel ``scope`` once a lend has marked a volume lent (it then waits for the lock)."""
    while not packed.lent:
        await trio.lowlevel.checkpoint()
    scope.cancel()


async def test_a_key_deleted_from_a_lent_volume_is_not_adopted_again_below(
    tmp_path: Path,
) -> None:
    """A borrower writes new keys only; one whose tombstone is still to come is refused,
    since a copy in a lower volume lent again would lose to the old one on open."""
    store = new_tiered(tmp_path)
    await put(store, "own.0", payload(100))  # volume 1
    a = await borrow(store)  # volume 2
    store.packed.adopt(W, append(a, "k", payload(300)))
    await put(store, "own.1", payload(100, seed=1))  # the node rolls above; 1 has room
    assert await store.packed.delete("k")  # its tombstone waits: 2 is lent
    b = await borrow(store)
    assert b.loan.volume == 1
    with pytest.raises(UploadConflict):
        store.packed.adopt(W, append(b, "k", payload(300, seed=9)))
    store.close()
