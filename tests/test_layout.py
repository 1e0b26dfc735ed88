"""Properties of the striped layout (pure core, no trio)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from karma8.core.layout import StripeLayout, StripeSplitter, engine_redundancy, merge, split

layouts = st.builds(StripeLayout, parts=st.integers(1, 8), unit=st.integers(1, 64))


def _row_edges(layout: StripeLayout) -> list[int]:
    row = layout.row_size
    return [0, 1, 4, 5, 6, row - 1, row, row + 1, 2 * row - 1, 2 * row, 2 * row + 3]


@given(layout=layouts, data=st.binary(max_size=2000))
def test_merge_inverts_split(layout: StripeLayout, data: bytes) -> None:
    assert merge(layout, split(layout, data)) == data


@given(layout=layouts, size=st.integers(0, 10_000))
def test_part_sizes_differ_by_at_most_one_byte(layout: StripeLayout, size: int) -> None:
    sizes = layout.part_sizes(size)
    assert len(sizes) == layout.parts
    assert sum(sizes) == size
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11])
def test_tiny_files_spread_one_byte_per_part(size: int) -> None:
    layout = StripeLayout(parts=5, unit=4)
    data = bytes(range(size))
    parts = split(layout, data)
    assert [len(p) for p in parts] == list(layout.part_sizes(size))
    assert merge(layout, parts) == data


@given(layout=layouts, data=st.data())
def test_split_sizes_match_layout_at_row_edges(layout: StripeLayout, data: st.DataObject) -> None:
    size = data.draw(st.sampled_from(_row_edges(layout)))
    payload = bytes(i % 251 for i in range(size))
    assert tuple(len(p) for p in split(layout, payload)) == layout.part_sizes(size)


@given(
    layout=layouts,
    payload=st.binary(max_size=3000),
    cuts=st.lists(st.integers(0, 3000), max_size=20),
)
def test_streaming_split_holds_less_than_a_row_and_matches_whole_split(
    layout: StripeLayout, payload: bytes, cuts: list[int]
) -> None:
    """Any chunking of the stream gives the same parts; the splitter never holds a row."""
    edges = sorted({0, len(payload), *(c for c in cuts if c <= len(payload))})
    splitter = StripeSplitter(layout)
    parts = [bytearray() for _ in range(layout.parts)]
    for lo, hi in itertools.pairwise(edges):
        for index, chunk in splitter.feed(payload[lo:hi]):
            parts[index] += chunk
        assert splitter.buffered < layout.row_size
    for index, chunk in splitter.finish():
        parts[index] += chunk
    assert [bytes(p) for p in parts] == split(layout, payload)


@given(
    layout=layouts,
    payload=st.binary(max_size=3000),
    cuts=st.lists(st.integers(0, 3000), max_size=20),
)
def test_a_splitter_told_the_size_emits_rows_at_once_and_the_same_parts(
    layout: StripeLayout, payload: bytes, cuts: list[int]
) -> None:
    """Knowing the size up front changes when bytes go out, never which part they go to."""
    edges = sorted({0, len(payload), *(c for c in cuts if c <= len(payload))})
    splitter = StripeSplitter(layout, size=len(payload))
    parts = [bytearray() for _ in range(layout.parts)]
    for lo, hi in itertools.pairwise(edges):
        emitted = splitter.feed(payload[lo:hi])
        for index, chunk in emitted:
            parts[index] += chunk
        body_end = len(payload) - len(payload) % layout.row_size
        # Everything fed that lies before the tail went out at once.
        assert sum(len(c) for _, c in emitted) == max(0, min(hi, body_end) - min(lo, body_end))
    for index, chunk in splitter.finish():
        parts[index] += chunk
    assert [bytes(p) for p in parts] == split(layout, payload)


def test_a_splitter_told_the_size_refuses_more_or_fewer_bytes() -> None:
    layout = StripeLayout(parts=5, unit=4)
    with pytest.raises(ValueError, match="more than 30"):
        StripeSplitter(layout, size=30).feed(bytes(31))
    short = StripeSplitter(layout, size=30)
    short.feed(bytes(29))
    with pytest.raises(ValueError, match="expected 30"):
        short.finish()
    with pytest.raises(ValueError, match="size"):
        StripeSplitter(layout, size=-1)


@given(layout=layouts, size=st.integers(0, 5000))
def test_a_whole_file_spans_every_part_whole(layout: StripeLayout, size: int) -> None:
    # The whole file's spans (worked out from the part sizes) are those its segments touch.
    touched: dict[int, tuple[int, int]] = {}
    for segment in layout.segments(size):
        lo, hi = touched.get(segment.part, (segment.offset, segment.offset))
        touched[segment.part] = (min(lo, segment.offset), max(hi, segment.offset + segment.length))
    expected = tuple(
        (touched[part][0], touched[part][1] - touched[part][0]) if part in touched else None
        for part in range(layout.parts)
    )
    assert layout.part_spans(size) == expected
    assert layout.part_spans(size, 0, size) == expected


@given(layout=layouts, data=st.data())
def test_segments_map_any_range_to_the_same_bytes(
    layout: StripeLayout, data: st.DataObject
) -> None:
    size = data.draw(st.integers(0, 1500))
    payload = bytes((i * 7 + 3) % 256 for i in range(size))
    start = data.draw(st.integers(0, size))
    stop = data.draw(st.integers(start, size))
    parts = split(layout, payload)
    got = b"".join(
        parts[s.part][s.offset : s.offset + s.length] for s in layout.segments(size, start, stop)
    )
    assert got == payload[start:stop]
    # part_spans covers exactly the bytes the segments touch, contiguously per part.
    spans = layout.part_spans(size, start, stop)
    for segment in layout.segments(size, start, stop):
        span = spans[segment.part]
        assert span is not None
        assert span[0] <= segment.offset
        assert segment.offset + segment.length <= span[0] + span[1]
    touched = sum(span[1] for span in spans if span is not None)
    assert touched == stop - start


def test_invalid_layouts_and_ranges_are_rejected() -> None:
    with pytest.raises(ValueError, match="parts"):
        StripeLayout(parts=0)
    with pytest.raises(ValueError, match="unit"):
        StripeLayout(unit=0)
    layout = StripeLayout(parts=5, unit=4)
    with pytest.raises(ValueError, match="range"):
        list(layout.segments(10, 5, 11))
    with pytest.raises(ValueError, match="size"):
        layout.part_sizes(-1)
    with pytest.raises(ValueError, match="sizes"):
        merge(layout, [b"ab", b"", b"", b"", b""])


def test_splitter_refuses_use_after_finish() -> None:
    splitter = StripeSplitter(StripeLayout(parts=5, unit=4))
    splitter.feed(b"abc")
    splitter.finish()
    with pytest.raises(RuntimeError):
        splitter.feed(b"x")
    with pytest.raises(RuntimeError):
        splitter.finish()


@pytest.mark.parametrize(
    ("engine", "copies", "parity", "message"),
    [
        ("raid0", 2, None, "raid0 takes no copies setting"),
        ("raid0", None, 1, "raid0 takes no parity setting"),
        ("raid1", None, 1, "raid1 takes no parity setting"),
        ("parity", 2, None, "parity takes no copies setting"),
        ("raid1", 9, None, "raid1 keeps 2 to 5 copies of each part, not 9"),
        ("parity", None, 3, "parity adds 1 to 2 parity parts, not 3"),
        ("raid5", None, None, "engine must be one of"),
    ],
)
def test_an_engine_refuses_a_setting_naming_it(
    engine: str, copies: int | None, parity: int | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        engine_redundancy(engine, copies=copies, parity=parity)


def test_an_engine_fills_in_its_defaults() -> None:
    assert engine_redundancy("raid0") == (1, 0)
    assert engine_redundancy("raid1") == (2, 0)
    assert engine_redundancy("parity", parity=2) == (1, 2)
