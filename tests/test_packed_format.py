"""The packed engine's needle format and recovery scan (karma8.store.packed.format): pure."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from hypothesis import given
from hypothesis import strategies as st

from karma8.store.packed.format import (
    ALIGN,
    HEADER_SIZE,
    LIVE,
    SALT_SIZE,
    TOMBSTONE,
    decode_header,
    encode,
    encode_tombstone,
    scan,
)
from karma8.store.packed.index import PackedIndex

from storehelpers import forged_header

keys = st.text(st.sampled_from("0123456789abcdef."), min_size=1, max_size=40)
salts = st.binary(min_size=SALT_SIZE, max_size=SALT_SIZE)
SALT = b"\x00salt\x01\x02\x03"


def needle(key: str, data: bytes, salt: bytes | None = SALT) -> bytes:
    return encode(key, data, sha256=hashlib.sha256(data).digest(), salt=salt)


def reader(image: bytes) -> Callable[[int, int], bytes]:
    return lambda at, n: image[at : at + n]


@given(key=keys, data=st.binary(max_size=3000), salt=st.none() | salts)
def test_a_needle_decodes_to_what_was_encoded(key: str, data: bytes, salt: bytes | None) -> None:
    raw = needle(key, data, salt)
    assert len(raw) % ALIGN == 0
    found = decode_header(raw, 0, salt)
    assert found is not None
    assert (found.key, found.flags, found.length, found.size) == (key, LIVE, len(data), len(raw))
    assert raw[found.data_offset : found.data_offset + found.length] == data
    tomb = decode_header(encode_tombstone(key, salt=salt), 0, salt)
    assert tomb is not None
    assert tomb.flags == TOMBSTONE


@given(key=keys, data=st.binary(max_size=300), salt=salts, other=st.none() | salts)
def test_a_needle_is_one_only_in_a_volume_of_its_own_salt(
    key: str, data: bytes, salt: bytes, other: bytes | None
) -> None:
    """A salted needle is not one to a volume of another salt or none, nor an unsalted
    needle (what anyone can compute) to a salted volume."""
    if other == salt:
        return
    assert decode_header(needle(key, data, salt), 0, other) is None
    assert decode_header(encode_tombstone(key, salt=salt), 0, other) is None
    if other is None:
        assert decode_header(needle(key, data, None), 0, salt) is None
        assert decode_header(encode_tombstone(key, salt=None), 0, salt) is None


@given(
    before=st.lists(st.binary(max_size=200), max_size=3),
    after=st.lists(st.binary(max_size=200), min_size=1, max_size=3),
    forged_salt=st.none() | salts,
    forged_length=st.integers(0, 1 << 20),
    damage=st.integers(0, HEADER_SIZE - 1),
)
def test_needles_forged_inside_a_payload_are_not_found_past_a_damaged_header(
    before: list[bytes],
    after: list[bytes],
    forged_salt: bytes | None,
    forged_length: int,
    damage: int,
) -> None:
    """A client chooses its payloads' bytes: one may hold well-formed needles (of a key not
    stored yet, or a tombstone, or a header whose length reaches past the volume's real
    needles). Once the carrier's header is damaged the scan looks for the next magic inside
    that payload; a forger who does not know the volume's salt cannot make a needle the
    scan takes, so it finds exactly the real needles after the carrier."""
    if forged_salt == SALT:
        return
    sha = hashlib.sha256(b"x").digest()
    forged = b"".join(
        (
            encode("future.0", b"forged", sha256=sha, salt=forged_salt),
            encode_tombstone("after.0", salt=forged_salt),
            # A header claiming a payload long enough to swallow what follows.
            forged_header("long.0", forged_length, forged_salt),
        )
    )
    pad = bytes(-(HEADER_SIZE + len("carrier.0")) % ALIGN)  # the forgeries at aligned offsets
    carrier = bytearray(needle("carrier.0", pad + forged))
    carrier[damage] ^= 0xFF
    image = b"".join(
        [needle(f"before.{i}", d) for i, d in enumerate(before)]
        + [bytes(carrier)]
        + [needle(f"after.{i}", d) for i, d in enumerate(after)]
    )
    found = scan(reader(image), len(image), SALT)
    assert [n.key for n in found.needles] == [f"before.{i}" for i in range(len(before))] + [
        f"after.{i}" for i in range(len(after))
    ]
    assert found.end == len(image)


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
    found = scan(reader(image), len(image), SALT)
    assert [n.key for n in found.needles] == [f"{i}.{k}" for i, (k, _) in enumerate(parts)]
    torn_end = len(image) if at < len(parts) else len(image) - hole_size * ALIGN
    assert found.end == torn_end
    # Any cut inside the last needle drops it and keeps the others.
    last = len(chunks[-1])
    for cut in range(len(image) - last, len(image), 7):
        if at == len(parts):
            break  # the hole is the tail here
        again = scan(reader(image[:cut]), cut, SALT)
        assert [n.key for n in again.needles] == [f"{i}.{k}" for i, (k, _) in enumerate(parts)][:-1]


def test_a_tombstone_deletes_only_in_its_own_volume() -> None:
    index = PackedIndex()
    first = needle("k.0", b"one") + encode_tombstone("k.0", salt=SALT)
    index.load(1, 0, scan(reader(first), len(first), SALT).needles)
    assert "k.0" not in index
    second = needle("k.0", b"two")
    index.load(2, 0, scan(reader(second), len(second), SALT).needles)
    third = encode_tombstone("k.0", salt=SALT)
    index.load(1, 1, scan(reader(third), len(third), SALT).needles)  # volume 1 again
    ref = index.get("k.0")
    assert ref is not None
    assert ref.volume == 2
    assert index.payload_bytes == 3
