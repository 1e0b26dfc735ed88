"""A packed store's volume files: their names, an open generation's descriptor and counts
(:class:`VolumeFile`), opening them all as a node starts (recovery: :func:`open_volumes`),
reads in windows for scans (:class:`WindowReader`), and the file work of a compaction
(copying live needles to the next generation, putting it in place), which runs in worker
threads. The theory of operation is in :mod:`karma8.store.packed`.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import attrs
import trio

from karma8.store.diskio import (
    DIR_MODE,
    FILE_MODE,
    O_CLOEXEC,
    close_quietly,
    fsync_dir,
    pread_exact,
    pwrite_all,
)
from karma8.store.packed.format import encode_tombstone, holds_whole_needles, scan
from karma8.store.packed.index import NeedleRef, PackedIndex

log = logging.getLogger("karma8.store.packed")

# <id>.<generation>.<salt, hex>.vol; a volume written before salts has none in its name.
VOLUME_NAME = re.compile(r"^(\d{8})\.(\d+)(?:\.([0-9a-f]{16}))?\.vol$")
WINDOW = 1 << 20  # bytes a scan reads at once, and a compaction copies
REFUSED = "refused"  # under volumes/: volumes set aside on open, nothing cut (set_aside)


def volume_name(volume: int, generation: int, salt: bytes | None) -> str:
    """A volume generation's file name. The salt is kept in the name, not in the file, so
    that no damaged sector of the file can lose it (every generation of a volume has its
    first one's salt: compaction copies needles as they are)."""
    middle = "" if salt is None else f".{salt.hex()}"
    return f"{volume:08d}.{generation}{middle}.vol"


def parse_volume_name(name: str) -> tuple[int, int, bytes | None] | None:
    """``(volume, generation, salt)`` of a volume file's name; None if it is not one."""
    match = VOLUME_NAME.match(name)
    if match is None:
        return None
    salt = None if match[3] is None else bytes.fromhex(match[3])
    return int(match[1]), int(match[2]), salt


def volume_of(name: str) -> int:
    """The volume id of a volume file's name (one :func:`parse_volume_name` accepts)."""
    parsed = parse_volume_name(name)
    assert parsed is not None, name
    return parsed[0]


@attrs.frozen(kw_only=True)
class VolumePlan:
    """What a directory's volume files are, as :func:`plan_volumes` read their names.

    Attributes:
        current: Each volume's generation to open, and its salt, by volume id.
        superseded: Older generations of a volume, for the store to delete (a compaction
            renamed its output into place but did not unlink the source).
        renumber: ``(name, new id)``: a volume whose id another volume of another salt has
            too (never so from the store's own work: a compaction keeps its volume's salt;
            but a version from before salts run again on the directory creates ids it
            cannot see are taken). Both hold parts; this one moves to a free id.
        unknown: Names ending in ``.vol`` that are not a volume's (left alone).
    """

    current: dict[int, tuple[int, bytes | None]]
    superseded: list[str]
    renumber: list[tuple[str, int]]
    unknown: list[str]


def plan_volumes(names: list[str]) -> VolumePlan:
    """Sort a ``volumes/`` directory's names: which generation of each volume to open,
    which to delete, which volumes to give a free id. Pure: the store does the file work."""
    by_id: dict[int, dict[bytes | None, dict[int, str]]] = {}
    unknown = []
    for name in names:
        parsed = parse_volume_name(name)
        if parsed is None:
            if name.endswith(".vol"):
                unknown.append(name)
            continue
        volume, generation, salt = parsed
        by_id.setdefault(volume, {}).setdefault(salt, {})[generation] = name
    current: dict[int, tuple[int, bytes | None]] = {}
    superseded: list[str] = []
    renumber: list[tuple[str, int]] = []
    free = max(by_id, default=0) + 1
    for volume in sorted(by_id):
        # One salt keeps the id (a salted one before none, then in byte order); any other
        # is another volume, given the next free id.
        salts = sorted(by_id[volume], key=lambda salt: (salt is None, salt or b""))
        for rank, salt in enumerate(salts):
            generations = by_id[volume][salt]
            newest = max(generations)
            superseded += [generations[g] for g in sorted(generations) if g < newest]
            if rank == 0:
                current[volume] = newest, salt
            else:
                renumber.append((generations[newest], free))
                current[free] = newest, salt
                free += 1
    return VolumePlan(
        current=current, superseded=sorted(superseded), renumber=renumber, unknown=sorted(unknown)
    )


class VolumeFile:
    """One generation of a volume, open for appends and reads. Event-loop state only.

    Attributes:
        salt: What its needles' headers are checked with (None: written before salts).
        end: Where the next append goes (bytes reserved so far).
        pins: Reads and appends using ``fd`` now; a retired file is closed when they end.
        appends: Appends in flight (compaction waits for none).
        closing: Set while compaction finishes the volume: new appends wait for it.
    """

    def __init__(
        self, volume: int, generation: int, salt: bytes | None, path: Path, fd: int, end: int
    ) -> None:
        self.volume = volume
        self.generation = generation
        self.salt = salt
        self.path = path
        self.fd = fd
        self.end = end
        self.pins = 0
        self.appends = 0
        self.retired = False
        self.closing: trio.Event | None = None
        self._idle: trio.Event | None = None

    def pin(self) -> None:
        self.pins += 1

    def unpin(self) -> None:
        self.pins -= 1
        if self.retired and self.pins == 0:
            close_quietly(self.fd)

    def append_done(self) -> None:
        self.appends -= 1
        if self.appends == 0 and self._idle is not None:
            self._idle.set()
            self._idle = None

    async def wait_idle(self) -> None:
        """Until no append to this file is in flight."""
        while self.appends:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()


def open_volumes(directory: Path, index: PackedIndex) -> tuple[dict[int, VolumeFile], int]:
    """Open every volume's newest generation under ``directory`` and load its needles into
    ``index`` (blocking): the volumes by id, and the torn bytes truncated.

    Leftovers of an interrupted compaction (``.tmp``) and superseded generations are
    deleted; volumes of two salts sharing an id are renumbered. A volume in which no needle
    checks out under the salt its name gives, though whole needles are in it, is set aside
    (:func:`set_aside`), not cut to nothing.
    """
    names = os.listdir(directory)
    for name in names:
        if name.endswith(".tmp"):
            (directory / name).unlink(missing_ok=True)
    plan = plan_volumes(names)
    for name in plan.unknown:
        log.warning("%s: not a volume's name; left alone", directory / name)
    for name in plan.superseded:
        (directory / name).unlink()
    for name, volume in plan.renumber:
        generation, salt = plan.current[volume]
        target = directory / volume_name(volume, generation, salt)
        log.warning(
            "%s: another volume has its id (an earlier karma8 ran on this directory); renamed %s",
            directory / name,
            target.name,
        )
        os.rename(directory / name, target)
    if plan.renumber:
        fsync_dir(directory)
    files: dict[int, VolumeFile] = {}
    truncated = 0
    for volume in sorted(plan.current):
        generation, salt = plan.current[volume]
        path = directory / volume_name(volume, generation, salt)
        fd = os.open(path, os.O_RDWR | O_CLOEXEC)
        size = os.fstat(fd).st_size
        reader = WindowReader(fd)
        found = scan(reader.read, size, salt)
        if found.end == 0 < size and holds_whole_needles(reader.read, size):
            os.close(fd)
            set_aside(path)
            continue
        if found.end < size:
            log.warning(
                "%s: %d bytes after the last intact needle cut off (never acknowledged)",
                path,
                size - found.end,
            )
            os.ftruncate(fd, found.end)
            os.fsync(fd)
            truncated += size - found.end
        index.load(volume, generation, found.needles)
        files[volume] = VolumeFile(volume, generation, salt, path, fd, found.end)
    return files, truncated


def set_aside(path: Path) -> None:
    """Move a volume none of whose needles checks out under its salt, though whole ones are
    in it, to ``volumes/refused/``: not cut as a torn tail, and out of the way."""
    aside = path.parent / REFUSED
    aside.mkdir(mode=DIR_MODE, exist_ok=True)
    os.rename(path, aside / path.name)
    fsync_dir(aside)
    fsync_dir(path.parent)
    log.error(
        "%s: no needle checks out under the salt its name gives, yet whole needles are"
        " in it (renamed, copied under another name, or every header damaged): moved to"
        " %s, nothing cut; its parts are missing here until it is back under its own name",
        path,
        aside / path.name,
    )


def unlink_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


class WindowReader:
    """Reads of a volume served from 1 MiB windows: a scan reads each needle's header, and
    one ``pread`` per window instead of per needle. Nothing at or past ``end`` (if given) is
    read ahead."""

    def __init__(self, fd: int, end: int | None = None) -> None:
        self._fd = fd
        self._end = end
        self._start = 0
        self._window = b""

    def read(self, at: int, n: int) -> bytes:
        end = at + n
        if at < self._start or end > self._start + len(self._window):
            if n > WINDOW:
                return pread_exact(self._fd, n, at)
            ahead = WINDOW if self._end is None else max(n, min(WINDOW, self._end - at))
            self._start = at
            self._window = pread_exact(self._fd, ahead, at)
        return self._window[at - self._start : end - self._start]


def copy_needles(src: int, refs: list[NeedleRef], tmp: Path) -> tuple[list[int], int]:
    """Copy needles to a new file, back to back (in a worker thread); their new offsets."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_CLOEXEC, FILE_MODE)
    offsets: list[int] = []
    pos = 0
    pending: list[bytes] = []
    pending_size = 0
    try:
        for ref in refs:
            data = pread_exact(src, ref.size, ref.offset)
            if len(data) != ref.size:
                raise OSError(5, "a volume is shorter than its index")
            offsets.append(pos + pending_size)
            pending.append(data)
            pending_size += len(data)
            if pending_size >= WINDOW:
                pwrite_all(fd, b"".join(pending), pos)
                pos += pending_size
                pending, pending_size = [], 0
        if pending:
            pwrite_all(fd, b"".join(pending), pos)
            pos += pending_size
    finally:
        os.close(fd)
    return offsets, pos


def finish_generation(tmp: Path, final: Path, end: int, dead: list[str], salt: bytes | None) -> int:
    """Append tombstones for ``dead``, make the new generation durable and put it in place
    (in a worker thread); its descriptor."""
    fd = os.open(tmp, os.O_RDWR | O_CLOEXEC)
    try:
        if dead:
            tombstones = (encode_tombstone(key, salt=salt) for key in dead)
            pwrite_all(fd, b"".join(tombstones), end)
        os.fsync(fd)
        os.rename(tmp, final)
        fsync_dir(final.parent)  # before the old generation is unlinked
    except BaseException:
        os.close(fd)
        raise
    return fd
