"""An experiment, not a store: what a small PUT would cost if each gateway worker wrote its
own parts (issue #21's "both cores storing"), measured on the embedded cluster.

A worker splits the body, encodes the five needles (CRC-32, sha256, the salted header check),
appends them to files of its own on the data's file system and waits for a ``syncfs`` round
of its own (:class:`karma8.store.groupsync.GroupSync`, shared by its concurrent uploads), then
sends the parent the sizes and checksums instead of the body. The parent places, skips the
parts' writes and commits as it does now (discovery's SQL and log round unchanged). What it
leaves out: telling the nodes where the needles are (five index entries), and the parent
placing before the worker writes (a real design places first: one more hop, or placement in
the worker). The needles land in scratch files, not the nodes' volumes: nothing written this
way can be read back.

    KARMA8_WORKER_PARTS=/var/tmp/wp \\
    KARMA8_LAUNCH="env PYTHONPATH=$PWD:$PWD/bench/worker_parts_site $PWD/.venv/bin/karma8" \\
        bench/put_cpu.sh "$PWD" 8

``bench/worker_parts_site/sitecustomize.py`` loads it into the parent and every worker (they
inherit that directory on ``PYTHONPATH``) when ``KARMA8_WORKER_PARTS`` names a scratch
directory. With ``KARMA8_LAUNCH="env ... $PWD/.venv/bin/python $PWD/bench/parent_bounds.py
nosql"`` it joins parent_bounds.py's variants. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import os
import zlib
from functools import partial
from pathlib import Path
from typing import Any

import trio

from karma8.actors.uploader import Uploader
from karma8.core.errors import Unavailable
from karma8.core.layout import StripeLayout, StripeSplitter
from karma8.core.model import FileVersion, PartPlacement, PartReceipt, StoredVersion
from karma8.net import requestlog, writepipe
from karma8.store.groupsync import GroupSync
from karma8.store.packed import format as needle_format

_RECEIPTS: contextvars.ContextVar[list[list[Any]] | None] = contextvars.ContextVar(
    "worker_parts_receipts", default=None
)
_LAYOUT = StripeLayout()


class _Needles:
    """A worker's five scratch files, appended to, synced in shared rounds."""

    def __init__(self) -> None:
        root = Path(os.environ["KARMA8_WORKER_PARTS"]) / f"worker-{os.getpid()}"
        root.mkdir(parents=True, exist_ok=True)
        self._fds = [
            os.open(root / f"node-{i}.vol", os.O_RDWR | os.O_CREAT, 0o600) for i in range(5)
        ]
        self._ends = [0] * 5
        self._salt = needle_format.new_salt()
        group = GroupSync.open(root)
        assert group is not None
        self._group = group

    async def write(self, name: str, data: bytes) -> list[list[Any]]:
        pieces: list[list[bytes]] = [[] for _ in range(_LAYOUT.parts)]
        splitter = StripeSplitter(_LAYOUT, len(data))
        for index, piece in (*splitter.feed(data), *splitter.finish()):
            pieces[index].append(piece)
        receipts: list[list[Any]] = []
        steps = []
        for index, part in enumerate(pieces):
            payload = b"".join(part)
            sha = hashlib.sha256(payload).digest()
            needle = needle_format.encode(
                f"{name}.{index}", payload, sha256=sha, salt=self._salt, crc=zlib.crc32(payload)
            )
            offset = self._ends[index]
            self._ends[index] += len(needle)
            steps.append(partial(_pwrite, self._fds[index], needle, offset))
            receipts.append([len(payload), sha.hex()])
        errors = await self._group.run_steps(steps)
        assert not any(errors), errors
        return receipts


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    os.pwrite(fd, data, offset)


_needles: _Needles | None = None


async def _worker_put(
    self: writepipe.ParentWrites, namespace: str, name: str, data: bytes, *, if_absent: bool
) -> StoredVersion:
    global _needles
    if _needles is None:
        _needles = _Needles()
    receipts = await _needles.write(name, data)
    conn = self._idle.pop() if self._idle else await self._dial()
    header = json.dumps(
        {
            "namespace": namespace,
            "name": name,
            "if_absent": if_absent,
            "request_id": requestlog.current.get(),
            "receipts": receipts,
            "size": len(data),
        }
    ).encode()
    ok = False
    try:
        try:
            await conn.stream.send_all(writepipe._REQUEST.pack(len(header), 0) + header)
            (size,) = writepipe._ANSWER.unpack(await conn.read(writepipe._ANSWER.size))
            answer = await conn.read_json(size)
        except (trio.BrokenResourceError, trio.ClosedResourceError, writepipe.PipeBroken) as exc:
            raise Unavailable(f"the gateway did not answer: {exc}") from None
        ok = True
    finally:
        if ok and len(self._idle) < writepipe.IDLE_MAX:
            self._idle.append(conn)
        else:
            await trio.aclose_forcefully(conn.stream)
    self.sent += 1
    return writepipe._answered(answer)


_parent_store = writepipe._store


async def _parent_store_receipts(gateway: Any, request: dict[str, Any], data: bytes) -> Any:
    token = _RECEIPTS.set(request.get("receipts"))
    try:
        return await _parent_store(gateway, request, bytes(request.get("size", 0)))
    finally:
        _RECEIPTS.reset(token)


_write_held = Uploader.write_held


async def _write_held_or_receipts(
    self: Uploader, version: FileVersion, placed: list[PartPlacement], data: bytes
) -> list[PartReceipt]:
    receipts = _RECEIPTS.get()
    if receipts is None:
        return await _write_held(self, version, placed, data)
    await trio.lowlevel.checkpoint()
    return [
        PartReceipt(index=placement.index, size=size, checksum=checksum)
        for placement, (size, checksum) in zip(placed, receipts, strict=True)
    ]


def install() -> None:
    writepipe.ParentWrites.put = _worker_put  # type: ignore[method-assign]
    writepipe._store = _parent_store_receipts
    Uploader.write_held = _write_held_or_receipts  # type: ignore[method-assign]
