"""A read-only view of another process's packed volumes: :class:`PackedReader`.

A gateway worker (:mod:`karma8.net.direct`) reads small parts straight from the volumes of
the storage nodes its parent process runs, instead of asking them over HTTP. The node stays
the only writer; the reader never writes, locks or truncates. It keeps its own index, built
by scanning the volumes as the node does on open, and catches up when asked for a key it
does not know (and at least once every :data:`REFRESH_EVERY` seconds, so that it lets go of
volume generations compaction retired): it scans each volume from where it stopped, again
over the gaps it skipped (an append whose bytes were not there yet), and from the start a
volume whose generation changed. The generation it replaces is dropped at once, not by a
pass over the index: each entry names the generation it was found in by a serial of the
reader's own, and an entry of a dropped one is stale, passed over until the key's needle in
the next generation replaces it (see :data:`STALE_SHARE`). What it may see that the node has
not finished is harmless: a needle whose payload is still being written fails its CRC, and a
torn tail is not indexed until it is whole. The first needle indexed for a key stays, so
bytes inside a payload that merely look like a needle cannot replace a part. (A key written
again after an append that failed or was cancelled once its bytes landed, which the node
indexes by its later needle, is read here from the earlier one: the same part's bytes, a
key naming one part, or bytes that fail the CRC.) A whole-part read is also checked against
the part's sha256 from the metadata. A read that finds nothing, or bytes that fail a check,
returns None and the caller asks the node. A committed part's needle is durable before its
version commits, so a version a worker resolved has needles the reader finds.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import secrets
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from karma8.store.diskio import O_CLOEXEC, close_quietly, pread_exact
from karma8.store.packed.format import LIVE, Needle, scan
from karma8.store.packed.volumes import WindowReader, plan_volumes, volume_name, volume_of

_VOLUMES = "volumes"
REFRESH_EVERY = 1.0  # seconds: the longest a retired volume generation stays open here
MISS_REFRESH_EVERY = 0.005  # seconds: misses closer together than this ask the node at once
# Bytes of new needles a refresh indexes at most (~300 small parts, a millisecond or two): a
# reader far behind (a burst of writes while it read nothing) catches up over several
# refreshes instead of stopping its event loop for all of them at once.
REFRESH_BUDGET = 256 << 10

# An indexed part, packed (one bytes object: a reader holds one per part of every node): the
# serial of the volume generation it was found in, payload offset, payload length, CRC-32,
# sha256 (raw).
_FOUND = struct.Struct("<IQQI32s")
# A generation dropped leaves its entries behind, stale (their serial names no open
# generation): each is ignored, then replaced by the key's needle in the next generation or
# removed when next read. Once caught up, stale entries past this share of the index are
# swept in one pass (what a generation's rescan did not replace: deletes this reader had not
# seen yet, so few).
STALE_SHARE = 0.25


class _Volume:
    """One volume generation as far as the reader has scanned it."""

    def __init__(self, serial: int, generation: int, salt: bytes | None, fd: int) -> None:
        self.serial = serial  # this reader's number for this generation, never reused
        self.generation = generation
        self.salt = salt
        self.fd = fd
        self.scanned = 0  # scanned up to here (the rest is new, or a tail still being written)
        self.gaps: list[tuple[int, int]] = []  # skipped spans before ``scanned``, to rescan
        self.entries = 0  # index entries naming this generation


class PackedReader:
    """Reads parts from the volumes under ``root`` (a node's directory) without writing."""

    def __init__(self, root: Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = Path(root) / _VOLUMES
        self._clock = clock
        self._volumes: dict[int, _Volume] = {}  # by volume id: the generation open here
        self._open: dict[int, _Volume] = {}  # the same, by serial
        self._serials = itertools.count(1)
        self._index: dict[str, bytes] = {}
        self._stale = 0  # entries whose generation was dropped
        self.refreshes = 0
        self._refreshed = -REFRESH_EVERY
        self.behind = False  # the last refresh left new needles for the next one
        self.refresh(budget=None)

    def close(self) -> None:
        for volume in self._volumes.values():
            close_quietly(volume.fd)
        self._volumes.clear()
        self._open.clear()
        self._index.clear()
        self._stale = 0

    def read(self, key: str, checksum: str | None = None) -> bytes | None:
        """Part ``key``'s payload if it is here and matches its CRC (and ``checksum``, its
        sha256 in hex, if given); else None (the caller asks the node, which knows best).
        Blocking: one ``pread`` (and a refresh on a miss, or once a second)."""
        now = self._clock()
        found = self._index.get(key)
        if self.behind or now - self._refreshed >= (REFRESH_EVERY if found else MISS_REFRESH_EVERY):
            self.refresh()
            found = self._index.get(key)
        if found is None:
            return None
        serial, offset, length, crc, sha256 = _FOUND.unpack(found)
        volume = self._open.get(serial)
        if volume is None:  # stale: its generation was dropped, the key not found again yet
            del self._index[key]
            self._stale -= 1
            return None
        try:
            data = pread_exact(volume.fd, length, offset)
        except OSError:
            return None
        if len(data) != length or zlib.crc32(data) != crc:
            return None
        if checksum is not None and not (
            secrets.compare_digest(sha256.hex(), checksum)
            and secrets.compare_digest(hashlib.sha256(data).hexdigest(), checksum)
        ):
            return None
        return data

    def refresh(self, budget: int | None = REFRESH_BUDGET) -> bool:
        """Index what was appended, deleted or compacted since the last refresh, at most
        ``budget`` bytes of new needles (None: all); True if nothing is left for the next
        one (:attr:`behind` says the same)."""
        self.refreshes += 1
        self._refreshed = self._clock()
        self.behind = False
        try:
            names = os.listdir(self.directory)
        except OSError:
            return True
        left = budget
        plan = plan_volumes(names)
        # An id of volumes of two salts is the node's to renumber as it opens: none is read.
        skipped = {new for _, new in plan.renumber}
        skipped.update(volume_of(name) for name, _ in plan.renumber)
        newest = {v: current for v, current in plan.current.items() if v not in skipped}
        for volume_id in list(self._volumes):
            if volume_id not in newest:  # compaction left it with no live needle
                self._drop(volume_id)
        for volume_id, (generation, salt) in sorted(newest.items()):
            current = self._volumes.get(volume_id)
            if current is not None and (current.generation, current.salt) != (generation, salt):
                self._drop(volume_id)
                current = None
            if current is None:
                try:
                    fd = os.open(
                        self.directory / volume_name(volume_id, generation, salt),
                        os.O_RDONLY | O_CLOEXEC,
                    )
                except OSError:  # renamed or removed meanwhile: the next refresh sees it
                    continue
                current = _Volume(next(self._serials), generation, salt, fd)
                self._volumes[volume_id] = self._open[current.serial] = current
            left = self._catch_up(current, left, budget)
        if not self.behind and self._stale > STALE_SHARE * len(self._index):
            self._sweep()
        return not self.behind

    def _catch_up(self, volume: _Volume, budget: int | None, whole: int | None) -> int | None:
        """Scan what is new in a volume, within ``budget`` bytes (of the refresh's ``whole``
        budget); the budget left."""
        try:
            size = os.fstat(volume.fd).st_size
        except OSError:
            return budget
        gaps, volume.gaps = volume.gaps, []
        for start, stop in gaps:
            inner, end = self._scan(volume, start, stop)
            volume.gaps += [*inner, (end, stop)] if end < stop else inner
        if size <= volume.scanned:
            return budget
        if budget is not None and budget <= 0:
            self.behind = True
            return budget
        stop = size if budget is None else min(size, volume.scanned + budget)
        inner, end = self._scan(volume, volume.scanned, stop)
        if end == volume.scanned and stop < size and budget == whole:
            # Not one whole needle within a refresh's budget: this one scans on to the end.
            stop = size
            inner, end = self._scan(volume, volume.scanned, stop)
        volume.gaps += inner
        spent = end - volume.scanned
        volume.scanned = end
        if stop < size:
            self.behind = True  # (what follows the last whole needle is scanned next time)
        return None if budget is None else budget - max(spent, 1)

    def _scan(self, volume: _Volume, start: int, stop: int) -> tuple[list[tuple[int, int]], int]:
        """Index the needles in ``[start, stop)``; returns the gaps before and between them,
        and where the last one ends (what follows is for the caller: a gap still, or a tail
        to scan again)."""

        window = WindowReader(volume.fd, end=stop)

        def read(offset: int, count: int) -> bytes:
            return window.read(start + offset, count)

        try:
            found = scan(read, stop - start, volume.salt)
        except OSError:
            return [(start, stop)], start
        gaps = []
        at = start
        for needle in found.needles:
            if start + needle.offset > at:
                gaps.append((at, start + needle.offset))
            self._apply(volume, needle, start)
            at = start + needle.end
        return gaps, at

    def _apply(self, volume: _Volume, needle: Needle, base: int) -> None:
        known = self._index.get(needle.key)
        serial = None if known is None else _serial_of(known)
        if needle.flags == LIVE:
            if serial in self._open:  # the first needle of a key stays
                return
            if serial is not None:  # stale: this is the key's needle in a newer generation
                self._stale -= 1
            self._index[needle.key] = _FOUND.pack(
                volume.serial,
                base + needle.data_offset,
                needle.length,
                needle.crc,
                needle.sha256,
            )
            volume.entries += 1
        elif serial == volume.serial:
            del self._index[needle.key]  # a tombstone: in the volume of what it deletes
            volume.entries -= 1

    def _drop(self, volume_id: int) -> None:
        """Forget a volume's generation at once: its entries go stale (see STALE_SHARE)."""
        volume = self._volumes.pop(volume_id)
        del self._open[volume.serial]
        self._stale += volume.entries
        close_quietly(volume.fd)

    def _sweep(self) -> None:
        """Remove every stale entry (one pass over the index)."""
        self._index = {k: f for k, f in self._index.items() if _serial_of(f) in self._open}
        self._stale = 0


def _serial_of(found: bytes) -> int:
    serial: int = _FOUND.unpack_from(found)[0]
    return serial
