"""The packed engine's needle format and recovery scan (karma8.store.packed.format): pure."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from hypothesis import given
from hypothesis import strategies as st

from karma8.store.packed.format import (
    ALIGN,
    LIVE,
    TOMBSTONE,
    decode_header,
    encode,
    encode_tombstone,
    scan,
)
from karma8.store.packed.index import PackedIndex

keys = st.text(st.sampled_from("0123456789abcdef."), min_size=1, max_size=40)


def needle(key: str, data: bytes) -> bytes:
    return encode(key, data, sha256=hashlib.sha256(data).digest())


def reader(image: bytes) -> Callable[[int, int], bytes]:
    return lambda at, n: image[at : at + n]


@given(key=keys, data=st.binary(max_size=3000))
def test_a_needle_decodes_to_what_was_encoded(key: str, data: bytes) -> None:
    raw = needle(key, data)
    assert len(raw) % ALIGN == 0
    found = decode_header(raw, 0)
    assert found is not None
    assert (found.key, found.flags, found.length, found.size) == (key, LIVE, len(data), len(raw))
    assert raw[found.data_offset : found.data_offset + found.length] == data
    tomb = decode_header(encode_tombstone(key), 0)
    assert tomb is not None
    assert tomb.flags == TOMBSTONE


@given(
    parts=st.lists(st.tuples(keys, st.binary(max_size=500)), min_size=1, max_size=6),
    hole=st.integers(0, 5),
    hole_size=st.integers(1, 40),
)
def test_holes_are_skipped_and_a_torn_tail_is_cut(
    parts: list[tuple[str, bytes]], hole: int, hole_size: int
) -> None:
    chunks = [needle(f"{i}.{key}", data) for i, (key, data) in enumerate(parts)]
    at = min(hole, len(chunks))
    chunks.insert(at, bytes(hole_size * ALIGN))  # a commit cancelled before its write ran
    image = b"".join(chunks)
    found = scan(reader(image), len(image))
    assert [n.key for n in found.needles] == [f"{i}.{k}" for i, (k, _) in enumerate(parts)]
    torn_end = len(image) if at < len(parts) else len(image) - hole_size * ALIGN
    assert found.end == torn_end
    # Any cut inside the last needle drops it and keeps the others.
    last = len(chunks[-1])
    for cut in range(len(image) - last, len(image), 7):
        if at == len(parts):
            break  # the hole is the tail here
        again = scan(reader(image[:cut]), cut)
        assert [n.key for n in again.needles] == [f"{i}.{k}" for i, (k, _) in enumerate(parts)][:-1]


def test_a_tombstone_deletes_only_in_its_own_volume() -> None:
    index = PackedIndex()
    first = needle("k.0", b"one") + encode_tombstone("k.0")
    index.load(1, 0, scan(reader(first), len(first)).needles)
    assert "k.0" not in index
    second = needle("k.0", b"two")
    index.load(2, 0, scan(reader(second), len(second)).needles)
    third = encode_tombstone("k.0")
    index.load(1, 1, scan(reader(third), len(third)).needles)  # volume 1 again: not its needle
    ref = index.get("k.0")
    assert ref is not None
    assert ref.volume == 2
    assert index.payload_bytes == 3
