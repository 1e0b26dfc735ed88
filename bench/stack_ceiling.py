"""The ceiling of karma8's HTTP stack: a file store in memory, on the server karma8 runs on.

    python bench/stack_ceiling.py --port N [--host 127.0.0.1] [--workers W]

PUT keeps the body under its path (201), GET answers it (200, or 404), HEAD its length,
anything else 405. Nothing is split, hashed, synced or written to disk, and nothing survives
a restart: this is not a store. It is served as karma8's gateway is, by
:func:`karma8.net.serving.serve_app` (Hypercorn on trio, one process, karma8's Hypercorn
configuration and fixes, no read timeout: karma8's default), as a plain ASGI callable like
karma8's object routes, so the small requests it answers per second are the most that any
karma8 built on this stack could answer on this machine with one event loop. With
``--workers W`` it runs W such processes on the port (``SO_REUSEPORT``, as karma8's gateway
workers do), the ceiling for a karma8 with W gateway workers. Each process keeps a dict of
its own and also writes every body to a file in a directory on /dev/shm that they share, from
which a GET that reaches another process than the PUT did reads it.
``bench/compare.py`` measures it beside the stores, in the same run (system ``stack``), with
small files only: a large file it holds whole in new memory, which this VM hands out slowly,
so its large-file rates bound nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import signal
import sys
import tempfile
from functools import partial
from pathlib import Path

import trio
from hypercorn.typing import ASGIReceiveCallable as Receive
from hypercorn.typing import ASGISendCallable as Send
from hypercorn.typing import Scope

from karma8.net.serving import serve_app


class MemoryFiles:
    """The ASGI app: files by URL path, in a dict."""

    def __init__(self, *, shared: Path | None = None) -> None:
        self.files: dict[str, bytes] = {}
        self.shared = shared  # one of several processes on the port: the bodies of all

    def _shared_path(self, path: str) -> Path | None:
        if self.shared is None:
            return None
        return self.shared / hashlib.sha1(path.encode()).hexdigest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        if method == "PUT":
            body = await _read_body(receive)
            if body is None:
                return  # the client left
            self.files[path] = body
            shared = self._shared_path(path)
            if shared is not None:
                shared.write_bytes(body)
            await _answer(send, 201, b"")
        elif method in ("GET", "HEAD"):
            data = self.files.get(path)
            shared = self._shared_path(path)
            if data is None and shared is not None and shared.exists():
                data = shared.read_bytes()  # stored by another process on the port
            if data is None:
                await _answer(send, 404, b"not found\n")
            else:  # the whole file in one message: it takes part in small-file workloads only
                await _start(send, 200, len(data))
                body = data if method == "GET" else b""
                await send({"type": "http.response.body", "body": body, "more_body": False})
        else:
            await _answer(send, 405, b"method not allowed\n", [(b"allow", b"GET, HEAD, PUT")])


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None  # http.disconnect
        chunks.append(message["body"])
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _start(
    send: Send, status: int, length: int, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-length", str(length).encode()), *(headers or [])],
        }
    )


async def _answer(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await _start(send, status, len(body), headers)
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def serve(host: str, port: int, workers: int, shared: Path | None) -> None:
    if workers > 1:
        with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="stack-ceiling-") as tmp:
            await _serve(host, port, workers, Path(tmp))
    else:  # alone, or (``--shared``) one of a first process's others, joining its port
        await _serve(host, port, workers, shared, join=shared is not None)


async def _serve(
    host: str, port: int, workers: int, shared: Path | None, *, join: bool = False
) -> None:
    async with trio.open_nursery() as nursery:
        # SIGTERM (how the benchmark stops it) ends it cleanly: its workers, then the directory.
        nursery.start_soon(until_signalled, nursery.cancel_scope)
        app = MemoryFiles(shared=shared)
        serving = partial(serve_app, app, host=host, port=port, read_timeout=None)
        if shared is not None:  # only then: an A/B run of a karma8 without the option works
            serving = partial(serving, reuse_port=True, join_port=join)
        url = await nursery.start(serving)
        print(f"serving {url}", flush=True)
        bound = url.rsplit(":", 1)[1]
        for _ in range(workers - 1):  # stopped with this process (cancelled: SIGTERM)
            command = [sys.executable, __file__, "--host", host, "--port", bound]
            command += ["--shared", str(shared)]
            nursery.start_soon(partial(trio.run_process, command))


async def until_signalled(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            scope.cancel()
            return


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1, help="processes on the port")
    parser.add_argument("--shared", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    trio.run(serve, args.host, args.port, args.workers, args.shared)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
