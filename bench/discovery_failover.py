"""What a discovery client's failover costs (karma8/net/failover.py), on loopback sockets.

.venv/bin/python bench/discovery_failover.py [--calls 500]

Two instances: the first refuses connections (its process is gone), or accepts them and never
answers (stopped, or cut off after connecting); the second answers ``GET /v1/nodes`` at once.
Reports the first call's wall time (the failover) and the mean of the calls after it (sticky:
straight to the second), beside one instance alone.
"""

from __future__ import annotations

import argparse
import socket
import time
from functools import partial
from typing import Any, cast

import trio
from hypercorn.typing import Framework

from karma8.net.clients import HttpDiscoveryClient, make_http_client
from karma8.net.serving import serve_app

Message = dict[str, Any]


async def answering(scope: Message, receive: Any, send: Any) -> None:
    """An ASGI app that answers every request with an empty node list."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b'{"nodes": []}'})


def refused_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"  # closed again: nothing listens


async def timed(client: HttpDiscoveryClient, calls: int) -> tuple[float, float]:
    """Seconds of the first call, and the mean of ``calls`` more."""
    start = time.perf_counter()
    await client.list_nodes()
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(calls):
        await client.list_nodes()
    return first, (time.perf_counter() - start) / calls


async def main(calls: int) -> None:
    async with trio.open_nursery() as nursery:
        good = await nursery.start(
            partial(serve_app, cast(Framework, answering), host="127.0.0.1", port=0)
        )
        (silent,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        held = []

        async def accept_and_say_nothing() -> None:
            while True:
                held.append(await silent.accept())

        nursery.start_soon(accept_and_say_nothing)
        hung = f"http://127.0.0.1:{silent.socket.getsockname()[1]}"
        async with make_http_client(None) as http:
            print("first instance        first call    then, per call")
            for label, urls in [
                ("none (one instance)", [good]),
                ("refuses", [refused_url(), good]),
                ("never answers", [hung, good]),
            ]:
                first, then = await timed(HttpDiscoveryClient(http, urls), calls)
                print(f"{label:<20}  {first * 1000:>9.1f} ms  {then * 1000:>9.2f} ms")
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    trio.run(main, parser.parse_args().calls)
