"""HTTP byte ranges (RFC 9110 §14) resolved against a file size. Pure.

Only single ranges are served. A multi-range request is answered with the whole file, which
RFC 9110 allows (a server may ignore Range); a syntactically invalid Range is ignored too.
An unsatisfiable single range is an error (416).
"""

from __future__ import annotations

import re

from karma8.core.errors import RangeNotSatisfiable

# The unit's name is case-insensitive (RFC 9110 §14.1); the positions are ASCII digits.
_SINGLE = re.compile(r"\s*bytes\s*=\s*([0-9]*)\s*-\s*([0-9]*)\s*", re.IGNORECASE)


def resolve_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, stop)`` (stop exclusive) for a Range header, or None to serve everything.

    Raises:
        RangeNotSatisfiable: a well-formed single range that selects no byte of the file.
    """
    if header is None:
        return None
    match = _SINGLE.fullmatch(header)
    if match is None:
        return None  # multiple ranges or not a bytes range: serve the whole file
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(f"bytes=-{suffix} selects nothing of a {size}-byte file")
        return max(size - suffix, 0), size
    start = int(first)
    if last and int(last) < start:
        return None  # invalid: ignore
    if start >= size:
        raise RangeNotSatisfiable(f"range starts at {start}, the file has {size} bytes")
    stop = size if not last else min(int(last) + 1, size)
    return start, stop


def if_range_allows(header: str | None, etag: str | None) -> bool:
    """Whether a Range may be served under ``If-Range`` (RFC 9110 §13.1.5): only when the
    header is absent or names the current ETag, compared strongly (a weak ``W/`` tag never
    matches). A date cannot match: there is no Last-Modified. Otherwise the whole file is
    served, so a client resuming a download of another version starts over."""
    if header is None:
        return True
    return etag is not None and header.strip() == etag
