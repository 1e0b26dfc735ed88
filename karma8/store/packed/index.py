"""The packed engine's index: where each live part's needle is, and what each volume holds.

Pure and in memory: rebuilt on open from the volumes' scans (:func:`format.scan`), then kept
up to date by the store on the event loop (no locking). Compaction moves a part's needle
within its volume id (a new generation of the volume file), so a reference names both.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import attrs

from karma8.store.packed.format import HEADER_SIZE, LIVE, Needle, needle_size


@attrs.frozen(kw_only=True)
class NeedleRef:
    """A live part in a volume.

    Attributes:
        key: The part's key.
        volume: The volume's id.
        generation: The volume file's generation (compaction writes the next one).
        offset: Where the needle starts in that file.
        size: Bytes the needle takes (header, key, payload, padding).
        length: Payload bytes.
        data_offset: Where the payload starts.
        crc: CRC-32 of the payload.
        sha256: sha256 of the payload (raw).
    """

    key: str
    volume: int
    generation: int
    offset: int
    size: int
    length: int
    data_offset: int
    crc: int
    sha256: bytes

    @classmethod
    def of(cls, needle: Needle, volume: int, generation: int) -> NeedleRef:
        return cls(
            key=needle.key,
            volume=volume,
            generation=generation,
            offset=needle.offset,
            size=needle.size,
            length=needle.length,
            data_offset=needle.data_offset,
            crc=needle.crc,
            sha256=needle.sha256,
        )

    def moved(self, generation: int, offset: int) -> NeedleRef:
        """The same needle copied to ``offset`` of the volume's next generation."""
        return attrs.evolve(
            self,
            generation=generation,
            offset=offset,
            data_offset=offset + (self.data_offset - self.offset),
        )


class PackedIndex:
    """key -> :class:`NeedleRef`, and per volume the keys and needle bytes still live.

    An entry is kept packed (:data:`_REF`, one bytes object) rather than as a
    :class:`NeedleRef` and its int and bytes objects: a node holds one per part, and so does
    each gateway worker's reader, so this is most of their memory per small part (about 280
    resident bytes an entry with its key and the dict and set slots, against 490).
    :meth:`get` and :meth:`refs_in` build the references, which compare by value.
    """

    def __init__(self) -> None:
        self._refs: dict[str, bytes] = {}
        self._keys: dict[int, set[str]] = {}
        self._live: dict[int, int] = {}
        self.payload_bytes = 0  # live payload bytes, all volumes

    def __len__(self) -> int:
        return len(self._refs)

    def __contains__(self, key: str) -> bool:
        return key in self._refs

    def get(self, key: str) -> NeedleRef | None:
        packed = self._refs.get(key)
        return None if packed is None else _unpack(key, packed)

    def is_current(self, ref: NeedleRef) -> bool:
        """Whether ``ref`` is still its key's live needle (not deleted, nor moved since)."""
        return self._refs.get(ref.key) == _pack(ref)

    def keys(self) -> Iterable[str]:
        return self._refs.keys()

    def refs_in(self, volume: int) -> list[NeedleRef]:
        """The live needles of a volume, in file order."""
        refs = (_unpack(k, self._refs[k]) for k in self._keys.get(volume, ()))
        return sorted(refs, key=_by_offset)

    def live_bytes(self, volume: int) -> int:
        """Bytes of the volume's live needles (the rest of the file is garbage)."""
        return self._live.get(volume, 0)

    def load(self, volume: int, generation: int, needles: Iterable[Needle]) -> None:
        """Apply a volume's scan, in file order: a tombstone deletes the part before it in
        the same volume (deletes go to the volume of the needle they delete). Of two live
        needles of a key the later wins, as the running node indexed it: an append that
        failed after its bytes landed leaves a whole needle nothing indexed, and the key may
        be written again (a move retried onto this node), in this volume or a later one."""
        for needle in needles:
            current = self._refs.get(needle.key)
            if needle.flags == LIVE:
                if current is not None:
                    self.remove(needle.key)
                self.add(NeedleRef.of(needle, volume, generation))
            elif current is not None and _REF.unpack_from(current)[0] == volume:
                self.remove(needle.key)

    def add(self, ref: NeedleRef) -> None:
        assert ref.key not in self._refs
        self._refs[ref.key] = _entering(ref)
        self._keys.setdefault(ref.volume, set()).add(ref.key)
        self._live[ref.volume] = self._live.get(ref.volume, 0) + ref.size
        self.payload_bytes += ref.length

    def remove(self, key: str) -> NeedleRef | None:
        packed = self._refs.pop(key, None)
        if packed is None:
            return None
        ref = _unpack(key, packed)
        self._keys[ref.volume].discard(key)
        self._live[ref.volume] -= ref.size
        self.payload_bytes -= ref.length
        return ref

    def move(self, old: NeedleRef, new: NeedleRef) -> bool:
        """Point the part at its copy, if ``old`` is still its live needle (the part was
        not deleted meanwhile). Needle sizes do not change, so neither does accounting."""
        if not self.is_current(old):
            return False
        self._refs[old.key] = _entering(new)
        return True


# A packed entry: volume, generation, offset, payload length, CRC-32, sha256. The needle's
# size and its payload's offset follow from these and the key (as format.Needle's do).
_REF = struct.Struct("<IQQQI32s")


def _pack(ref: NeedleRef) -> bytes:
    return _REF.pack(ref.volume, ref.generation, ref.offset, ref.length, ref.crc, ref.sha256)


def _entering(ref: NeedleRef) -> bytes:
    """``ref`` packed as it enters the index: what the entry leaves out must follow from it."""
    key_len = len(ref.key.encode())
    assert len(ref.sha256) == 32
    assert ref.size == needle_size(key_len, ref.length)
    assert ref.data_offset == ref.offset + HEADER_SIZE + key_len
    return _pack(ref)


def _unpack(key: str, packed: bytes) -> NeedleRef:
    volume, generation, offset, length, crc, sha256 = _REF.unpack(packed)
    key_len = len(key.encode())
    return NeedleRef(
        key=key,
        volume=volume,
        generation=generation,
        offset=offset,
        size=needle_size(key_len, length),
        length=length,
        data_offset=offset + HEADER_SIZE + key_len,
        crc=crc,
        sha256=sha256,
    )


def _by_offset(ref: NeedleRef) -> int:
    return ref.offset
