"""The contract suite: the same checks against the simulated world and real sockets.

Each check is written once against :class:`drivers.Driver`; ``world`` picks the adapters
(``net-pg``: real sockets with the metadata on PostgreSQL).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from karma8.core.errors import (
    InvalidName,
    NotFound,
    PreconditionFailed,
    StorageFailure,
    Unavailable,
)
from karma8.core.layout import split
from karma8.core.model import FileVersion, NodeState

from drivers import Check, Driver, eventually, run_in

WORLDS = ["sim", "net", "net-http", "net-pg"]


def payload(size: int, salt: int = 0) -> bytes:
    return bytes((i * 131 + salt * 7 + i // 251) % 256 for i in range(size))


async def round_trip_edge_sizes(d: Driver) -> None:
    row = 5 * d.unit
    for size in [0, 1, 4, 5, 6, row - 1, row, row + 1, 3 * row + 2]:
        data = payload(size, size)
        await d.put(f"edge/{size}", data)
        assert await d.get(f"edge/{size}") == data, size
        version = await d.stat(f"edge/{size}")
        sizes = [p.size for p in version.parts]
        assert sizes == [len(p) for p in split(version.layout, data)]
        assert len({p.node.node_id for p in version.parts}) == 5


async def chunked_upload(d: Driver) -> None:
    data = payload(12_345, 1)
    await d.put("chunked/file", data, chunked=True)
    assert await d.get("chunked/file") == data
    assert (await d.stat("chunked/file")).size == len(data)


async def range_reads(d: Driver) -> None:
    data = payload(7 * d.unit + 3, 2)
    await d.put("range", data)
    size = len(data)
    for start, stop in [(0, 1), (5, 6), (d.unit - 1, d.unit + 2), (100, size), (size - 3, size)]:
        assert await d.get("range", start, stop) == data[start:stop], (start, stop)


async def overwrite_and_delete_leave_no_parts(d: Driver) -> None:
    first = await d.put("x/y", payload(3000, 3))
    second = await d.put("x/y", payload(4000, 4))
    assert await d.get("x/y") == payload(4000, 4)

    async def only_the_second_versions_parts() -> bool:
        keys = await d.part_keys()
        assert len([k for k in keys if k.startswith(second)]) == 5  # never collected
        return not [k for k in keys if k.startswith(first)]

    await eventually(only_the_second_versions_parts)
    await d.delete("x/y")
    await d.delete("x/y")  # idempotent
    with pytest.raises(NotFound):
        await d.get("x/y")

    async def no_parts() -> bool:
        return await d.part_keys() == []

    await eventually(no_parts)


async def conditional_put_and_bad_names(d: Driver) -> None:
    await d.put("once", b"first", if_absent=True)
    with pytest.raises(PreconditionFailed):
        await d.put("once", b"second", if_absent=True)
    assert await d.get("once") == b"first"
    with pytest.raises((InvalidName, NotFound)):
        await d.put("a//b", b"x")
    with pytest.raises(NotFound):
        await d.get("never/written")


async def joined_node_receives_new_parts(d: Driver) -> None:
    for i in range(3):
        await d.put(f"before/{i}", payload(5000, i))
    node_id = await d.add_node()
    assert node_id in {n.node_id for n in await d.nodes()}
    version_id = await d.put("after", payload(5000, 9))
    placed = {p.node.node_id for p in (await d.stat("after")).parts}
    assert node_id in placed, (version_id, placed)


async def puts_avoid_a_dead_node_and_a_full_one(d: Driver) -> None:
    for i in range(2):
        await d.put(f"early/{i}", payload(5000, i))  # the nodes there now are no longer empty
    dead = await d.add_node()  # empty: the next PUT chooses it
    await d.kill_node(dead)
    for i in range(4):
        await d.put(f"dead/{i}", payload(5000, i))  # its part moves to another node
        assert dead not in {p.node.node_id for p in (await d.stat(f"dead/{i}")).parts}
    states = {n.node_id: n.state for n in await d.nodes()}
    assert states[dead] is NodeState.SUSPECT
    # A node too small for its part: without a size hint (chunked) nothing is reserved, so
    # it is chosen, and fails once its disk is full. That PUT fails; later ones avoid it.
    full = await d.add_node(capacity=2 * d.unit)
    with pytest.raises((StorageFailure, Unavailable)):
        await d.put("full/0", payload(20 * d.unit, 0), chunked=True)
    assert {n.node_id: n.state for n in await d.nodes()}[full] is NodeState.SUSPECT
    for i in range(1, 4):
        await d.put(f"full/{i}", payload(20 * d.unit, i), chunked=True)
        assert await d.get(f"full/{i}") == payload(20 * d.unit, i)
        assert full not in {p.node.node_id for p in (await d.stat(f"full/{i}")).parts}


async def held_and_streamed_bodies_release_every_reservation(d: Driver) -> None:
    # A body with a Content-Length up to small_file_max is held whole and placed under a
    # lease (one metadata transaction); a longer one streams through begin and commit.
    held = payload(3 * 5 * d.unit + 2, 5)
    streamed = payload((1 << 20) + 3, 6)
    for name, data in [("sized/held", held), ("sized/streamed", streamed)]:
        await d.put(name, data)
        assert await d.get(name) == data
        version = await d.stat(name)
        assert [p.size for p in version.parts] == [len(p) for p in split(version.layout, data)]
        assert len({p.node.node_id for p in version.parts}) == 5
    # A refused held PUT writes nothing and holds nothing.
    with pytest.raises(PreconditionFailed):
        await d.put("sized/held", b"again", if_absent=True)
    assert all(n.reserved_bytes == 0 for n in await d.nodes())
    live = {(await d.stat(name)).version_id for name in ("sized/held", "sized/streamed")}
    assert {k.rsplit(".", 1)[0] for k in await d.part_keys()} == live


async def _reads_with_a_node_down(d: Driver, engine: str, nodes: int, **settings: int) -> None:
    """A redundant namespace: its files read back whole and in ranges with a node down."""
    joined = [await d.add_node() for _ in range(nodes)]  # empty: new parts go there first
    await d.create_namespace("safe", engine=engine, **settings)
    d.namespace = "safe"
    files = {f"f{size}": payload(size, size) for size in [0, 3, 5 * d.unit + 2, 40_003]}
    for name, data in files.items():
        await d.put(name, data, chunked=len(data) > 5)
    # Kill the joined node that holds parts of the most files (raid1 puts a part of every
    # file on every one of its 10 nodes; parity leaves one of 7 out of each file).
    holders = {n: 0 for n in joined}
    for name in files:
        for node in {p.node.node_id for p in (await d.stat(name)).parts} & set(joined):
            holders[node] += 1
    victim = max(joined, key=lambda n: holders[n])
    assert holders[victim] >= 2, holders  # most files are read with a part lost
    await d.kill_node(victim)
    for name, data in files.items():
        assert await d.get(name) == data, name
        if len(data) > 2:
            assert await d.get(name, 1, len(data) - 1) == data[1:-1], name


async def raid1_reads_with_a_node_down(d: Driver) -> None:
    await _reads_with_a_node_down(d, "raid1", 4, copies=2)


async def parity_reads_with_a_node_down(d: Driver) -> None:
    await _reads_with_a_node_down(d, "parity", 1, parity=1)


async def _put_onto(d: Driver, nodes: set[str], size: int) -> tuple[str, FileVersion]:
    """The name and version of a file of ``size`` bytes put with parts on all of ``nodes``
    (files are put until one is)."""
    for i in range(20):
        name = f"on/{size}/{i}"
        await d.put(name, payload(size, i))
        version = await d.stat(name)
        if nodes <= {p.node.node_id for p in version.parts}:
            return name, version
    raise AssertionError(f"no file of {size} bytes was placed on all of {nodes}")


async def a_read_with_a_node_down_names_it(d: Driver) -> None:
    """A raid0 file with a part on a node that is down: 503 unavailable, saying which part
    of which file is on which node (not only that some service did not answer), and no
    internal address."""
    dead = await d.add_node()  # empty: the next PUTs choose it
    # Read whole before the answer starts, and streamed (its parts opened first).
    files = [await _put_onto(d, {dead}, size) for size in (5000, 100_003)]
    await d.kill_node(dead)
    for name, version in files:
        [part] = [p.index for p in version.parts if p.node.node_id == dead]
        with pytest.raises(Unavailable) as refused:
            await d.get(name)
        message = refused.value.message
        told = f"part {part} of default/{name} is on node {dead}, which does not answer"
        assert told in message, message
        assert "://" not in message, message


async def a_parity_read_past_its_parity_counts_the_nodes_down(d: Driver) -> None:
    """A parity file with more parts on nodes that are down than its parity rebuilds: 503
    unavailable, saying how many parts are lost, on which nodes, and how many the parity
    rebuilds."""
    dead = {await d.add_node() for _ in range(2)}  # empty: the next PUTs choose them
    await d.create_namespace("safe", engine="parity", parity=1)
    d.namespace = "safe"
    name, version = await _put_onto(d, dead, 40_003)
    for node in dead:
        await d.kill_node(node)
    with pytest.raises(Unavailable) as refused:
        await d.get(name)
    message = refused.value.message
    assert message.startswith(f"safe/{name}: 2 of its 6 parts cannot be read;"), message
    assert "parity 1 rebuilds at most 1" in message, message
    for p in version.parts:
        if p.node.node_id in dead:
            told = f"part {p.index} is on node {p.node.node_id}, which does not answer"
            assert told in message, message
    assert "://" not in message, message


CHECKS: list[Check] = [
    round_trip_edge_sizes,
    chunked_upload,
    range_reads,
    overwrite_and_delete_leave_no_parts,
    conditional_put_and_bad_names,
    joined_node_receives_new_parts,
    puts_avoid_a_dead_node_and_a_full_one,
    held_and_streamed_bodies_release_every_reservation,
    raid1_reads_with_a_node_down,
    parity_reads_with_a_node_down,
    a_read_with_a_node_down_names_it,
    a_parity_read_past_its_parity_counts_the_nodes_down,
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("world", WORLDS)
def test_contract(world: str, check: Check, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    metadata_url = request.getfixturevalue("pg_url") if world == "net-pg" else None
    run_in(world, check, tmp_path, metadata_url=metadata_url)
