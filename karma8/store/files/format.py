"""The part file format: a 96-byte header, the payload, a trailer of block CRCs.

The layout, field by field, is in :mod:`karma8.store.files`. This module encodes and decodes
the header (:class:`PartHeader`), reads and checks the trailer, and checks blocks of payload
against their CRCs. Pure, except :func:`read_trailer`, which reads from a file descriptor.
"""

from __future__ import annotations

import re
import struct
import zlib

import attrs

from karma8.core.errors import IntegrityError
from karma8.store.crc32 import combined_crc
from karma8.store.diskio import pread_exact

MAGIC = b"K8PART"
FORMAT_VERSION = 2
_V1 = 1
_HEADER_BODY = struct.Struct("!6sH64sQ")
_HEADER_CRC = struct.Struct("!I")
_HEADER_V2 = struct.Struct("!III")  # block size, trailer CRC, reserved
HEADER_SIZE = 96
assert _HEADER_BODY.size + _HEADER_CRC.size + _HEADER_V2.size == HEADER_SIZE

BLOCK = 64 * 1024
"""Bytes of payload per block checksum (written into every version-2 header)."""
_BLOCK_CRC_SIZE = 4

_CHECKSUM = re.compile(r"[0-9a-f]{64}")


@attrs.frozen
class PartHeader:
    """The decoded header of a part file.

    ``block_size`` is 0 for a version-1 part, which has no block checksums and no trailer.
    """

    checksum: str
    length: int
    block_size: int = BLOCK
    trailer_crc: int = 0

    @property
    def version(self) -> int:
        return FORMAT_VERSION if self.block_size else _V1

    @property
    def blocks(self) -> int:
        """How many block checksums the trailer holds."""
        return -(-self.length // self.block_size) if self.block_size else 0

    @property
    def trailer_size(self) -> int:
        return _BLOCK_CRC_SIZE * self.blocks

    @property
    def file_size(self) -> int:
        """The size of a complete part file with this header."""
        return HEADER_SIZE + self.length + self.trailer_size

    def encode(self) -> bytes:
        """The 96 header bytes for this part (version 2 only: nothing writes version 1)."""
        if not self.block_size:
            raise ValueError("only version-2 headers are written")
        body = _HEADER_BODY.pack(MAGIC, FORMAT_VERSION, self.checksum.encode("ascii"), self.length)
        rest = _HEADER_V2.pack(self.block_size, self.trailer_crc, 0)
        return body + _HEADER_CRC.pack(zlib.crc32(rest, zlib.crc32(body))) + rest

    @classmethod
    def decode(cls, data: bytes, key: str) -> PartHeader:
        """Parse a header (version 2, or version 1 without block checksums).

        Args:
            data: The first bytes of a part file (at least :data:`HEADER_SIZE` expected).
            key: The part's key, for error messages.

        Raises:
            IntegrityError: The header is short, has a bad magic, version, CRC or block size.
        """
        if len(data) < HEADER_SIZE:
            raise IntegrityError(f"part {key} has a truncated header")
        body = data[: _HEADER_BODY.size]
        rest = data[_HEADER_BODY.size + _HEADER_CRC.size : HEADER_SIZE]
        magic, version, checksum, length = _HEADER_BODY.unpack(body)
        (crc,) = _HEADER_CRC.unpack_from(data, _HEADER_BODY.size)
        # Version 1 covers bytes 0..79; version 2 (and any later one) the whole header.
        expected = zlib.crc32(body)
        if version != _V1:
            expected = zlib.crc32(rest, expected)
        if magic != MAGIC or crc != expected:
            raise IntegrityError(f"part {key} has a damaged header")
        if version not in (_V1, FORMAT_VERSION):
            raise IntegrityError(f"part {key} has unknown format version {version}")
        text = checksum.decode("ascii", errors="replace")
        if not _CHECKSUM.fullmatch(text):
            raise IntegrityError(f"part {key} has a damaged header")
        if version == _V1:
            return cls(checksum=text, length=length, block_size=0)
        block_size, trailer_crc, _ = _HEADER_V2.unpack(rest)
        if block_size <= 0:
            raise IntegrityError(f"part {key} has a damaged header")
        return cls(checksum=text, length=length, block_size=block_size, trailer_crc=trailer_crc)


def encode_trailer(crcs: list[int]) -> bytes:
    """The trailer holding these block CRCs."""
    return struct.pack(f"!{len(crcs)}I", *crcs)


def read_trailer(fd: int, header: PartHeader, key: str) -> tuple[int, ...]:
    """Read and check a part's block checksums (in a thread); () for a version-1 part.

    Raises:
        IntegrityError: The trailer is cut short or does not match its CRC.
    """
    if not header.blocks:
        return ()
    size = header.trailer_size
    data = pread_exact(fd, size, HEADER_SIZE + header.length)
    if len(data) < size:
        raise IntegrityError(f"part {key} is truncated")
    if zlib.crc32(data) != header.trailer_crc:
        raise IntegrityError(f"part {key} has a damaged block checksum trailer")
    return struct.unpack(f"!{header.blocks}I", data)


def check_blocks(data: bytes, first_block: int, block: int, crcs: tuple[int, ...]) -> bool:
    """Whether whole blocks ``first_block, ...`` read as ``data`` match their checksums.

    One CRC pass over all of ``data`` (one GIL release), compared with the blocks' CRCs
    combined (:mod:`karma8.store.crc32`).
    """
    if not data:
        return True
    count = -(-len(data) // block)
    window = crcs[first_block : first_block + count]
    if len(window) != count:  # more bytes than the part has blocks
        return False
    last = len(data) - (count - 1) * block
    return zlib.crc32(data) == combined_crc(window, block, last)


def payload_bytes(file_size: int) -> int:
    """Payload length of a version-2 part file of this size written with :data:`BLOCK`.

    The file holds ``L + 4 * ceil(L / BLOCK)`` bytes after the header, and that determines L.
    """
    after_header = max(0, file_size - HEADER_SIZE)
    return after_header - _BLOCK_CRC_SIZE * -(-after_header // (BLOCK + _BLOCK_CRC_SIZE))
