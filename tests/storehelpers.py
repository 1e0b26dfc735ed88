"""Helpers shared by the file store's tests (tests/test_file_store*.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import trio
import trio.testing

from karma8.ports import PartStore, StoredPart
from karma8.store.files.store import FilePartStore

MIB = 1 << 20
BIG = 1 << 30


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes that differ at every position (catches off-by-one reads)."""
    return bytes((seed + i * 7 + i // 251) % 256 for i in range(size))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def put(store: PartStore, key: str, data: bytes, *, chunk: int = 4096) -> StoredPart:
    writer = await store.create(key)
    try:
        for pos in range(0, len(data), chunk):
            await writer.write(data[pos : pos + chunk])
        stored = await writer.commit()
    except BaseException:
        with trio.CancelScope(shield=True):
            await writer.discard()
        raise
    assert stored == StoredPart(key=key, size=len(data), checksum=sha(data))
    return stored


async def read(store: PartStore, key: str, offset: int, length: int) -> list[bytes]:
    async with store.open(key, offset=offset, length=length) as chunks:
        return [chunk async for chunk in chunks]


def flip_bit(path: Path, pos: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0x01]))


def tmp_files(root: Path) -> list[str]:
    return sorted(os.listdir(root / "tmp"))


def new_store(root: Path, **kwargs: Any) -> FilePartStore:
    kwargs.setdefault("capacity_bytes", BIG)
    return FilePartStore(root, **kwargs)
