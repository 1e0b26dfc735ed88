"""The needle: one part (or one tombstone) in a volume file, and the scan that finds them.

Pure functions over bytes and a ``read(offset, size)`` callable: no trio, no file system, so
the store, its tests and a simulated disk run the same code. The byte table is in the package
docstring (:mod:`karma8.store.packed`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
import zlib
from collections.abc import Callable

import attrs

MAGIC = b"K8ND"
VERSION = 1  # a needle of an unsalted volume (written before volumes had salts)
SALTED = 2  # a needle of a salted volume: its header's check is keyed by the volume's salt
SALT_SIZE = 8
LIVE = 0
TOMBSTONE = 1
ALIGN = 8
# magic, version, flags, key length, payload length, payload CRC-32, sha256 (raw)
_FIELDS = struct.Struct(">4sBBHQI32s")
HEADER_SIZE = _FIELDS.size + 4  # the fields, then the check of the fields and the key
MAX_KEY = 1024
# How far a scan reads at once while it looks for the next needle after damaged bytes.
_RESYNC_READ = 1 << 16


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def needle_size(key_len: int, length: int) -> int:
    """Bytes a needle takes in its volume, padding included."""
    return aligned(HEADER_SIZE + key_len + length)


@attrs.frozen(kw_only=True)
class Needle:
    """A needle's header as a scan found it at ``offset`` of its volume.

    Attributes:
        key: The part's key.
        offset: Where the needle starts in its volume.
        flags: :data:`LIVE` or :data:`TOMBSTONE`.
        length: Payload bytes (0 for a tombstone).
        crc: CRC-32 of the payload.
        sha256: sha256 of the payload (raw bytes; zeros for a tombstone).
        data_offset: Where the payload starts in the volume.
        size: Bytes the needle takes in its volume, padding included.
    """

    key: str
    offset: int
    flags: int
    length: int
    crc: int
    sha256: bytes
    # Worked out once by the scan (read three times a needle; as properties they were a
    # quarter of a scan's time).
    data_offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


def new_salt() -> bytes:
    """A new volume's salt: random, never shown to a client."""
    return os.urandom(SALT_SIZE)


def encode(
    key: str, payload: bytes, *, sha256: bytes, salt: bytes | None, crc: int | None = None
) -> bytes:
    """A live needle of a volume salted with ``salt`` (None: an unsalted volume): header,
    key, payload, zero padding to :data:`ALIGN` bytes."""
    if crc is None:
        crc = zlib.crc32(payload)
    return _encode(key, LIVE, payload, crc, sha256, salt)


def encode_tombstone(key: str, *, salt: bytes | None) -> bytes:
    """A tombstone: the part ``key`` of the same volume (salted with ``salt``) is deleted."""
    return _encode(key, TOMBSTONE, b"", 0, bytes(32), salt)


def _encode(
    key: str, flags: int, payload: bytes, crc: int, sha256: bytes, salt: bytes | None
) -> bytes:
    raw_key = key.encode()
    if not 0 < len(raw_key) <= MAX_KEY:
        raise ValueError("a needle's key must be 1 to 1024 bytes")
    version = VERSION if salt is None else SALTED
    fields = _FIELDS.pack(MAGIC, version, flags, len(raw_key), len(payload), crc, sha256)
    check = _header_check(fields, raw_key, salt)
    size = needle_size(len(raw_key), len(payload))
    pad = size - HEADER_SIZE - len(raw_key) - len(payload)
    return b"".join((fields, check.to_bytes(4, "big"), raw_key, payload, bytes(pad)))


def _header_check(fields: bytes, raw_key: bytes, salt: bytes | None) -> int:
    """What a header's last 4 bytes hold: the CRC-32 of the fields and the key, or, in a
    salted volume, a MAC of them keyed by its salt (BLAKE2b, 4 bytes). A client chooses the
    bytes of its payloads and can compute a CRC, so a payload can hold what looks like an
    intact unsalted needle; without the volume's salt each header it forges passes by
    chance once in 2^32 (a 64 KiB payload holds some 4,000: one in a million per damaged
    header in front of one)."""
    if salt is None:
        return zlib.crc32(raw_key, zlib.crc32(fields))
    mac = _keyed(salt).copy()  # a copy of a keyed hasher costs half a new one
    mac.update(fields)
    mac.update(raw_key)
    return int.from_bytes(mac.digest(), "big")


@functools.lru_cache(maxsize=64)
def _keyed(salt: bytes) -> hashlib.blake2b:
    return hashlib.blake2b(key=salt, digest_size=4)


