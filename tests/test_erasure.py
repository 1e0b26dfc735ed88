"""Parity parts and redundant layouts (pure core, no trio)."""

from __future__ import annotations

import itertools
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from karma8.core import erasure, isal
from karma8.core.erasure import Code, ParityEncoder, encode_parity, rebuild
from karma8.core.layout import StripeLayout, StripeSplitter, split


def _pad(part: bytes, length: int) -> bytes:
    return part + bytes(length - len(part))


@given(
    unit=st.integers(1, 32),
    parity=st.integers(1, 2),
    data=st.binary(max_size=3000),
    chunk=st.integers(1, 200),
    lost=st.data(),
)
def test_any_m_lost_parts_rebuild_exactly(
    unit: int, parity: int, data: bytes, chunk: int, lost: st.DataObject
) -> None:
    layout = StripeLayout(unit=unit, parity=parity)
    # Streamed: the splitter's chunks in the order it emits them, fed to the encoder.
    splitter = StripeSplitter(layout)
    encoder = ParityEncoder(layout.parts, parity)
    streamed: list[bytearray] = [bytearray() for _ in range(parity)]
    pieces = []
    for start in range(0, len(data), chunk):
        pieces += splitter.feed(data[start : start + chunk])
    pieces += splitter.finish()
    for index, piece in pieces:
        for j, coded in enumerate(encoder.feed(index, piece)):
            streamed[j] += coded
    for j, coded in enumerate(encoder.finish()):
        streamed[j] += coded
    data_parts = split(layout, data)
    assert [bytes(p) for p in streamed] == encode_parity(data_parts, parity)
    sizes = layout.slot_sizes(len(data))
    assert [len(p) for p in streamed] == list(sizes[layout.parts :])
    longest = sizes[0]
    shares = {i: _pad(p, longest) for i, p in enumerate([*data_parts, *map(bytes, streamed)])}
    gone = lost.draw(st.sets(st.integers(0, layout.slots - 1), max_size=parity))
    rebuilt = rebuild(layout.parts, parity, {n: b for n, b in shares.items() if n not in gone})
    assert [b[: len(p)] for b, p in zip(rebuilt, data_parts, strict=True)] == data_parts


@given(parity=st.integers(1, 2), size=st.integers(0, 500), a=st.integers(0, 200))
def test_a_range_rebuilds_from_the_same_range(parity: int, size: int, a: int) -> None:
    layout = StripeLayout(unit=7, parity=parity)
    data = bytes((i * 31 + 7) % 251 for i in range(size))
    data_parts = split(layout, data)
    longest = layout.slot_sizes(size)[0]
    all_parts = [_pad(p, longest) for p in data_parts] + encode_parity(data_parts, parity)
    a = min(a, longest)
    b = min(longest, a + 13)
    for lost in itertools.combinations(range(layout.slots), parity):
        shares = {n: p[a:b] for n, p in enumerate(all_parts) if n not in lost}
        assert rebuild(layout.parts, parity, shares) == [p[a:b] for p in all_parts[:5]]


def test_slots_of_each_engine() -> None:
    raid0 = StripeLayout(unit=4)
    raid1 = StripeLayout(unit=4, copies=2)
    parity = StripeLayout(unit=4, parity=2)
    assert (raid0.engine, raid0.slots, raid0.tolerates) == ("raid0", 5, 0)
    assert (raid1.engine, raid1.slots, raid1.tolerates) == ("raid1", 10, 1)
    assert (parity.engine, parity.slots, parity.tolerates) == ("parity", 7, 2)
    assert raid1.copies_of(3) == (3, 8)
    assert [raid1.data_part(s) for s in range(10)] == [0, 1, 2, 3, 4] * 2
    assert [parity.data_part(s) for s in range(7)] == [0, 1, 2, 3, 4, None, None]
    assert raid1.slot_sizes(23) == (5, 5, 5, 4, 4) * 2
    assert parity.slot_sizes(23) == (5, 5, 5, 4, 4, 5, 5)


