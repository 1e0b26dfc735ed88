"""CRC-32 arithmetic (zlib's CRC): the CRC of a concatenation from the CRCs of its pieces.

The file store keeps one CRC per 64 KiB block of a part. Checking a chunk of n blocks with n
calls of ``zlib.crc32`` would hand the GIL back and forth n times between the worker thread
and the event loop (each call releases it). So a chunk is checked with one ``zlib.crc32``
over all of it, compared with the blocks' stored CRCs combined here, in a few table look-ups
per block.

A CRC is a remainder of polynomial division, so ``crc(A + B) = crc(A) * x^(8 len B) + crc(B)``
modulo the CRC polynomial (zlib's ``crc32_combine``; the pre- and post-inversion cancel).
Multiplying by a fixed ``x^(8n)`` is linear over GF(2), so for the block length it is four
256-entry tables, one per byte of the CRC. The functions follow zlib's ``crc32.c``
(``multmodp``, ``x2nmodp``); pure and synchronous.

Detection: a damaged block changes the combined CRC exactly as it changes its own, shifted by
an invertible multiplication, so an error one block CRC would catch is caught here too. Errors
in several blocks of one chunk could cancel, with probability 2^-32 (as for any CRC-32).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

_POLY = 0xEDB88320  # x^32 + x^26 + ... + 1, bit-reflected as zlib computes it
_ONE = 1 << 31  # the polynomial 1 in the reflected representation


def _multmodp(a: int, b: int) -> int:
    """``a * b`` modulo the CRC polynomial; ``a`` must not be zero."""
    m = _ONE
    p = 0
    while True:
        if a & m:
            p ^= b
            if a & (m - 1) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _powers() -> tuple[int, ...]:
    """``x^(2^k)`` modulo the polynomial, for k = 0..31."""
    powers = [_ONE >> 1]  # x^1
    for _ in range(31):
        powers.append(_multmodp(powers[-1], powers[-1]))
    return tuple(powers)


_X2N = _powers()


def _x8nmodp(n: int) -> int:
    """``x^(8n)`` modulo the polynomial: what shifts a CRC past ``n`` more bytes."""
    p = _ONE
    k = 3  # 8n = n * 2^3
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """``zlib.crc32(a + b)`` from ``crc1 = zlib.crc32(a)``, ``crc2 = zlib.crc32(b)``, ``len(b)``."""
    if len2 < 0:
        raise ValueError("len2 must not be negative")
    return _multmodp(_x8nmodp(len2), crc1) ^ crc2


@functools.cache
def _shift_tables(length: int) -> tuple[tuple[int, ...], ...]:
    """Four byte tables whose look-ups XORed together shift a CRC past ``length`` bytes."""
    op = _x8nmodp(length)
    tables = []
    for i in range(4):
        bits = [_multmodp(op, 1 << (8 * i + j)) for j in range(8)]  # the images of one bit
        table = [0] * 256
        for byte in range(1, 256):  # linear: a byte's image is the XOR of its bits' images
            low = byte & -byte
            table[byte] = table[byte ^ low] ^ bits[low.bit_length() - 1]
        tables.append(tuple(table))
    return tuple(tables)


def combined_crc(crcs: Sequence[int], block: int, last: int) -> int:
    """CRC-32 of consecutive pieces whose CRCs are ``crcs``: every piece ``block`` bytes long
    but the last, which is ``last`` bytes (``0 < last <= block``)."""
    if not crcs:
        return 0
    if not 0 < last <= block:
        raise ValueError(f"last piece length {last} is not in (0, {block}]")
    t0, t1, t2, t3 = _shift_tables(block)
    combined = crcs[0]
    for crc in crcs[1:-1]:
        c = combined
        combined = t0[c & 0xFF] ^ t1[(c >> 8) & 0xFF] ^ t2[(c >> 16) & 0xFF] ^ t3[c >> 24] ^ crc
    if len(crcs) > 1:
        combined = crc32_combine(combined, crcs[-1], last)
    return combined
