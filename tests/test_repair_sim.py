"""Repair in the simulator: lost parts of redundant files are rebuilt on other nodes, whether
their node went away for good, rotted (found by the scrubber or by a reader) or came back
with an empty disk; raid0 parts cannot be and are not."""

from __future__ import annotations

import logging

import attrs
import pytest
import trio
from test_redundancy_sim import ENGINES, corrupt, discovery, lose, make, payload, read

from karma8.actors.repair import RepairConfig
from karma8.actors.storage import StorageNode
from karma8.core.model import FileVersion
from karma8.sim import checker
from karma8.sim.cluster import SimCluster
from karma8.sim.runner import run_with_cluster
from karma8.sim.scenario import ClusterSpec, Scenario
from karma8.sim.workload import BytesChunks

REPAIR_AFTER = 30.0
SCENARIO = Scenario(
    name="repair",
    cluster=ClusterSpec(
        storage_nodes=13,
        stripe_unit=4,
        retire_grace=2.0,
        node_timeout=2.0,
        heartbeat_interval=0.5,
        sweep_interval=0.5,
        orphan_check_interval=5.0,
    ),
    repair=RepairConfig(interval=1.0, repair_after=REPAIR_AFTER, bandwidth=0),
)
SIZES = [0, 1, 6, 21, 1003, 40_000]


async def put_files(cluster: SimCluster, namespace: str) -> dict[str, bytes]:
    files = {}
    for size in SIZES:
        data = payload(size, size % 7)
        await cluster.gateway.put(namespace, f"f/{size}", BytesChunks(data, 97))
        files[f"f/{size}"] = data
    return files


async def versions(cluster: SimCluster, namespace: str, names: list[str]) -> list[FileVersion]:
    return [await cluster.gateway.stat(namespace, name) for name in names]


async def settle(cluster: SimCluster, seconds: float) -> None:
    await trio.sleep(seconds)
    assert checker.fully_redundant(cluster) == []
    assert checker.layout_holds(cluster) == []  # every part on its own node, intact


def storage_actor(cluster: SimCluster, node_id: str) -> StorageNode:
    actor = cluster.network.endpoint(node_id).actor
    assert isinstance(actor, StorageNode)
    return actor


@pytest.mark.parametrize(("engine", "settings"), ENGINES)
def test_a_node_gone_for_repair_after_has_its_parts_rebuilt_elsewhere(
    engine: str, settings: dict[str, int]
) -> None:
    async def go(cluster: SimCluster) -> None:
        namespace = await make(cluster, engine, settings)
        files = await put_files(cluster, namespace)
        big = await cluster.gateway.stat(namespace, "f/40000")
        # The node of the last slot (a parity part, or a second copy) and of data part 0.
        gone = [big.parts[-1].node.node_id, big.parts[0].node.node_id][: big.layout.tolerates]
        for node in gone:
            await lose(cluster, node)
        before = await versions(cluster, namespace, list(files))
        on_gone = [v for v in before if {p.node.node_id for p in v.parts} & set(gone)]
        lost = sum(p.node.node_id in gone for v in before for p in v.parts)
        await trio.sleep(REPAIR_AFTER / 2)  # away, but not long enough: nothing moves yet
        status = await discovery(cluster).moves.repair_status(repair_after=REPAIR_AFTER)
        assert (status.degraded_files, status.lost_parts) == (len(on_gone), lost)
        assert (status.due_parts, status.repaired_parts) == (0, 0)
        await settle(cluster, REPAIR_AFTER + 10)
        status = await discovery(cluster).moves.repair_status(repair_after=REPAIR_AFTER)
        assert (status.lost_parts, status.degraded_files) == (0, 0)
        assert status.repaired_parts == lost
        for version in await versions(cluster, namespace, list(files)):
            assert not {p.node.node_id for p in version.parts} & set(gone)
        # Full redundancy again: as many more nodes may go, every file still reads back.
        big = await cluster.gateway.stat(namespace, "f/40000")
        for slot in (1, 3)[: big.layout.tolerates]:
            await lose(cluster, big.parts[slot].node.node_id)
        for name, data in files.items():
            assert await read(cluster.gateway, namespace, name) == data, name

    run_with_cluster(go, scenario=SCENARIO)


@pytest.mark.parametrize(("engine", "settings"), ENGINES)
def test_a_part_the_scrubber_quarantines_is_rebuilt_at_once(
    engine: str, settings: dict[str, int]
) -> None:
    async def go(cluster: SimCluster) -> None:
        namespace = await make(cluster, engine, settings)
        data = payload(40_000, 5)
        version = await cluster.gateway.put(namespace, "c", BytesChunks(data, 333))
        slot = version.layout.slots - 1
        corrupt(cluster, version, slot)
        rotten = version.parts[slot].node.node_id
        report = await storage_actor(cluster, rotten).scrub()
        assert report.corrupt == (version.parts[slot].key,)
        await settle(cluster, 5.0)  # well before repair_after: a reported loss goes first
        repaired = await cluster.gateway.stat(namespace, "c")
        assert repaired.parts[slot].node.node_id != rotten
        assert repaired.parts[slot].checksum == version.parts[slot].checksum
        assert await read(cluster.gateway, namespace, "c") == data

    run_with_cluster(go, scenario=SCENARIO)


def test_a_read_that_meets_a_corrupt_part_reports_it_for_repair() -> None:
    async def go(cluster: SimCluster) -> None:
        namespace = await make(cluster, "parity", {"parity": 1})
        data = payload(1003, 2)
        version = await cluster.gateway.put(namespace, "r", BytesChunks(data, 50))
        corrupt(cluster, version, 2)
        assert await read(cluster.gateway, namespace, "r") == data
        await settle(cluster, 5.0)
        repaired = await cluster.gateway.stat(namespace, "r")
        assert repaired.parts[2].node != version.parts[2].node

    run_with_cluster(go, scenario=SCENARIO)


