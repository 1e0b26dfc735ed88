"""Small PUTs: a placement lease in discovery's memory, then one metadata transaction.

Between the part writes and the commit no row names the parts; these tests pin what makes
that safe: a leased part is never an orphan, a lease that ran out cannot commit, and the
parts of a gateway that died are collected.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from karma8.actors.discovery import Discovery
from karma8.core.errors import PreconditionFailed, UploadConflict
from karma8.core.layout import StripeLayout, split
from karma8.core.leases import Lease, PlacementLeases
from karma8.core.model import FileVersion, PartReceipt, VersionState
from karma8.sim.cluster import SimCluster
from karma8.sim.runner import run_with_cluster
from karma8.sim.scenario import ClusterSpec, Scenario
from karma8.sim.workload import BytesChunks

SCENARIO = Scenario(
    name="small-puts",
    cluster=ClusterSpec(
        storage_nodes=6,
        stripe_unit=4,
        retire_grace=1.0,
        placement_lease=5.0,
        heartbeat_interval=0.5,
        sweep_interval=0.5,
        orphan_check_interval=1.0,
        orphan_grace=2.0,
    ),
)


def payload(size: int, salt: int = 0) -> bytes:
    return bytes((i * 31 + salt) % 256 for i in range(size))


def discovery(cluster: SimCluster) -> Discovery:
    assert cluster.discovery is not None
    return cluster.discovery


def keys_of(cluster: SimCluster, version_id: str) -> list[str]:
    return sorted(
        key for node in cluster.nodes for key in node.disk.parts if key.startswith(version_id)
    )


async def write_parts(cluster: SimCluster, version_id: str, data: bytes) -> list[PartReceipt]:
    """What a gateway does between placement and commit: write the 5 parts."""
    d = discovery(cluster)
    lease = d.leases.get(version_id, cluster.world.clock.now())
    assert lease is not None
    version = lease.pending_version()
    receipts = []
    for placement, part in zip(version.parts, split(version.layout, data), strict=True):
        stored = await cluster.gateway._storage.put_part(
            placement.node, placement.key, BytesChunks(part, 3)
        )
        receipts.append(
            PartReceipt(index=placement.index, size=stored.size, checksum=stored.checksum)
        )
    return receipts


def test_a_small_put_writes_no_pending_row_and_commits_once() -> None:
    async def go(cluster: SimCluster) -> None:
        store = cluster.store
        begun: list[object] = []
        original = store.begin_version

        def begin_version(**kwargs: Any) -> FileVersion:
            begun.append(kwargs)
            return original(**kwargs)

        store.begin_version = begin_version  # type: ignore[method-assign]
        data = payload(57)
        version = await cluster.gateway.put("default", "a", BytesChunks(data, 5), content_length=57)
        assert version.state is VersionState.COMMITTED
        assert version.size == 57
        assert begun == []  # no begin transaction
        assert len(discovery(cluster).leases) == 0
        assert all(n.reserved_bytes == 0 for n in store.list_nodes())
        assert sum(n.used_bytes for n in store.list_nodes()) == 57
        # Overwriting retires the old version in the same transaction.
        second = await cluster.gateway.put("default", "a", BytesChunks(b"xy", 5), content_length=2)
        assert store.current_version("default", "a") == second
        assert [v.version_id for v in store.versions(VersionState.RETIRED)] == [version.version_id]

    run_with_cluster(go, scenario=SCENARIO)


def test_leased_parts_are_known_to_the_orphan_check_until_the_lease_ends() -> None:
    async def go(cluster: SimCluster) -> None:
        d = discovery(cluster)
        version = await d.place_upload(namespace="default", name="f", size=10)
        await write_parts(cluster, version.version_id, payload(10))
        for placement in version.parts:
            node = placement.node.node_id
            assert await d.unknown_parts(node_id=node, keys=[placement.key]) == []
        # Longer than orphan_check_interval + orphan_grace, within the lease: kept.
        await trio.sleep(4.0)
        assert len(keys_of(cluster, version.version_id)) == 5
        # The lease ends: the parts are orphans, and the nodes collect them.
        await trio.sleep(1.5)
        placement = version.parts[0]
        assert await d.unknown_parts(node_id=placement.node.node_id, keys=[placement.key]) == [
            placement.key
        ]
        await trio.sleep(5.0)
        assert keys_of(cluster, version.version_id) == []
        assert len(d.leases) == 0  # the sweeper dropped it

    run_with_cluster(go, scenario=SCENARIO)


def test_a_commit_after_its_lease_expired_fails_and_the_gateway_cleans_up() -> None:
    async def go(cluster: SimCluster) -> None:
        d = discovery(cluster)
        version = await d.place_upload(namespace="default", name="late", size=10)
        receipts = await write_parts(cluster, version.version_id, payload(10))
        await trio.sleep(5.0)  # the lease has run out (the sweeper may not have seen it yet)
        with pytest.raises(UploadConflict):
            await d.commit_upload(version_id=version.version_id, size=10, receipts=receipts)
        assert cluster.store.current_version("default", "late") is None

    run_with_cluster(go, scenario=SCENARIO)


def test_a_gateway_whose_commit_comes_too_late_fails_and_deletes_its_parts() -> None:
    async def go(cluster: SimCluster) -> None:
        gw = cluster.gateway
        client = gw._discovery
        commit = client.commit_upload

        async def late(**kwargs: Any) -> FileVersion:
            await trio.sleep(6.0)  # longer than the lease
            return await commit(**kwargs)

        client.commit_upload = late  # type: ignore[method-assign]
        with pytest.raises(UploadConflict):
            await gw.put("default", "late", BytesChunks(payload(10), 3), content_length=10)
        assert cluster.store.current_version("default", "late") is None
        assert [k for node in cluster.nodes for k in node.disk.parts] == []
        assert len(discovery(cluster).leases) == 0

    run_with_cluster(go, scenario=SCENARIO)


def test_a_dead_gateways_parts_are_collected() -> None:
    async def go(cluster: SimCluster) -> None:
        d = discovery(cluster)
        version = await d.place_upload(namespace="default", name="dead", size=23)
        await write_parts(cluster, version.version_id, payload(23))
        # The gateway dies here: no commit, no abort.
        await trio.sleep(5.0 + 1.0 + 2.0 + 2.0)
        assert keys_of(cluster, version.version_id) == []
        assert len(d.leases) == 0
        assert all(n.reserved_bytes == 0 for n in await d.list_nodes())

    run_with_cluster(go, scenario=SCENARIO)


def test_an_expired_leases_parts_go_to_the_nodes_as_garbage() -> None:
    # With the orphan check out of reach, only the heartbeats' garbage can collect them:
    # as soon as the lease has expired, as an aborted upload's parts are.
    slow_orphans = attrs.evolve(
        SCENARIO, cluster=attrs.evolve(SCENARIO.cluster, orphan_check_interval=1e6)
    )

    async def go(cluster: SimCluster) -> None:
        d = discovery(cluster)
        version = await d.place_upload(namespace="default", name="dead", size=23)
        await write_parts(cluster, version.version_id, payload(23))
        await trio.sleep(4.0)  # within the lease: kept
        assert len(keys_of(cluster, version.version_id)) == 5
        await trio.sleep(1.0 + 0.5 + 2 * 0.5 + 0.5)  # expiry, a sweep, two heartbeats
        assert keys_of(cluster, version.version_id) == []
        assert d.counts["expired_placements"] == 1
        # Reported deleted: not handed out again.
        assert d._expired_parts == {}

    run_with_cluster(go, scenario=slow_orphans)


def test_an_aborted_lease_releases_its_reservation_and_its_keys() -> None:
    async def go(cluster: SimCluster) -> None:
        d = discovery(cluster)
        version = await d.place_upload(namespace="default", name="gone", size=1000)
        reserved = {n.node_id: n.reserved_bytes for n in await d.list_nodes()}
        assert sorted(v for v in reserved.values() if v) == [200] * 5
        # A second placement sees the first's reservations: it prefers the sixth node.
        other = await d.place_upload(namespace="default", name="other", size=1000)
        free = set(reserved) - {p.node.node_id for p in version.parts}
        assert free <= {p.node.node_id for p in other.parts}
        aborted = await d.abort_upload(version_id=version.version_id)
        assert aborted.state is VersionState.ABORTED
        with pytest.raises(UploadConflict):
            await d.commit_upload(version_id=version.version_id, size=1000, receipts=[])
        await d.abort_upload(version_id=other.version_id)
        assert all(n.reserved_bytes == 0 for n in await d.list_nodes())

    run_with_cluster(go, scenario=SCENARIO)


def test_the_rebalancer_counts_leased_bytes_as_taken() -> None:
    async def go(cluster: SimCluster) -> None:
        d = discovery(cluster)
        await cluster.gateway.put("default", "f", BytesChunks(payload(50), 7), content_length=50)
        before = {
            f.node_id: f.free for f in (await d.moves.plan_rebalance(tolerance_pp=0, batch=1)).fills
        }
        version = await d.place_upload(namespace="default", name="g", size=1000)
        after = {
            f.node_id: f.free for f in (await d.moves.plan_rebalance(tolerance_pp=0, batch=1)).fills
        }
        for placement in version.parts:
            node = placement.node.node_id
            assert before[node] - after[node] == 200

    run_with_cluster(go, scenario=SCENARIO)


def test_if_absent_is_checked_at_placement_and_at_commit() -> None:
    async def go(cluster: SimCluster) -> None:
        d = discovery(cluster)
        gw = cluster.gateway
        await gw.put("default", "once", BytesChunks(b"abc", 2), content_length=3)
        with pytest.raises(PreconditionFailed):
            await d.place_upload(namespace="default", name="once", size=3, if_absent=True)
        # Placed while absent, committed after another upload created the name: refused.
        version = await d.place_upload(namespace="default", name="race", size=3, if_absent=True)
        receipts = await write_parts(cluster, version.version_id, b"xyz")
        await gw.put("default", "race", BytesChunks(b"123", 2), content_length=3)
        with pytest.raises(PreconditionFailed):
            await d.commit_upload(
                version_id=version.version_id, size=3, receipts=receipts, if_absent=True
            )

    run_with_cluster(go, scenario=SCENARIO)


def test_leases_hold_their_bytes_per_node() -> None:
    leases = PlacementLeases()
    layout = StripeLayout(parts=5, unit=4)
    lease = Lease(
        version_id="v",
        namespace="default",
        name="n",
        layout=layout,
        size=23,
        nodes=("a", "b", "c", "d", "e"),
        urls=("u",) * 5,
        reserved=layout.part_sizes(23),
        created_at=0.0,
        expires_at=10.0,
    )
    leases.grant(lease)
    assert leases.reserved_on("a") == 5
    assert leases.reserved_on("e") == 4
    moved = leases.move("v", 0, "f", "u")
    assert leases.reserved_on("a") == 0
    assert leases.reserved_on("f") == 5
    assert leases.keys_on("f", 9.9) == {"v.0"}
    assert leases.keys_on("f", 10.0) == set()
    assert leases.get("v", 10.0) is None
    assert leases.holds("v")
    assert leases.expire(10.0) == ["v"]
    assert len(leases) == 0
    assert leases.reserved_on("f") == 0
    assert attrs.evolve(moved).nodes[0] == "f"


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["grant", "move", "drop", "expire"]),
            st.integers(0, 5),  # which lease
            st.integers(0, 4),  # part index
            st.sampled_from("abcdefgh"),  # node
            st.integers(0, 20),  # size or time
        ),
        max_size=40,
    )
)
def test_leased_bytes_per_node_are_the_sum_over_held_leases(
    steps: list[tuple[str, int, int, str, int]],
) -> None:
    leases = PlacementLeases()
    layout = StripeLayout(parts=5, unit=4)
    held: dict[str, Lease] = {}
    for action, which, index, node, number in steps:
        version_id = f"v{which}"
        if action == "grant" and version_id not in held:
            lease = Lease(
                version_id=version_id,
                namespace="default",
                name=version_id,
                layout=layout,
                size=number,
                nodes=tuple("abcdefgh"[(which + i) % 8] for i in range(5)),
                urls=("u",) * 5,
                reserved=layout.part_sizes(number),
                created_at=0.0,
                expires_at=float(number),
            )
            leases.grant(lease)
            held[version_id] = lease
        elif action == "move" and version_id in held and node not in held[version_id].nodes:
            held[version_id] = leases.move(version_id, index, node, "u")
        elif action == "drop":
            assert (leases.drop(version_id) is None) == (version_id not in held)
            held.pop(version_id, None)
        elif action == "expire":
            for gone in leases.expire(float(number)):
                del held[gone]
        for n in "abcdefgh":
            want = sum(
                size
                for lease in held.values()
                for node_id, size in zip(lease.nodes, lease.reserved, strict=True)
                if node_id == n
            )
            assert leases.reserved_on(n) == want
    assert len(leases) == len(held)
