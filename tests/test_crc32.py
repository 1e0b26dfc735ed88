"""CRC-32 arithmetic (karma8.store.crc32) against zlib itself."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from karma8.store.crc32 import combined_crc, crc32_combine
from karma8.store.files.format import check_blocks


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_combine_gives_the_crc_of_the_concatenation(a: bytes, b: bytes) -> None:
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


@given(st.integers(1, 64), st.data())
def test_combined_crc_of_blocks_is_the_crc_of_their_bytes(block: int, data: st.DataObject) -> None:
    blob = data.draw(st.binary(min_size=1, max_size=10 * block))
    pieces = [blob[i : i + block] for i in range(0, len(blob), block)]
    crcs = [zlib.crc32(p) for p in pieces]
    assert combined_crc(crcs, block, len(pieces[-1])) == zlib.crc32(blob)


def test_combined_crc_of_64_kib_blocks() -> None:
    block = 64 * 1024
    blob = bytes((i * 7 + i // 251) % 256 for i in range(5 * block + 123))
    pieces = [blob[i : i + block] for i in range(0, len(blob), block)]
    assert combined_crc([zlib.crc32(p) for p in pieces], block, 123) == zlib.crc32(blob)
    assert combined_crc([], block, block) == 0


def test_check_blocks_refuses_more_bytes_than_blocks() -> None:
    blob = bytes(range(40))
    crcs = (zlib.crc32(blob[:16]), zlib.crc32(blob[16:32]))  # the last 8 bytes have none
    assert check_blocks(blob[:32], 0, 16, crcs)
    assert not check_blocks(blob, 0, 16, crcs)
    assert not check_blocks(blob[16:], 1, 16, crcs)


def test_bad_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="last piece length 0"):
        combined_crc([1, 2], 8, 0)
    with pytest.raises(ValueError, match="last piece length 9"):
        combined_crc([1, 2], 8, 9)
    with pytest.raises(ValueError, match="len2"):
        crc32_combine(1, 2, -1)


@given(st.integers(1, 32), st.data())
def test_check_blocks_finds_every_single_flipped_bit(block: int, data: st.DataObject) -> None:
    blob = data.draw(st.binary(min_size=1, max_size=6 * block))
    crcs = tuple(zlib.crc32(blob[i : i + block]) for i in range(0, len(blob), block))
    first = data.draw(st.integers(0, len(crcs) - 1))
    stop = data.draw(st.integers(first + 1, len(crcs)))  # whole blocks, maybe not to the end
    chunk = blob[first * block : stop * block]
    assert check_blocks(chunk, first, block, crcs)
    bit = data.draw(st.integers(0, 8 * len(chunk) - 1))
    damaged = bytearray(chunk)
    damaged[bit // 8] ^= 1 << (bit % 8)
    assert not check_blocks(bytes(damaged), first, block, crcs)
