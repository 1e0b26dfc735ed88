"""Corruption on a real node's disk: reads fail rather than lie, and the scrubber finds it."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from karma8.actors.storage import StorageNode
from karma8.core.errors import NotFound
from karma8.net import admin
from karma8.net.status_view import fetch_status
from karma8.ports import StoredPart

from drivers import eventually, net_config, net_driver
from storehelpers import flip_bit, part_location


def flip_payload_byte(root: Path, key: str, at: int) -> None:
    """Flip a bit of byte ``at`` of a part's payload, a part file or a packed needle."""
    path, start = part_location(root, key)
    flip_bit(path, start + at)


# Parts read by the gateway in-process (embedded cluster) and over HTTP (separate processes).
LOCAL_OR_HTTP = pytest.mark.parametrize("local_calls", [True, False], ids=["embedded", "http"])


async def read_failures(client: httpx.AsyncClient, gateway: str) -> float:
    """The gateway's count of reads cut short mid-stream (the process's registry counts
    every cluster this test process ran, hence a difference)."""
    text = (await client.get(f"{gateway}/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "karma8_gateway_read_failures_total":
                return float(sample.value)
    raise AssertionError("no karma8_gateway_read_failures_total in /metrics")


async def damaged_get(client: httpx.AsyncClient, url: str, *, cut: bool) -> None:
    """GET ``url``, a file with a damaged part: cut short after its status line if ``cut``,
    else a ``502 integrity_error`` before it. Never a complete body."""
    if cut:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(url)
        return
    response = await client.get(url)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "integrity_error"


def quarantined(root: Path, key: str) -> bool:
    return bool(list(root.glob(f"storage-*/quarantine/{key}")))


def payload(size: int, salt: int) -> bytes:
    return bytes((i * 13 + salt) % 256 for i in range(size))


async def flip_first_byte(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """The chunks, with the first byte flipped (damage on the way)."""
    first = True
    async for chunk in chunks:
        if first and chunk:
            chunk = bytes([chunk[0] ^ 0x01]) + chunk[1:]
            first = False
        yield chunk


@LOCAL_OR_HTTP
async def test_flipped_and_truncated_parts_never_read_back_complete(
    tmp_path: Path, local_calls: bool
) -> None:
    async with net_driver(tmp_path, local_calls=local_calls) as net:
        await net.put("flipped", payload(500_000, 1))  # streamed: more than 64 KiB
        await net.put("small-flipped", payload(50_000, 4))  # read whole before answering
        await net.put("truncated", payload(500_000, 2))
        await net.put("healthy", payload(50_000, 3))
        flipped = (await net.stat("flipped")).parts[1].key
        small_flipped = (await net.stat("small-flipped")).parts[2].key
        truncated = (await net.stat("truncated")).parts[3].key

        for key in (flipped, small_flipped):  # a part file, and a part packed in a volume
            flip_payload_byte(tmp_path, key, 100)
        path, _ = part_location(tmp_path, truncated)  # a part file (over small_part_max)
        path.write_bytes(path.read_bytes()[:-10])

        client = net._http
        gateway = net._gateway
        failures_before = await read_failures(client, gateway)
        # The flipped byte is only visible once the part has been read. In the gateway's
        # process, part 1 is first read after the status line: the streamed response is cut
        # short before its end, so the client can tell (never a complete, wrong body). A
        # node reached over HTTP reads the first chunk of what it sends (here the whole
        # part) before its own status line: the gateway hears of the damage as it opens
        # the part, before its status line, and says so.
        await damaged_get(client, f"{gateway}/default/flipped", cut=local_calls)
        # A small file is read whole before the status line (by the gateway, and over HTTP
        # by the node too): the damage is an error status. The truncated part is caught
        # when it is opened, before the status line as well.
        for name in ("small-flipped", "truncated"):
            response = await client.get(f"{gateway}/default/{name}")
            assert response.status_code == 502
            assert response.json()["error"]["code"] == "integrity_error"
        assert (await client.get(f"{gateway}/default/healthy")).content == payload(50_000, 3)
        assert await read_failures(client, gateway) == failures_before + local_calls

        # Each node that served a damaged part verified it and took it out of service (the
        # reader, over HTTP, saw only a cut stream or an error), and told discovery.
        damaged = (flipped, small_flipped, truncated)

        async def taken_out() -> bool:
            status = await fetch_status(net._discovery_url, net_config().secret)
            reported = status.totals.degraded_files == 3
            return reported and all(quarantined(tmp_path, key) for key in damaged)

        await eventually(taken_out, what="the damaged parts quarantined and reported")
        # The scrubber finds nothing more; the damaged parts are no longer served.
        results = await admin.scrub_all(net._discovery_url, net_config().secret)
        assert all(r["corrupt"] == [] for r in results)
        assert sum(r["checked"] for r in results) == 20 - 3
        # The part cut the first read short; now that it is out of service, every read is
        # an error status before any byte, saying why: the same as for the others.
        for name in ("flipped", "small-flipped", "truncated"):
            response = await client.get(f"{gateway}/default/{name}")
            assert response.status_code == 502
            assert response.json()["error"]["code"] == "integrity_error"


@LOCAL_OR_HTTP
async def test_a_damaged_part_without_redundancy_is_the_same_error_every_time(
    tmp_path: Path, local_calls: bool
) -> None:
    # raid0: nothing to read around a damaged part with. The read that finds the damage
    # before the status line and every read after the node took the part out of service
    # (quarantined: "not on this node") get the same answer, 502 integrity_error: a node
    # reached over HTTP checks its first chunk before its status line (a cut before the
    # first byte would look to the gateway like a node gone), and a quarantined part is
    # gone, not a node failing.
    async with net_driver(tmp_path, local_calls=local_calls) as net:
        await net.put("streamed", payload(500_000, 6))  # parts in files; answers stream
        await net.put("small", payload(4096, 7))  # parts packed; the answer is read whole
        damaged = [
            (await net.stat("streamed")).parts[0].key,
            (await net.stat("small")).parts[2].key,
        ]
        for key in damaged:
            flip_payload_byte(tmp_path, key, 10)  # the part's first block

        client = net._http
        gateway = net._gateway

        async def answers(name: str) -> tuple[int, str]:
            response = await client.get(f"{gateway}/default/{name}")
            return response.status_code, response.json()["error"]["code"]

        assert await answers("streamed") == (502, "integrity_error")
        assert await answers("small") == (502, "integrity_error")

        async def taken_out() -> bool:
            status = await fetch_status(net._discovery_url, net_config().secret)
            reported = status.totals.degraded_files == 2
            return reported and all(quarantined(tmp_path, key) for key in damaged)

        await eventually(taken_out, what="the damaged parts quarantined and reported")
        for _ in range(2):
            assert await answers("streamed") == (502, "integrity_error")
            assert await answers("small") == (502, "integrity_error")
        # A range that touches only healthy parts still reads.
        response = await client.get(
            f"{gateway}/default/streamed", headers={"Range": "bytes=1024-2047"}
        )
        assert response.status_code == 206
        assert response.content == payload(500_000, 6)[1024:2048]


@LOCAL_OR_HTTP
async def test_range_get_of_a_flipped_byte_never_yields_wrong_bytes(
    tmp_path: Path, local_calls: bool
) -> None:
    data = payload(300_000, 4)
    async with net_driver(tmp_path, local_calls=local_calls) as net:
        await net.put("ranged", data)
        version = await net.stat("ranged")
        assert version.size == len(data)
        bad = 150_000  # a byte of the file, somewhere in the middle of one part
        (segment,) = version.layout.segments(len(data), bad, bad + 1)
        placement = next(p for p in version.parts if p.index == segment.part)
        flip_payload_byte(tmp_path, placement.key, segment.offset)  # a packed part

        client = net._http
        url = f"{net._gateway}/default/ranged"
        # A Range GET reads only a slice of each part (the whole-part sha256 is not checked):
        # the block checksums stop the damaged bytes at the storage node, which then takes
        # the part out of service (a later read finds it gone).
        for first, last in [(bad, bad), (bad - 2000, bad + 2000)]:
            try:
                response = await client.get(url, headers={"Range": f"bytes={first}-{last}"})
            except httpx.RemoteProtocolError:
                continue  # cut short before its end: the client can tell
            assert response.status_code == 502, (response.status_code, first, last)
            code = response.json()["error"]["code"]
            assert code in ("integrity_error", "storage_failure"), code

        async def taken_out() -> bool:
            return quarantined(tmp_path, placement.key)

        await eventually(taken_out, what="the damaged part quarantined")

        # Bytes that live in a different part still read fine.
        unit = version.layout.unit
        other = (segment.part + 1) % version.layout.parts
        start = 10 * version.layout.row_size + other * unit  # one unit of that part
        (good,) = version.layout.segments(len(data), start, start + 500)
        assert good.part == other
        response = await client.get(url, headers={"Range": f"bytes={start}-{start + 499}"})
        assert response.status_code == 206
        assert response.content == data[start : start + 500]


@LOCAL_OR_HTTP
async def test_large_reads_that_read_ahead_still_never_complete_wrong(
    tmp_path: Path, local_calls: bool
) -> None:
    # Parts of hundreds of KiB: the nodes read chunks ahead of what the gateway asks for
    # (karma8/store/files/reader.py); a bad part must still stop the body short.
    data = payload(3 << 20, 5)
    async with net_driver(tmp_path, local_calls=local_calls) as net:
        await net.put("large", data)
        await net.put("large-bad", data)
        client = net._http
        gateway = net._gateway
        assert (await client.get(f"{gateway}/default/large")).content == data
        key = (await net.stat("large-bad")).parts[3].key
        flip_payload_byte(tmp_path, key, 200_000)
        # (Over HTTP the node's first chunk, the whole part here, is checked before the
        # status lines: an error status instead.)
        await damaged_get(client, f"{gateway}/default/large-bad", cut=local_calls)
        assert (await client.get(f"{gateway}/default/large")).content == data


async def test_a_part_damaged_on_its_way_to_a_node_fails_the_put(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nodes reached over HTTP: the client hashes what it sends and compares it with what the
    # node says it stored. Here one node stores its part with a byte flipped on arrival (as
    # a bad NIC or buffer would): the PUT must fail, and leave neither a version nor parts.
    damaged: list[str] = []
    original = StorageNode.put_part

    async def put_part(self: StorageNode, key: str, chunks: AsyncIterable[bytes]) -> StoredPart:
        if key.endswith(".2"):
            damaged.append(key)
            return await original(self, key, flip_first_byte(chunks))
        return await original(self, key, chunks)

    async with net_driver(tmp_path, local_calls=False) as net:
        await net.put("before", payload(20_000, 4))
        monkeypatch.setattr(StorageNode, "put_part", put_part)
        response = await net._http.put(
            f"{net._gateway}/default/damaged", content=payload(20_000, 5)
        )
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "integrity_error"
        assert damaged
        monkeypatch.undo()
        with pytest.raises(NotFound):
            await net.stat("damaged")
        version = damaged[0].split(".")[0]

        async def its_parts_are_gone() -> bool:
            return all(not key.startswith(version) for key in await net.part_keys())

        await eventually(its_parts_are_gone)
        assert await net.get("before") == payload(20_000, 4)


async def test_a_part_damaged_on_its_way_from_a_node_fails_the_get(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nodes reached over HTTP: a whole-part read is hashed as it arrives and checked against
    # the part's checksum before its last bytes are used. Here one node's stream gets a byte
    # flipped after the node read (and checked) it.
    original = StorageNode.read_part

    @asynccontextmanager
    async def flipped(
        self: StorageNode, key: str, *, offset: int, length: int
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        async with original(self, key, offset=offset, length=length) as chunks:
            yield flip_first_byte(chunks) if key.endswith(".1") else chunks

    async with net_driver(tmp_path, local_calls=False) as net:
        await net.put("small", payload(20_000, 6))
        await net.put("large", payload(600_000, 7))
        monkeypatch.setattr(StorageNode, "read_part", flipped)
        response = await net._http.get(f"{net._gateway}/default/small")
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "integrity_error"
        with pytest.raises(httpx.RemoteProtocolError):  # streamed: cut short, never wrong
            await net._http.get(f"{net._gateway}/default/large")
        monkeypatch.undo()
        assert await net.get("small") == payload(20_000, 6)
        assert await net.get("large") == payload(600_000, 7)