def decode_header(data: bytes, offset: int, salt: bytes | None) -> Needle | None:
    """The needle whose header and key start ``data`` (read at ``offset``) in a volume
    salted with ``salt`` (None: unsalted), or None if these bytes are not an intact needle
    header of that volume (wrong magic, version or check)."""
    if len(data) < HEADER_SIZE:
        return None
    magic, version, flags, key_len, length, crc, sha = _FIELDS.unpack_from(data)
    wanted = VERSION if salt is None else SALTED
    if magic != MAGIC or version != wanted or flags not in (LIVE, TOMBSTONE):
        return None
    if not 0 < key_len <= MAX_KEY or len(data) < HEADER_SIZE + key_len:
        return None
    raw_key = data[HEADER_SIZE : HEADER_SIZE + key_len]
    stored = int.from_bytes(data[_FIELDS.size : HEADER_SIZE], "big")
    if _header_check(data[: _FIELDS.size], raw_key, salt) != stored:
        return None
    try:
        key = raw_key.decode()
    except UnicodeDecodeError:
        return None
    return Needle(
        key=key,
        offset=offset,
        flags=flags,
        length=length,
        crc=crc,
        sha256=sha,
        data_offset=offset + HEADER_SIZE + key_len,
        size=needle_size(key_len, length),
    )


def holds_whole_needles(read: Callable[[int, int], bytes], size: int) -> bool:
    """Whether a volume of ``size`` bytes holds a whole needle of either format anywhere,
    its header's check aside: at an aligned magic, a known version and flags, a key, all its
    bytes there and its payload matching its CRC. Asked of a volume where no needle checks
    out under its salt: with whole needles in it, it was renamed, copied under another
    name, or damaged in every header, not torn, and its bytes are not to be cut."""
    pos = _next_magic(read, 0, size)
    while pos < size:
        head = read(pos, min(HEADER_SIZE + MAX_KEY, size - pos))
        if len(head) >= HEADER_SIZE:
            magic, version, flags, key_len, length, crc, _ = _FIELDS.unpack_from(head)
            if (
                magic == MAGIC
                and version in (VERSION, SALTED)
                and flags in (LIVE, TOMBSTONE)
                and 0 < key_len <= MAX_KEY
                and pos + needle_size(key_len, length) <= size
                and _crc_of(read, pos + HEADER_SIZE + key_len, length) == crc
            ):
                return True
        pos = _next_magic(read, pos + ALIGN, size)
    return False


def _crc_of(read: Callable[[int, int], bytes], offset: int, length: int) -> int:
    crc = 0
    for at in range(offset, offset + length, _RESYNC_READ):
        crc = zlib.crc32(read(at, min(_RESYNC_READ, offset + length - at)), crc)
    return crc


@attrs.frozen(kw_only=True)
class ScanResult:
    """What a volume holds, as :func:`scan` read it.

    Attributes:
        needles: Intact needle headers, in file order.
        end: Where the volume's good bytes end: the rest is a torn tail (never acknowledged)
            for the caller to truncate.
        skipped: Bytes between needles that were not a needle (a commit cancelled before
            its bytes were written, or a damaged header): garbage.
    """

    needles: list[Needle]
    end: int
    skipped: int


def scan(read: Callable[[int, int], bytes], size: int, salt: bytes | None) -> ScanResult:
    """Find the needles of a volume of ``size`` bytes salted with ``salt`` (None: an
    unsalted one), read with ``read(offset, n)``.

    A needle counts if its header is intact and it fits in the volume. Bytes that are not one
    are skipped, looking for the next needle at every :data:`ALIGN`-byte offset. The volume
    ends after the last needle found, and the last live needle must also match its payload
    CRC: an append in flight when the node stopped may have reached the disk only in part.
    """
    needles: list[Needle] = []
    pos = 0
    while pos + HEADER_SIZE <= size:
        head = read(pos, min(HEADER_SIZE + MAX_KEY, size - pos))
        needle = decode_header(head, pos, salt)
        if needle is not None and pos + needle.size <= size:
            needles.append(needle)
            pos += needle.size
            continue
        pos = _next_magic(read, pos + ALIGN, size)
    while needles:
        last = needles[-1]
        if last.flags != LIVE or zlib.crc32(read(last.data_offset, last.length)) == last.crc:
            break
        needles.pop()
    end = needles[-1].end if needles else 0
    return ScanResult(needles=needles, end=end, skipped=end - sum(n.size for n in needles))


def _next_magic(read: Callable[[int, int], bytes], pos: int, size: int) -> int:
    """The first aligned offset at or after ``pos`` where :data:`MAGIC` starts, or ``size``."""
    while pos + HEADER_SIZE <= size:
        block = read(pos, min(_RESYNC_READ, size - pos))
        at = block.find(MAGIC)
        while at != -1 and at % ALIGN:
            at = block.find(MAGIC, at + 1)
        if at != -1:
            return pos + at
        # A magic at an aligned offset of a block read from an aligned offset lies whole in
        # it, unless the block is the volume's short last piece.
        pos += max(ALIGN, len(block) - len(block) % ALIGN)
    return size
