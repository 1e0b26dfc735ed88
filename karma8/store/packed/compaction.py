"""A packed store's compaction: sealed volumes rewritten with their live needles only.

The theory of operation is in :mod:`karma8.store.packed` ("Compaction"). :class:`Compactions`
is the part of a :class:`~karma8.store.packed.store.PackedStore` that decides when a volume
is compacted, runs it (in the background as garbage passes the ratio, or at once on
:meth:`Compactions.run_due`) and switches the volume to its new generation. It shares the
store's volumes and index: it replaces a volume's :class:`VolumeFile` (or drops it, left
empty) in the store's own mapping, and moves the index entries with it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import trio

from karma8.store.diskio import close_quietly
from karma8.store.packed import volumes as volume_files
from karma8.store.packed.format import needle_size
from karma8.store.packed.index import PackedIndex
from karma8.store.packed.volumes import VolumeFile, volume_name

log = logging.getLogger("karma8.store.packed")


class Compactions:
    """Which volumes are being compacted, and the compacting itself.

    Attributes:
        done: How many volumes it has rewritten since the store opened.
    """

    def __init__(
        self,
        *,
        directory: Path,
        files: dict[int, VolumeFile],
        index: PackedIndex,
        ratio: float,
        sealed: Callable[[int], bool],
    ) -> None:
        """``files`` is the store's mapping of volumes (updated in place); ``sealed`` says
        whether a volume is the store's alone and written to no more (not the active one,
        not lent): the only ones compacted."""
        self._directory = directory
        self._files = files
        self._index = index
        self.ratio = ratio
        self._sealed = sealed
        self._running: set[int] = set()
        self._idle: trio.Event | None = None
        self.done = 0

    @property
    def running(self) -> frozenset[int]:
        """The volumes being compacted now."""
        return frozenset(self._running)

    def garbage_ratio(self, volume: int) -> float:
        """The share of a volume's bytes that no live part uses."""
        end = self._files[volume].end
        return 1 - self._index.live_bytes(volume) / end if end else 0.0

    def _due(self, volume: int) -> bool:
        return (
            volume not in self._running
            and volume in self._files
            and self._sealed(volume)
            and self.garbage_ratio(volume) >= self.ratio
        )

    def maybe_start(self, volume: int) -> None:
        """Start compacting ``volume`` in the background if its garbage passes the ratio (a
        system task: the store owns no nursery, as the group sync's early rounds)."""
        if self._due(volume):
            self._running.add(volume)
            try:
                trio.lowlevel.spawn_system_task(
                    self._in_background, volume, name=f"compact volume {volume}"
                )
            except RuntimeError:  # the run is shutting down
                self._running.discard(volume)

    async def _in_background(self, volume: int) -> None:
        try:
            await self._compact(volume)
        except Exception:  # nothing may escape a system task; the volume stays as it was
            log.exception("compacting volume %d failed", volume)

    async def run_due(self) -> int:
        """Compact every volume whose garbage passes the ratio, now, and wait for those
        running in the background; how many this call compacted."""
        ran = 0
        for volume in sorted(self._files):
            if self._due(volume):
                self._running.add(volume)
                await self._compact(volume)
                ran += 1
        while self._running:
            self._idle = self._idle or trio.Event()
            await self._idle.wait()
        return ran

    async def _compact(self, volume: int) -> None:
        """Rewrite a sealed volume with its live needles only, as its next generation.

        Appends never go to a sealed volume except tombstones, so writes carry on in the
        active one. Readers keep reading the old generation until the switch, which is
        atomic on the event loop; one that started before it holds the old descriptor open.
        Parts deleted while the copy ran get their tombstones again in the new file.
        """
        old = self._files[volume]
        generation = old.generation + 1
        final = self._directory / volume_name(volume, generation, old.salt)
        tmp = final.with_name(final.name + ".tmp")
        old.pin()
        try:
            await old.wait_idle()  # a commit that took its offset before the volume sealed
            snapshot = self._index.refs_in(volume)
            offsets, end = await trio.to_thread.run_sync(
                lambda: volume_files.copy_needles(old.fd, snapshot, tmp)
            )
            old.closing = trio.Event()
            await old.wait_idle()
            dead = [ref for ref in snapshot if not self._index.is_current(ref)]
            fd = await trio.to_thread.run_sync(
                lambda: volume_files.finish_generation(
                    tmp, final, end, [r.key for r in dead], old.salt
                )
            )
            # The switch: no checkpoint until the index names only the new file.
            for ref, offset in zip(snapshot, offsets, strict=True):
                self._index.move(ref, ref.moved(generation, offset))
            end += sum(needle_size(len(r.key.encode()), 0) for r in dead)  # their tombstones
            self._files[volume] = VolumeFile(volume, generation, old.salt, final, fd, end)
            old.retired = True
            self.done += 1
            gone = [old.path]
            if end == 0:  # nothing left: the volume goes, and its inode with it
                del self._files[volume]
                close_quietly(fd)
                gone.append(final)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(lambda: volume_files.unlink_all(gone))
        finally:
            closing, old.closing = old.closing, None
            if closing is not None:
                closing.set()
            old.unpin()
            self._running.discard(volume)
            if not self._running and self._idle is not None:
                self._idle.set()
                self._idle = None
            if not old.retired:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(lambda: tmp.unlink(missing_ok=True))
