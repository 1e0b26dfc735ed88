"""Helpers shared by the file store's tests (tests/test_file_store*.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import trio
import trio.testing

from karma8.ports import PartStore, StoredPart
from karma8.store.files.format import HEADER_SIZE
from karma8.store.files.store import FilePartStore
from karma8.store.packed import format as packed_format
from karma8.store.packed.format import scan
from karma8.store.packed.index import PackedIndex
from karma8.store.packed.volumes import parse_volume_name
from karma8.store.tiered import TieredPartStore

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


SMALL = 1024  # small_part_max of the packed engine's tests


def new_tiered(root: Path, **kwargs: Any) -> TieredPartStore:
    """The routing store on ``root`` without group sync, parts up to :data:`SMALL` packed."""
    kwargs.setdefault("capacity_bytes", BIG)
    kwargs.setdefault("small_part_max", SMALL)
    kwargs.setdefault("group_sync", False)
    return TieredPartStore(root, **kwargs)


def new_store(root: Path, **kwargs: Any) -> FilePartStore:
    kwargs.setdefault("capacity_bytes", BIG)
    return FilePartStore(root, **kwargs)


def packed_parts(node_root: Path) -> dict[str, tuple[Path, int]]:
    """The live packed parts under a node's directory: key -> (volume, payload offset).

    Reads the volumes without changing them (the node may be running), with the engine's own
    scan and index.
    """
    index = PackedIndex()
    paths: dict[int, Path] = {}
    for path in sorted((node_root / "volumes").glob("*.vol")):
        parsed = parse_volume_name(path.name)
        assert parsed is not None, path
        volume, generation, salt = parsed
        data = path.read_bytes()

        def read(at: int, n: int, data: bytes = data) -> bytes:
            return data[at : at + n]

        found = scan(read, len(data), salt)
        index.load(volume, generation, found.needles)
        paths[volume] = path
    found_refs = (index.get(key) for key in list(index.keys()))
    return {ref.key: (paths[ref.volume], ref.data_offset) for ref in found_refs if ref is not None}


def part_location(root: Path, key: str) -> tuple[Path, int]:
    """Where the payload of part ``key`` starts on some node under ``root`` (any depth):
    a part file and its header size, or a volume and the needle's payload offset."""
    files = list(root.glob(f"**/parts/*/*/{key}"))
    if files:
        (path,) = files
        return path, HEADER_SIZE
    for volumes in root.glob("**/volumes"):
        found = packed_parts(volumes.parent).get(key)
        if found is not None:
            return found
    raise FileNotFoundError(key)


def forged_header(key: str, length: int, salt: bytes | None) -> bytes:
    """A needle's header and key, well formed for a volume of ``salt`` (None: unsalted, as
    anyone can compute), claiming a payload of ``length`` bytes that do not follow."""
    raw_key = key.encode()
    version = packed_format.VERSION if salt is None else packed_format.SALTED
    fields = packed_format._FIELDS.pack(
        packed_format.MAGIC, version, packed_format.LIVE, len(raw_key), length, 0, bytes(32)
    )
    check = packed_format._header_check(fields, raw_key, salt)
    pad = bytes(-len(raw_key) % packed_format.ALIGN)
    return fields + check.to_bytes(4, "big") + raw_key + pad
