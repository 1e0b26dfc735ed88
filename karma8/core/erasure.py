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

from collections.abc import Mapping, Sequence

import zfec


class ParityEncoder:
    """Computes ``parity`` parity parts while the data parts stream by.

    :meth:`feed` takes data part ``part``'s next chunk and returns the parity parts' next
    chunks (one bytes per parity part, all of one length, possibly empty); :meth:`finish`
    pads the shorter parts' ends with zeros and returns the last chunks.
    """

    def __init__(self, parts: int, parity: int) -> None:
        if parity < 1:
            raise ValueError(f"parity must be >= 1, got {parity}")
        self._parts = parts
        self._parity = parity
        self._encoder = zfec.Encoder(parts, parts + parity)
        self._pending = [bytearray() for _ in range(parts)]

    def feed(self, part: int, chunk: bytes) -> list[bytes]:
        self._pending[part] += chunk
        ready = min(len(p) for p in self._pending)
        if ready == 0:
            return []
        return self._code(ready)

    def finish(self) -> list[bytes]:
        longest = max(len(p) for p in self._pending)
        if longest == 0:
            return []
        for pending in self._pending:
            pending.extend(bytes(longest - len(pending)))
        return self._code(longest)

    def _code(self, length: int) -> list[bytes]:
        blocks = [bytes(p[:length]) for p in self._pending]
        for pending in self._pending:
            del pending[:length]
        return list(
            self._encoder.encode(blocks, list(range(self._parts, self._parts + self._parity)))
        )


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
