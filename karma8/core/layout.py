"""The striped layout: how a file's bytes map onto its k parts.

Theory of operation
-------------------
A file is a sequence of *rows* followed by a *tail*. A row is ``k`` units of ``u`` bytes and
unit ``i`` of every row belongs to part ``i``. The bytes after the last full row (the tail,
``T < k*u`` bytes) are cut into ``k`` contiguous pieces in file order: piece ``i`` gets
``T // k`` bytes, plus one if ``i < T % k``. Therefore, for every file size, including 0 to 4
bytes, the ``k`` part sizes differ by at most one byte::

    part_size(i) = R*u + T//k + (1 if i < T % k else 0)     R = size // (k*u)

A stream only reveals that it has reached the tail when it ends, so a streaming splitter must
hold back bytes until it has a full row; it never holds more than one row. Rows go out unit by
unit as soon as they are complete, so all k part writes progress in parallel and no
Content-Length is needed up front.

Reading maps a byte range of the file to *segments* ``(part, offset, length)`` in file order;
concatenating the segments' bytes gives the range. The layout ``(k, u)`` is stored with every
file version, so old files read back after the defaults change.

Redundancy is part of the layout too: a version is written to ``slots`` stored parts. raid0
has the k data parts (slots 0..k-1); raid1 (``copies`` r > 1) writes copy c of data part i
to slot ``c*k + i``; parity (``parity`` m > 0) adds m parity parts in slots k..k+m-1, each as
long as the longest data part (the data parts of the tail, zero-padded, are its code's input;
see :mod:`karma8.core.erasure`).

Everything here is pure and synchronous: no I/O, no trio.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import attrs

DEFAULT_PARTS = 5
DEFAULT_UNIT = 4 << 20  # the stripe unit of new files unless configured
DEFAULT_MAX_FILE_SIZE = 1 << 40  # the largest file a gateway or discovery accepts
MAX_PARITY = 2  # parity parts a version may have
MAX_COPIES = 5  # copies of each part a raid1 version may have


ENGINES = ("raid0", "raid1", "parity")
DEFAULT_COPIES = 2  # a raid1 namespace's copies of each part unless chosen
DEFAULT_PARITY = 1  # a parity namespace's parity parts unless chosen


def engine_redundancy(
    engine: str, *, copies: int | None = None, parity: int | None = None
) -> tuple[int, int]:
    """``(copies, parity)`` of an engine, its defaults filled in.

    Raises:
        ValueError: an unknown engine, or a setting it has not or out of range.
    """
    if engine == "raid0" and copies in (None, 1) and parity in (None, 0):
        return 1, 0
    if engine == "raid1" and parity in (None, 0):
        copies = DEFAULT_COPIES if copies is None else copies
        if not 2 <= copies <= MAX_COPIES:
            raise ValueError(f"raid1 keeps 2 to {MAX_COPIES} copies of each part, not {copies}")
        return copies, 0
    if engine == "parity" and copies in (None, 1):
        parity = DEFAULT_PARITY if parity is None else parity
        if not 1 <= parity <= MAX_PARITY:
            raise ValueError(f"parity adds 1 to {MAX_PARITY} parity parts, not {parity}")
        return 1, parity
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    # The setting this engine does not take (raid0 takes neither; name the one given).
    extra = "parity" if engine == "raid1" or parity not in (None, 0) else "copies"
    raise ValueError(f"{engine} takes no {extra} setting")


def _validate_positive(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


@attrs.frozen(kw_only=True)
class Segment:
    """A run of bytes that lives contiguously in one part."""

    part: int
    offset: int
    length: int


@attrs.frozen(kw_only=True)
class StripeLayout:
    """How a file is striped over ``parts`` parts with a stripe unit of ``unit`` bytes."""

    parts: int = attrs.field(default=DEFAULT_PARTS, validator=_validate_positive)
    unit: int = attrs.field(default=DEFAULT_UNIT, validator=_validate_positive)
    copies: int = attrs.field(default=1)
    parity: int = attrs.field(default=0)

    @copies.validator
    def _check_copies(self, _attribute: object, value: int) -> None:
        if not 1 <= value <= MAX_COPIES:
            raise ValueError(f"copies must be between 1 and {MAX_COPIES}, got {value}")

    @parity.validator
    def _check_parity(self, _attribute: object, value: int) -> None:
        if not 0 <= value <= MAX_PARITY:
            raise ValueError(f"parity must be between 0 and {MAX_PARITY}, got {value}")
        if value and self.copies > 1:
            raise ValueError("a layout has copies or parity parts, not both")

    @property
    def row_size(self) -> int:
        return self.parts * self.unit

    @property
    def engine(self) -> str:
        """``raid0``, ``raid1`` or ``parity``."""
        if self.parity:
            return "parity"
        return "raid1" if self.copies > 1 else "raid0"

    @property
    def label(self) -> str:
        """The engine with its counts: ``raid0``, ``raid1 x2`` (copies of each part) or
        ``parity 5+2`` (data parts + parity parts)."""
        if self.parity:
            return f"parity {self.parts}+{self.parity}"
        return f"raid1 x{self.copies}" if self.copies > 1 else "raid0"

    @property
    def slots(self) -> int:
        """How many parts are stored: data parts, their copies and parity parts."""
        return self.parts * self.copies + self.parity

    @property
    def tolerates(self) -> int:
        """How many of a version's nodes may be lost with every byte still readable."""
        return self.copies - 1 + self.parity

    def data_part(self, slot: int) -> int | None:
        """The data part that ``slot`` holds (a copy of), or None for a parity part."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot must be between 0 and {self.slots - 1}, got {slot}")
        if slot >= self.parts * self.copies:
            return None
        return slot % self.parts

    def spare(self, readable: set[int]) -> int:
        """How many more stored parts may be lost, with only the slots in ``readable``
        readable: :attr:`tolerates` at full redundancy, -1 if the file cannot be read."""
        if self.parity:
            return len(readable) - self.parts
        return min(sum(s in readable for s in self.copies_of(p)) for p in range(self.parts)) - 1

    def copies_of(self, part: int) -> tuple[int, ...]:
        """The slots that hold data part ``part``, the first copy first."""
        return tuple(c * self.parts + part for c in range(self.copies))

    def slot_sizes(self, size: int) -> tuple[int, ...]:
        """Size of every stored part (slot) of a file of ``size`` bytes."""
        sizes = self.part_sizes(size)
        return sizes * self.copies + (sizes[0],) * self.parity

    def part_sizes(self, size: int) -> tuple[int, ...]:
        """Size of every part of a file of ``size`` bytes."""
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        rows, tail = divmod(size, self.row_size)
        base, extra = divmod(tail, self.parts)
        return tuple(rows * self.unit + base + (1 if i < extra else 0) for i in range(self.parts))

    def tail_piece_start(self, tail: int, piece: int) -> int:
        """Offset, within a tail of ``tail`` bytes, where tail piece ``piece`` starts."""
        base, extra = divmod(tail, self.parts)
        return piece * base + min(piece, extra)

    def segments(self, size: int, start: int = 0, stop: int | None = None) -> Iterator[Segment]:
        """Segments, in file order, that hold bytes ``[start, stop)`` of a ``size``-byte file."""
        stop = size if stop is None else stop
        if not 0 <= start <= stop <= size:
            raise ValueError(f"range [{start}, {stop}) is not within a file of {size} bytes")
        rows, tail = divmod(size, self.row_size)
        body_end = rows * self.row_size
        pos = start
        while pos < min(stop, body_end):
            row, within = divmod(pos, self.row_size)
            part, in_unit = divmod(within, self.unit)
            length = min(self.unit - in_unit, stop - pos)
            yield Segment(part=part, offset=row * self.unit + in_unit, length=length)
            pos += length
        for piece in range(self.parts):
            piece_start = body_end + self.tail_piece_start(tail, piece)
            piece_stop = body_end + self.tail_piece_start(tail, piece + 1)
            lo, hi = max(pos, piece_start), min(stop, piece_stop)
            if lo < hi:
                yield Segment(
                    part=piece, offset=rows * self.unit + lo - piece_start, length=hi - lo
                )

    def part_spans(
        self, size: int, start: int = 0, stop: int | None = None
    ) -> tuple[tuple[int, int] | None, ...]:
        """For each part, the ``(offset, length)`` span that bytes ``[start, stop)`` touch.

        ``None`` for a part the range does not touch, so a Range read opens only the parts it
        needs. Within a part the touched bytes are contiguous, so one span per part suffices.
        """
        if start == 0 and (stop is None or stop == size):  # the whole file: every part whole
            return tuple((0, n) if n else None for n in self.part_sizes(size))
        lo: list[int | None] = [None] * self.parts
        hi = [0] * self.parts
        for seg in self.segments(size, start, stop):
            first = lo[seg.part]
            lo[seg.part] = seg.offset if first is None else min(first, seg.offset)
            hi[seg.part] = max(hi[seg.part], seg.offset + seg.length)
        return tuple(
            None if first is None else (first, hi[i] - first) for i, first in enumerate(lo)
        )


class StripeSplitter:
    """Cuts a byte stream into part chunks, holding back at most one row.

    Feed it the stream with :meth:`feed`; each call returns the ``(part, chunk)`` pairs that are
    now final. :meth:`finish` returns the tail pieces. Concatenating the chunks of part ``i`` in
    the order returned gives exactly part ``i`` of :meth:`StripeLayout.part_sizes`.

    With ``size`` (a Content-Length) the splitter knows up front where the rows end, so every
    byte before the tail goes out as soon as it arrives, sliced straight from the input with one
    copy and without staging; only the tail (less than a row) is held back. Feeding more than
    ``size`` bytes, or finishing with fewer, raises :class:`ValueError`.
    """

    def __init__(self, layout: StripeLayout, size: int | None = None) -> None:
        if size is not None and size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self._layout = layout
        self._row = bytearray()
        self._finished = False
        self._expected = size
        # Bytes [0, _direct_end) belong to full rows and are emitted without staging.
        self._direct_end = 0 if size is None else size - size % layout.row_size
        self.size = 0

    @property
    def buffered(self) -> int:
        """Bytes held back, waiting for their row to complete (always < one row)."""
        return len(self._row)

    def held_after(self, count: int) -> int:
        """Bytes :attr:`buffered` would hold after feeding ``count`` more bytes."""
        if self._expected is not None:
            return max(0, self.size + count - self._direct_end)
        return (len(self._row) + count) % self._layout.row_size

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[int, bytes]]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        view = memoryview(data).cast("B")
        if self._expected is not None and self.size + len(view) > self._expected:
            raise ValueError(f"fed {self.size + len(view)} bytes, more than {self._expected}")
        out: list[tuple[int, bytes]] = []
        row_size, unit = self._layout.row_size, self._layout.unit
        pos = self.size
        self.size += len(view)
        while view and pos < self._direct_end:
            part, in_unit = divmod(pos % row_size, unit)
            take = min(unit - in_unit, len(view), self._direct_end - pos)
            out.append((part, bytes(view[:take])))
            view = view[take:]
            pos += take
        while view:
            if not self._row and len(view) >= row_size:
                # Fast path: a whole row straight from the input, no staging copy.
                out.extend(
                    (i, bytes(view[i * unit : (i + 1) * unit])) for i in range(self._layout.parts)
                )
                view = view[row_size:]
                continue
            need = row_size - len(self._row)
            self._row += view[:need]
            view = view[need:]
            if len(self._row) == row_size:
                row = memoryview(self._row)
                out.extend(
                    (i, bytes(row[i * unit : (i + 1) * unit])) for i in range(self._layout.parts)
                )
                row.release()
                self._row.clear()
        return out

    def discard(self) -> None:
        """Drop what is held back (a failed upload): the memory goes now, not when the
        splitter does, which an exception's traceback may keep alive for a while."""
        self._finished = True
        self._row = bytearray()

    def finish(self) -> list[tuple[int, bytes]]:
        """The tail pieces (empty pieces omitted). The splitter cannot be fed afterwards."""
        if self._finished:
            raise RuntimeError("finish() called twice")
        if self._expected is not None and self.size != self._expected:
            raise ValueError(f"finished after {self.size} bytes, expected {self._expected}")
        self._finished = True
        tail = len(self._row)
        out: list[tuple[int, bytes]] = []
        for piece in range(self._layout.parts):
            lo = self._layout.tail_piece_start(tail, piece)
            hi = self._layout.tail_piece_start(tail, piece + 1)
            if hi > lo:
                out.append((piece, bytes(self._row[lo:hi])))
        self._row = bytearray()
        return out


def split(layout: StripeLayout, data: bytes) -> list[bytes]:
    """Split a whole buffer into its parts (for tests and tools; the gateway streams)."""
    parts = [bytearray() for _ in range(layout.parts)]
    splitter = StripeSplitter(layout)
    for index, chunk in [*splitter.feed(data), *splitter.finish()]:
        parts[index] += chunk
    return [bytes(p) for p in parts]


def merge(layout: StripeLayout, parts: Sequence[bytes]) -> bytes:
    """Glue whole parts back into the file (inverse of :func:`split`; a small file's read).
    Raises ValueError if the parts' lengths are not a file's :meth:`StripeLayout.part_sizes`."""
    if len(parts) != layout.parts:
        raise ValueError(f"expected {layout.parts} parts, got {len(parts)}")
    size = sum(len(p) for p in parts)
    if tuple(len(p) for p in parts) != layout.part_sizes(size):
        raise ValueError("part sizes do not match the layout")
    if size < layout.row_size:  # a tail alone: one piece per part, in part order
        return b"".join(parts)
    return b"".join([parts[s.part][s.offset : s.offset + s.length] for s in layout.segments(size)])