def test_copies_and_parity_are_exclusive_and_bounded() -> None:
    with pytest.raises(ValueError, match="not both"):
        StripeLayout(copies=2, parity=1)
    with pytest.raises(ValueError, match="parity"):
        StripeLayout(parity=3)
    with pytest.raises(ValueError, match="copies"):
        StripeLayout(copies=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pyeclib's wheels: Linux")
def test_isa_l_is_the_kernel_here() -> None:
    # pyeclib's wheel bundles ISA-L; a release that moves or drops it must fail here, not
    # silently leave parity PUTs at zfec's rate.
    assert erasure.KERNEL == "isa-l"


@given(
    parity=st.integers(1, 2),
    length=st.integers(1, 300),
    seed=st.binary(min_size=1, max_size=64),
    lost=st.data(),
    kind=st.sampled_from(["bytes", "bytearray", "view", "slice"]),
)
def test_isa_l_computes_zfecs_code(
    parity: int, length: int, seed: bytes, lost: st.DataObject, kind: str
) -> None:
    fast, reference = Code(5, parity), Code(5, parity, kernel=None)
    blocks = [bytes((seed * (length + i))[i : i + length]) for i in range(5)]
    given_blocks = _as(kind, blocks)
    coded = fast.encode(given_blocks)
    assert coded == reference.encode(blocks)
    shares = dict(enumerate([*blocks, *coded]))
    gone = lost.draw(st.sets(st.integers(0, 4 + parity), min_size=1, max_size=parity))
    left = {n: b for n, b in shares.items() if n not in gone}
    assert fast.rebuild(left) == reference.rebuild(left) == blocks
    for number in gone:
        assert fast.encode(blocks, [number]) == [shares[number]]


def _as(kind: str, blocks: list[bytes]) -> list[bytes | bytearray | memoryview]:
    """The blocks as the encoder may hold them: whole chunks, copies, views, slices."""
    if kind == "bytearray":
        return [bytearray(b) for b in blocks]
    if kind == "view":
        return [memoryview(b) for b in blocks]
    if kind == "slice":
        return [memoryview(b"x" + b)[1:] for b in blocks]
    return list(blocks)


@pytest.mark.parametrize("kernel", [isal.load(), None], ids=["isa-l", "zfec"])
def test_a_code_refuses_too_few_blocks_or_blocks_of_different_lengths(
    kernel: isal.Isal | None,
) -> None:
    code = Code(5, 2, kernel=kernel)
    with pytest.raises(ValueError, match="4 blocks"):
        code.encode([b"a" * 100] * 4)
    with pytest.raises(ValueError, match="differ in length"):
        code.encode([b"a" * 10] * 4 + [b"a" * 12])


def test_isa_l_refuses_a_singular_matrix_and_short_inputs() -> None:
    kernel = isal.load()
    assert kernel is not None
    with pytest.raises(ValueError, match="singular"):
        kernel.invert([[1, 2], [1, 2]])
    tables = kernel.tables([[1, 1]])
    with pytest.raises(ValueError, match="3 bytes, 4 wanted"):
        kernel.encode(tables, [b"abcd", b"abc"], 4)
    with pytest.raises(ValueError, match="1 inputs for a matrix of 2 columns"):
        kernel.encode(tables, [b"abcd"], 4)


def test_rebuild_needs_k_shares() -> None:
    with pytest.raises(ValueError, match="need 5"):
        rebuild(5, 2, {0: b"a", 1: b"b", 2: b"c", 5: b"d"})


def test_spare_counts_the_losses_a_file_still_survives() -> None:
    raid0, raid1, parity = (
        StripeLayout(unit=4),
        StripeLayout(unit=4, copies=2),
        StripeLayout(unit=4, parity=2),
    )
    assert raid0.spare(set(range(5))) == 0
    assert raid0.spare({0, 1, 2, 3}) == -1
    assert raid1.spare(set(range(10))) == 1
    assert raid1.spare(set(range(10)) - {3}) == 0
    assert raid1.spare(set(range(10)) - {3, 8}) == -1
    assert parity.spare(set(range(7)) - {1}) == 1
    assert parity.spare(set(range(7)) - {1, 6, 2}) == -1