def test_a_node_back_with_an_empty_disk_reports_its_missing_parts() -> None:
    async def go(cluster: SimCluster) -> None:
        namespace = await make(cluster, "raid1", {"copies": 2})
        files = await put_files(cluster, namespace)
        node = (await cluster.gateway.stat(namespace, "f/1003")).parts[0].node.node_id
        cluster.crash(node)
        disk = cluster.disk_of(node)
        assert disk is not None
        wiped = set(disk.wipe())
        cluster.restart(node)  # same node id, empty disk: available, but holding nothing
        # Its first parts check (orphan_check_interval) finds them missing; no read needed.
        await settle(cluster, 10.0)
        for version in await versions(cluster, namespace, list(files)):
            assert not {p.key for p in version.parts if p.node.node_id == node} & wiped
        for name, data in files.items():
            assert await read(cluster.gateway, namespace, name) == data

    run_with_cluster(go, scenario=SCENARIO)


def test_raid0_parts_cannot_be_repaired_and_nothing_moves() -> None:
    async def go(cluster: SimCluster) -> None:
        files = await put_files(cluster, "default")
        node = (await cluster.gateway.stat("default", "f/1003")).parts[0].node.node_id
        await lose(cluster, node)
        await trio.sleep(REPAIR_AFTER + 10)
        status = await discovery(cluster).moves.repair_status(repair_after=REPAIR_AFTER)
        assert status.degraded_files > 0  # counted below full redundancy ...
        assert (status.lost_parts, status.repairing_parts, status.repaired_parts) == (0, 0, 0)
        for version in await versions(cluster, "default", list(files)):  # ... and left alone
            assert len({p.node.node_id for p in version.parts}) == 5

    run_with_cluster(go, scenario=SCENARIO)


def test_repair_waits_for_a_target_when_no_node_may_take_the_part() -> None:
    """7 nodes, parity 5+2: with one gone, no node holds none of a file's parts; repair
    moves nothing (never two parts of a file on one node) and finishes once a node joins."""
    few = attrs.evolve(SCENARIO, cluster=attrs.evolve(SCENARIO.cluster, storage_nodes=7))

    async def go(cluster: SimCluster) -> None:
        namespace = await make(cluster, "parity", {"parity": 2})
        files = await put_files(cluster, namespace)
        node = (await cluster.gateway.stat(namespace, "f/1003")).parts[3].node.node_id
        await lose(cluster, node)
        await trio.sleep(REPAIR_AFTER + 10)
        assert cluster.repairer is not None
        status = await cluster.repairer.status()  # what `karma8 nodes` says
        assert status.due_parts == status.waiting_parts == len(files)
        assert status.repaired_parts == 0
        assert checker.layout_holds(cluster) == []
        await cluster.add_node()
        await settle(cluster, 10.0)
        for name, data in files.items():
            assert await read(cluster.gateway, namespace, name) == data
        status = await cluster.repairer.status()
        assert status.due_parts == status.waiting_parts == 0
        assert status.repaired_parts == len(files)

    run_with_cluster(go, scenario=few)


def test_parts_that_cannot_be_rebuilt_are_told_once_and_not_tried(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Parity 5+1 with two nodes gone: the files with a part on each have 4 readable parts of
    the 5 a rebuild needs. Repair does not try them (no warning per part and pass, no false
    "waiting for a node" reason), says so once, and rebuilds them once a node is back."""

    async def go(cluster: SimCluster) -> None:
        namespace = await make(cluster, "parity", {"parity": 1})
        files = await put_files(cluster, namespace)
        big = await cluster.gateway.stat(namespace, "f/40000")
        gone = [big.parts[0].node.node_id, big.parts[1].node.node_id]
        before = await versions(cluster, namespace, list(files))
        stuck = [v for v in before if set(gone) <= {p.node.node_id for p in v.parts}]
        assert stuck
        caplog.set_level(logging.INFO, logger="karma8.repair")
        for node in gone:
            cluster.crash(node)
        await trio.sleep(REPAIR_AFTER * 3)  # 90 passes of repair
        assert cluster.repairer is not None
        status = await cluster.repairer.status()
        assert status.unrebuildable_parts == 2 * len(stuck)
        assert (status.due_parts, status.waiting_parts, status.repairing_parts) == (0, 0, 0)
        assert status.lost_parts == status.unrebuildable_parts  # the others were rebuilt
        repair_logs = [r for r in caplog.records if r.name == "karma8.repair"]
        assert [r.getMessage() for r in repair_logs if r.levelno >= logging.WARNING] == [
            f"{2 * len(stuck)} lost parts cannot be rebuilt: too few readable parts of their"
            " file; they wait for a node to return"
        ]
        caplog.clear()
        cluster.restart(gone[0])
        await settle(cluster, 10.0)
        status = await cluster.repairer.status()
        assert (status.lost_parts, status.unrebuildable_parts) == (0, 0)
        messages = [r.getMessage() for r in caplog.records if r.name == "karma8.repair"]
        assert "no lost part is left that cannot be rebuilt" in messages
        assert not [
            r for r in caplog.records if r.name == "karma8.repair" and r.levelno >= logging.WARNING
        ]
        for name, data in files.items():
            assert await read(cluster.gateway, namespace, name) == data

    run_with_cluster(go, scenario=SCENARIO)
