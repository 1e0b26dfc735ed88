"""The simulator's disk packs small parts as the packed engine does, and loses what a crash
loses: needles whose commit had not synced."""

from __future__ import annotations

import random
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from karma8.core.errors import IntegrityError, StorageFailure, UploadConflict
from karma8.sim.disk import MemoryDisk
from karma8.sim.runner import run_scenario
from karma8.sim.scenario import DiskSpec, load_scenario

from storehelpers import payload, put, read

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"


def new_disk(seed: int = 0, **kwargs: int) -> MemoryDisk:
    return MemoryDisk(capacity_bytes=1 << 30, rng=random.Random(seed), sleep=trio.sleep, **kwargs)


async def test_small_parts_are_needles_and_large_ones_are_not() -> None:
    disk = new_disk(small_part_max=100)
    await put(disk, "s.0", payload(100))
    await put(disk, "l.0", payload(101))
    assert "s.0" in disk.index
    assert list(disk.files) == ["l.0"]
    assert sorted(disk.parts) == ["l.0", "s.0"]
    assert disk.parts["s.0"].data == payload(100)
    assert b"".join(await read(disk, "s.0", 10, 20)) == payload(100)[10:30]
    assert await disk.used_bytes() == 201
    with pytest.raises(UploadConflict):
        await put(disk, "s.0", payload(3))


@pytest.mark.parametrize("seed", range(8))
async def test_a_crash_loses_only_commits_in_flight(
    seed: int, mock_clock: trio.testing.MockClock
) -> None:
    disk = new_disk(seed)
    mock_clock.autojump_threshold = 0  # the first parts' syncs take no real time
    for i in range(5):
        await put(disk, f"k.{i}", payload(50 + i, seed=i))
    # From here time stands still: the late parts wait in their syncs when the crash comes,
    # however slow the machine (with a real clock a sync could end first).
    mock_clock.autojump_threshold = float("inf")
    failed: list[str] = []

    async def late(key: str) -> None:
        try:
            await put(disk, key, payload(77, seed=9))
        except StorageFailure:
            failed.append(key)

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(late, f"late.{i}")
        await trio.testing.wait_all_tasks_blocked()
        disk.crash()
        mock_clock.autojump_threshold = 0
    assert sorted(failed) == ["late.0", "late.1", "late.2"]
    assert await disk.keys() == [f"k.{i}" for i in range(5)]
    for i in range(5):
        assert b"".join(await read(disk, f"k.{i}", 0, 50 + i)) == payload(50 + i, seed=i)
    assert await disk.used_bytes() == sum(50 + i for i in range(5))
    await put(disk, "after.0", payload(5))  # appends go on after the recovered end
    assert "after.0" in await disk.keys()


async def test_deletes_compaction_and_damage() -> None:
    disk = new_disk()
    for i in range(200):
        await put(disk, f"k.{i}", payload(1000, seed=i))
    for i in range(150):
        assert await disk.delete(f"k.{i}")
    assert disk.compactions >= 1
    assert len(disk.volume) < 80 * 1100
    disk.crash()  # nothing in flight: a recovery keeps every live part
    assert await disk.keys() == sorted(f"k.{i}" for i in range(150, 200))
    stored = disk.parts["k.160"]
    stored.data = bytes([stored.data[0] ^ 1]) + stored.data[1:]
    with pytest.raises(IntegrityError):
        await read(disk, "k.160", 0, 1)
    assert not await disk.verify("k.160")
    assert await disk.quarantine("k.160")
    assert "k.160" in disk.quarantined
    assert await disk.used_bytes() == 49 * 1000


def test_crash_restart_with_commits_caught_unsynced(monkeypatch: pytest.MonkeyPatch) -> None:
    # A slow sync (50 ms) so that the node's crash finds commits waiting for it: their needles
    # are lost, and every invariant of the scenario still holds.
    lost: list[int] = []
    real_crash = MemoryDisk.crash

    def crash(disk: MemoryDisk) -> None:
        lost.append(len(disk._unsynced))
        real_crash(disk)

    monkeypatch.setattr(MemoryDisk, "crash", crash)
    scenario = attrs.evolve(
        load_scenario(SCENARIOS / "crash_restart.toml"), disk=DiskSpec(fsync_latency=0.05)
    )
    # Whether the crash finds commits waiting depends on the seed's schedule: seeds in turn
    # until one does (most do), every run's invariants holding.
    for seed in range(8):
        result = run_scenario(scenario, seed)
        assert result.ok, (seed, result.violations)
        if sum(lost) > 0:
            return
    pytest.fail(f"no seed's crash found commits waiting for their sync: {lost}")
