"""Parity parts: a systematic Reed-Solomon code over a version's k data parts.

Theory of operation
-------------------
The code works byte by byte across parts: byte ``x`` of parity part ``j`` is a function of
byte ``x`` of each data part (GF(256) arithmetic, done by ``zfec``). A data part shorter than
the longest (the tail pieces differ by at most one byte) counts as zero-padded, so every
parity part is as long as the longest data part, and any byte range ``[a, b)`` of a lost data
part is rebuilt from the same range of any k other parts, padded alike and trimmed to the
lost part's real size. Nothing needs row alignment, so the encoder takes the data parts'
chunks as the splitter emits them and codes whatever prefix all k parts have reached: it
holds at most what one part runs ahead of the slowest, under one row.

Share numbers follow zfec: data part ``i`` is share ``i``, parity part ``j`` share ``k + j``
(a version's slot numbers, see :class:`karma8.core.layout.StripeLayout`). The data parts are
the very bytes raid0 stores: the code adds parts and changes none.

The code is zfec's: its generator matrix is read off zfec (by coding unit vectors), and the
bytes on disk are what zfec computes. Where ISA-L loads (:mod:`karma8.core.isal`), ISA-L
computes the same products with vector instructions and without the GIL (several times
zfec's rate: docs/benchmarks.md, "Engines"); elsewhere zfec does. :data:`KERNEL` says which.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Mapping, Sequence

import zfec

from karma8.core import isal

_ISAL = isal.load()
KERNEL = "isa-l" if _ISAL is not None else "zfec"

Block = bytes | bytearray | memoryview


class Code:
    """The systematic (k + m, k) code with zfec's matrix; ``kernel`` computes its products
    (ISA-L where it loads; None: zfec itself)."""

    def __init__(self, parts: int, parity: int, kernel: isal.Isal | None = _ISAL) -> None:
        if parity < 1:
            raise ValueError(f"parity must be >= 1, got {parity}")
        self.parts, self.parity = parts, parity
        self._zfec = zfec.Encoder(parts, parts + parity)
        self._kernel = kernel
        self._parity_numbers = list(range(parts, parts + parity))
        unit = [[bytes([int(i == j)]) for j in range(parts)] for i in range(parts)]
        columns = [
            [c[0] for c in self._zfec.encode(unit[i], self._parity_numbers)] for i in range(parts)
        ]
        # Row r of the generator: share r's coefficients over the k data blocks.
        self.generator = [[int(i == j) for j in range(parts)] for i in range(parts)] + [
            [columns[i][j] for i in range(parts)] for j in range(parity)
        ]
        self._parity_tables = kernel.tables(self.generator[parts:]) if kernel else None

    def encode(self, blocks: Sequence[Block], numbers: Sequence[int] | None = None) -> list[bytes]:
        """Shares ``numbers`` (default: every parity share) of k equal-length data blocks.

        Raises:
            ValueError: not k blocks, or blocks of different lengths.
        """
        if len(blocks) != self.parts:
            raise ValueError(f"{len(blocks)} blocks for a code of {self.parts} data parts")
        if len({len(b) for b in blocks}) > 1:
            raise ValueError(f"blocks differ in length: {sorted({len(b) for b in blocks})}")
        numbers = self._parity_numbers if numbers is None else list(numbers)
        if self._kernel is None:
            return [bytes(b) for b in self._zfec.encode(list(blocks), numbers)]
        if numbers == self._parity_numbers:
            assert self._parity_tables is not None
            tables = self._parity_tables
        else:
            tables = self._kernel.tables([self.generator[n] for n in numbers])
        return self._kernel.encode(tables, blocks, len(blocks[0]))

    def rebuild(self, shares: Mapping[int, bytes]) -> list[bytes]:
        """The k data blocks from any k shares (equal lengths; share number -> block)."""
        if len(shares) < self.parts:
            raise ValueError(f"need {self.parts} shares to rebuild, have {len(shares)}")
        lengths = {len(b) for b in shares.values()}
        if len(lengths) > 1:
            raise ValueError(f"shares differ in length: {sorted(lengths)}")
        if all(i in shares for i in range(self.parts)):
            return [shares[i] for i in range(self.parts)]
        # Each data share at its own index, parity shares in the gaps (zfec's convention).
        spare = sorted(n for n in shares if n >= self.parts)
        numbers = [i if i in shares else spare.pop(0) for i in range(self.parts)]
        blocks = [shares[n] for n in numbers]
        if self._kernel is None:
            decoded = zfec.Decoder(self.parts, self.parts + self.parity).decode(blocks, numbers)
            return [bytes(b) for b in decoded]
        missing = [i for i in range(self.parts) if numbers[i] != i]
        tables = self._decoder(tuple(numbers), tuple(missing))
        rebuilt = dict(
            zip(missing, self._kernel.encode(tables, blocks, lengths.pop()), strict=True)
        )
        return [rebuilt.get(i, shares.get(i, b"")) for i in range(self.parts)]

    @functools.lru_cache(maxsize=64)  # noqa: B019 - a few codes live for the process
    def _decoder(self, numbers: tuple[int, ...], missing: tuple[int, ...]) -> isal.Tables:
        assert self._kernel is not None
        inverse = self._kernel.invert([self.generator[n] for n in numbers])
        return self._kernel.tables([inverse[i] for i in missing])


@functools.cache
def code(parts: int, parity: int) -> Code:
    """The process's code for k + m (made once: reading zfec's matrix costs k encodes)."""
    return Code(parts, parity)


class ParityEncoder:
    """Computes ``parity`` parity parts while the data parts stream by.

    :meth:`feed` takes data part ``part``'s next chunk and returns the parity parts' next
    chunks (one bytes per parity part, all of one length, possibly none); :meth:`finish`
    pads the shorter parts' ends with zeros and returns the last chunks.
    """

    def __init__(self, parts: int, parity: int) -> None:
        self._parts = parts
        self._coder = code(parts, parity)
        # Each part's chunks not coded yet, kept as given (a whole unit, the usual case, is
        # coded without a copy), and their total.
        self._pending: list[collections.deque[memoryview]] = [
            collections.deque() for _ in range(parts)
        ]
        self._held = [0] * parts

    def feed(self, part: int, chunk: bytes) -> list[bytes]:
        if chunk:
            self._pending[part].append(memoryview(chunk))
            self._held[part] += len(chunk)
        ready = min(self._held)
        if ready == 0:
            return []
        return self._code([self._take(i, ready) for i in range(self._parts)])

    def finish(self) -> list[bytes]:
        longest = max(self._held)
        if longest == 0:
            return []
        blocks: list[bytes | bytearray | memoryview] = []
        for i, held in enumerate(list(self._held)):
            block = self._take(i, held)
            blocks.append(block if held == longest else bytes(block) + bytes(longest - held))
        return self._code(blocks)

    def _take(self, part: int, count: int) -> bytes | bytearray | memoryview:
        """The next ``count`` bytes of a part's pending chunks."""
        pending = self._pending[part]
        self._held[part] -= count
        if count == 0:
            return b""
        if len(pending[0]) == count:
            return pending.popleft()
        out = bytearray()
        while count:
            head = pending[0]
            if len(head) <= count:
                out += pending.popleft()
                count -= len(head)
            else:
                out += head[:count]
                pending[0] = head[count:]
                count = 0
        return out

    def _code(self, blocks: list[bytes | bytearray | memoryview]) -> list[bytes]:
        return self._coder.encode(blocks)


def encode_parity(data_parts: Sequence[bytes], parity: int) -> list[bytes]:
    """The parity parts of whole data parts (a small file held whole)."""
    encoder = ParityEncoder(len(data_parts), parity)
    out: list[bytearray] = [bytearray() for _ in range(parity)]
    for index, part in enumerate(data_parts):
        for j, chunk in enumerate(encoder.feed(index, part)):
            out[j] += chunk
    for j, chunk in enumerate(encoder.finish()):
        out[j] += chunk
    return [bytes(p) for p in out]


def rebuild(parts: int, parity: int, shares: Mapping[int, bytes]) -> list[bytes]:
    """The k data blocks from any k of the shares (equal lengths; share number -> block).

    Raises:
        ValueError: fewer than k shares, or blocks of different lengths.
    """
    return code(parts, parity).rebuild(shares)


def rebuild_share(parts: int, parity: int, shares: Mapping[int, bytes], number: int) -> bytes:
    """Share ``number``'s block, a data part's or a parity part's, from any k other shares
    (a lost parity part is coded again from the data blocks)."""
    coder = code(parts, parity)
    data = coder.rebuild(shares)
    if number < parts:
        return data[number]
    (block,) = coder.encode(data, [number])
    return block
