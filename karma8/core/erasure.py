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
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence

import zfec


class ParityEncoder:
    """Computes ``parity`` parity parts while the data parts stream by.

    :meth:`feed` takes data part ``part``'s next chunk and returns the parity parts' next
    chunks (one bytes per parity part, all of one length, possibly none); :meth:`finish`
    pads the shorter parts' ends with zeros and returns the last chunks.
    """

    def __init__(self, parts: int, parity: int) -> None:
        if parity < 1:
            raise ValueError(f"parity must be >= 1, got {parity}")
        self._parts = parts
        self._encoder = zfec.Encoder(parts, parts + parity)
        self._numbers = list(range(parts, parts + parity))
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
        return list(self._encoder.encode(blocks, self._numbers))


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
    if len(shares) < parts:
        raise ValueError(f"need {parts} shares to rebuild, have {len(shares)}")
    lengths = {len(b) for b in shares.values()}
    if len(lengths) > 1:
        raise ValueError(f"shares differ in length: {sorted(lengths)}")
    if all(i in shares for i in range(parts)):
        return [shares[i] for i in range(parts)]
    # zfec wants each data share at the list index of its number, parity shares in the gaps.
    spare = sorted(n for n in shares if n >= parts)
    blocks: list[bytes] = []
    numbers: list[int] = []
    for i in range(parts):
        number = i if i in shares else spare.pop(0)
        blocks.append(shares[number])
        numbers.append(number)
    decoded = zfec.Decoder(parts, parts + parity).decode(blocks, numbers)
    return [bytes(b) for b in decoded]


def rebuild_share(parts: int, parity: int, shares: Mapping[int, bytes], number: int) -> bytes:
    """Share ``number``'s block, a data part's or a parity part's, from any k other shares
    (a lost parity part is coded again from the data blocks)."""
    data = rebuild(parts, parity, shares)
    if number < parts:
        return data[number]
    (block,) = zfec.Encoder(parts, parts + parity).encode(data, [number])
    return bytes(block)
