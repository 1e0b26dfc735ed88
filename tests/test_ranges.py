"""Range headers resolved against a file's size (karma8.core.ranges): the edge cases the HTTP
tests do not reach."""

from __future__ import annotations

import pytest

from karma8.core.ranges import resolve_range


@pytest.mark.parametrize(
    ("header", "selected"),
    [
        ("bytes=2-3", (2, 4)),
        ("BYTES=2-3", (2, 4)),  # the unit's name is case-insensitive (RFC 9110 §14.1)
        ("Bytes = 5 -", (5, 10)),
        ("bytes=\u0661-\u0662", None),  # not ASCII digits: not a range, the whole file
        ("bytes=\uff11-\uff12", None),
        ("items=2-3", None),
    ],
)
def test_a_range_header_selects_its_bytes_or_nothing(
    header: str, selected: tuple[int, int] | None
) -> None:
    assert resolve_range(header, 10) == selected
