"""CPU time per request of a storage node's part routes, in one process, over in-memory ASGI.

.venv/bin/python bench/part_routes.py [--small 2000] [--large-mib 256] [--rounds 3]

The node's app (``storage_app``) is called as Hypercorn calls it, without sockets, on an
in-memory disk, so the figures are the HTTP layer's cost plus the in-memory store's: small
PUTs and GETs of 4 KiB parts, and one large part PUT and GET in 1 MiB chunks. CPU time, not
wall time, so that other load on the machine matters less. To compare two commits, run it
with ``PYTHONPATH`` pointing at the other commit's ``karma8`` (``git archive``).
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any, cast

import trio

from karma8.actors.storage import StorageConfig, StorageNode
from karma8.ports import DiscoveryAPI
from karma8.sim.disk import MemoryDisk

SECRET = "bench"
SMALL = b"x" * 4096
CHUNK = b"y" * (1 << 20)

Message = dict[str, Any]


async def call(app: Any, method: str, path: str, body: list[bytes]) -> tuple[int, int]:
    """One request with ``body`` (its chunks); the status and the response body's size."""
    messages: list[Message] = [
        {"type": "http.request", "body": chunk, "more_body": i < len(body) - 1}
        for i, chunk in enumerate(body or [b""])
    ]
    headers = [(b"host", b"h"), (b"x-karma8-secret", SECRET.encode())]
    headers.append((b"content-length", str(sum(map(len, body))).encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "extensions": {},
    }
    to_app, app_side = trio.open_memory_channel[Message](10)  # Hypercorn's queue
    answered = trio.Event()
    sent: list[Message] = []

    async def client() -> None:
        for message in messages:
            await to_app.send(message)
        await answered.wait()
        await to_app.send({"type": "http.disconnect"})

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            answered.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client)
        await app(scope, app_side.receive, send)
        answered.set()
    size = sum(len(m.get("body", b"")) for m in sent if m["type"] == "http.response.body")
    return int(sent[0]["status"]), size


async def measure(small: int, large_mib: int, rounds: int) -> None:
    from karma8.net.storage_app import storage_app  # after PYTHONPATH chose the commit

    disk = MemoryDisk(
        capacity_bytes=1 << 42, rng=random.Random(0), sleep=trio.sleep, fsync_latency=0
    )
    node = StorageNode(
        node_id="bench",
        url="",
        store=disk,
        discovery=cast(DiscoveryAPI, None),
        config=StorageConfig(),
    )
    app: Any = storage_app(node, secret=SECRET)
    lifespan_in, lifespan_out = trio.open_memory_channel[Message](1)
    started = trio.Event()

    async def lifespan_send(message: Message) -> None:
        if message["type"] == "lifespan.startup.complete":
            started.set()

    async with trio.open_nursery() as nursery:
        lifespan = {"type": "lifespan", "asgi": {"version": "3.0"}}
        nursery.start_soon(app, lifespan, lifespan_out.receive, lifespan_send)
        await lifespan_in.send({"type": "lifespan.startup"})
        await started.wait()
        for r in range(rounds):
            cpu = time.process_time()
            for i in range(small):
                assert (await call(app, "PUT", f"/v1/parts/r{r}s{i}.0", [SMALL]))[0] == 201
            put = (time.process_time() - cpu) / small
            cpu = time.process_time()
            for i in range(small):
                assert await call(app, "GET", f"/v1/parts/r{r}s{i}.0", []) == (200, len(SMALL))
            get = (time.process_time() - cpu) / small
            cpu = time.process_time()
            key = f"/v1/parts/r{r}large.0"
            assert (await call(app, "PUT", key, [CHUNK] * large_mib))[0] == 201
            large_put = time.process_time() - cpu
            cpu = time.process_time()
            assert await call(app, "GET", key, []) == (200, large_mib << 20)
            large_get = time.process_time() - cpu
            print(
                f"round {r + 1}/{rounds}: 4 KiB PUT {put * 1e6:.0f} us, GET {get * 1e6:.0f} us;"
                f" {large_mib} MiB PUT {large_put * 1e3:.0f} ms, GET {large_get * 1e3:.0f} ms"
                " (CPU time per request)",
                flush=True,
            )
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=2000, help="4 KiB parts per round")
    parser.add_argument("--large-mib", type=int, default=256, help="the large part's size")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trio.run(measure, args.small, args.large_mib, args.rounds)


if __name__ == "__main__":
    main()
