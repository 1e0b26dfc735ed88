"""A design probe: small GETs served by processes that read the metadata and the packed
volumes directly, as gateway workers of the next design would (docs/benchmarks.md,
"Small files against their targets").

    python bench/direct_reads.py --data KARMA8_DATA --port N [--workers W]

Reads an embedded cluster's data directory (``karma8 serve --data``), which may be serving
at the time: each process opens discovery's SQLite database read-only (WAL readers do not
block the writer) and indexes every storage node's volumes once at start (a scan, as a node
does when it opens them). ``GET /NAMESPACE/NAME`` resolves the committed version with one
query, reads its parts' needles with one ``pread`` each, checks each against its CRC-32
and answers the joined bytes; parts in files (not packed), versions written after the start
and anything else are a 404, so this answers only what it can answer directly. It is served
by :func:`karma8.net.serving.serve_app`, as karma8's gateway is, with ``W`` processes on the
port (``SO_REUSEPORT``). It is a measurement of what such workers could answer, not a
server to run: no access control, no ranges, no redundant layouts.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import zlib
from functools import partial
from pathlib import Path

import trio
from hypercorn.typing import ASGIReceiveCallable as Receive
from hypercorn.typing import ASGISendCallable as Send
from hypercorn.typing import Scope
from stack_ceiling import lifespan, until_signalled

from karma8.net.serving import serve_app
from karma8.store.packed.format import LIVE, scan
from karma8.store.packed.volumes import parse_volume_name

RESOLVE = """
    SELECT p.part_key, p.node_id FROM versions v JOIN parts p USING (version_id)
    WHERE v.namespace = ? AND v.name = ? AND v.state = 'committed' ORDER BY p.idx
"""


class DirectReads:
    """The ASGI app: small raid0 files read straight from the metadata and the volumes."""

    def __init__(self, data: Path) -> None:
        self.db = sqlite3.connect(f"file:{data / 'discovery.sqlite3'}?mode=ro", uri=True)
        # (node id, key) -> (volume fd, offset of the payload, length, CRC-32)
        self.needles: dict[tuple[str, str], tuple[int, int, int, int]] = {}
        for node_dir in sorted(data.glob("storage-*")):
            node_id = (node_dir / "node_id").read_text().strip()
            for volume in sorted((node_dir / "volumes").glob("*.vol")):
                parsed = parse_volume_name(volume.name)
                assert parsed is not None, volume
                fd = os.open(volume, os.O_RDONLY)
                size = os.fstat(fd).st_size
                for n in scan(partial(_pread, fd), size, parsed[2]).needles:
                    if n.flags == LIVE:
                        self.needles[node_id, n.key] = (fd, n.data_offset, n.length, n.crc)
                    else:
                        self.needles.pop((node_id, n.key), None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        _, namespace, name = [*scope["path"].split("/", 2), "", ""][:3]
        body = self.read(namespace, name) if scope["method"] == "GET" else None
        status, body = (200, body) if body is not None else (404, b"not found\n")
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def read(self, namespace: str, name: str) -> bytes | None:
        parts = self.db.execute(RESOLVE, (namespace, name)).fetchall()
        if not parts:
            return None
        pieces = []
        for key, node_id in parts:
            found = self.needles.get((node_id, key))
            if found is None:
                return None
            fd, offset, length, crc = found
            piece = os.pread(fd, length, offset)
            if zlib.crc32(piece) != crc:
                return None
            pieces.append(piece)
        return b"".join(pieces)


def _pread(fd: int, offset: int, count: int) -> bytes:
    return os.pread(fd, count, offset)


async def serve(data: Path, host: str, port: int, workers: int) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(until_signalled, nursery.cancel_scope)
        app = DirectReads(data)
        serving = partial(serve_app, app, host=host, port=port, read_timeout=None)
        url = await nursery.start(partial(serving, reuse_port=True))
        print(f"serving {url} ({len(app.needles)} needles)", flush=True)
        for _ in range(workers - 1):  # stopped with this process
            command = [sys.executable, __file__, "--data", str(data), "--port", str(port)]
            nursery.start_soon(partial(trio.run_process, command))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1, help="processes on the port")
    args = parser.parse_args(argv)
    trio.run(serve, args.data, args.host, args.port, args.workers)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
