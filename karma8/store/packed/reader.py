"""A read-only view of another process's packed volumes: :class:`PackedReader`.

A gateway worker (:mod:`karma8.net.direct`) reads small parts straight from the volumes of
the storage nodes its parent process runs, instead of asking them over HTTP. The node stays
the only writer; the reader never writes, locks or truncates. It keeps its own index, built
by scanning the volumes as the node does on open, and catches up when asked for a key it
does not know: it scans each volume from where it stopped, and rescans a volume whose
generation changed (compaction). What it may see that the node has not finished is harmless:
a needle whose payload is still being written fails its CRC, and a torn tail is not indexed
until it is whole; a read that finds nothing, or bytes that fail the CRC, returns None and the
caller asks the node. A committed part's needle is durable before its version commits, so a
version a worker resolved has needles the reader finds.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import attrs

from karma8.store.diskio import O_CLOEXEC, close_quietly, pread_exact
from karma8.store.packed.format import LIVE, scan
from karma8.store.packed.store import VOLUME_NAME, volume_name

_VOLUMES = "volumes"


@attrs.frozen
class _Found:
    volume: int
    data_offset: int
    length: int
    crc: int


class _Volume:
    """One volume generation as far as the reader has scanned it."""

    def __init__(self, generation: int, fd: int) -> None:
        self.generation = generation
        self.fd = fd
        self.scanned = 0  # the intact needles before this offset are indexed
        self.keys: set[str] = set()


class PackedReader:
    """Reads parts from the volumes under ``root`` (a node's directory) without writing."""

    def __init__(self, root: Path) -> None:
        self.directory = Path(root) / _VOLUMES
        self._volumes: dict[int, _Volume] = {}
        self._index: dict[str, _Found] = {}
        self.refreshes = 0
        self.refresh()

    def close(self) -> None:
        for volume in self._volumes.values():
            close_quietly(volume.fd)
        self._volumes.clear()
        self._index.clear()

    def read(self, key: str) -> bytes | None:
        """Part ``key``'s payload if it is here and matches its CRC; else None (the caller
        asks the node, which knows best). Blocking: one ``pread`` (a refresh on a miss)."""
        found = self._index.get(key)
        if found is None:
            self.refresh()
            found = self._index.get(key)
            if found is None:
                return None
        volume = self._volumes.get(found.volume)
        if volume is None:
            return None
        try:
            data = pread_exact(volume.fd, found.length, found.data_offset)
        except OSError:
            return None
        if len(data) != found.length or zlib.crc32(data) != found.crc:
            return None
        return data

    def refresh(self) -> None:
        """Index what was appended, deleted or compacted since the last refresh."""
        self.refreshes += 1
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        newest: dict[int, int] = {}
        for name in names:
            match = VOLUME_NAME.match(name)
            if match is not None:
                volume, generation = int(match[1]), int(match[2])
                newest[volume] = max(generation, newest.get(volume, generation))
        for volume_id in list(self._volumes):
            if volume_id not in newest:  # compaction left it with no live needle
                self._drop(volume_id)
        for volume_id, generation in sorted(newest.items()):
            current = self._volumes.get(volume_id)
            if current is not None and current.generation != generation:
                self._drop(volume_id)
                current = None
            if current is None:
                path = self.directory / volume_name(volume_id, generation)
                try:
                    fd = os.open(path, os.O_RDONLY | O_CLOEXEC)
                except OSError:  # renamed or removed meanwhile: the next refresh sees it
                    continue
                current = self._volumes[volume_id] = _Volume(generation, fd)
            self._scan(volume_id, current)

    def _scan(self, volume_id: int, volume: _Volume) -> None:
        try:
            size = os.fstat(volume.fd).st_size
        except OSError:
            return
        start = volume.scanned
        if size <= start:
            return
        found = scan(lambda offset, n: pread_exact(volume.fd, n, start + offset), size - start)
        for needle in found.needles:
            if needle.flags == LIVE:
                self._index[needle.key] = _Found(
                    volume_id, start + needle.data_offset, needle.length, needle.crc
                )
                volume.keys.add(needle.key)
            else:
                known = self._index.get(needle.key)
                if known is not None and known.volume == volume_id:
                    del self._index[needle.key]
                volume.keys.discard(needle.key)
        volume.scanned = start + found.end

    def _drop(self, volume_id: int) -> None:
        volume = self._volumes.pop(volume_id)
        for key in volume.keys:
            known = self._index.get(key)
            if known is not None and known.volume == volume_id:
                del self._index[key]
        close_quietly(volume.fd)
