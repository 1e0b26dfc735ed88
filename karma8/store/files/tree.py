"""Where the file engine keeps its parts: a directory tree with a fixed fan-out.

``root/parts/aa/bb/KEY`` holds a committed part, ``aa`` and ``bb`` being the first four hex
digits of blake2b(key): 65,536 leaf directories, so a leaf stays small however many parts a
node holds. ``root/tmp/`` holds writes in progress. :class:`PartTree` names these paths,
creates leaf directories, opens parts and walks the tree; every method but the path names
blocks (run it in a thread, or inline where :class:`~karma8.store.diskio.BlockingIO` allows).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from contextlib import suppress
from pathlib import Path

from karma8.core.errors import InvalidRequest, NotFound
from karma8.store.diskio import DIR_MODE, O_CLOEXEC, pread_exact, private_dir
from karma8.store.files.format import HEADER_SIZE, PartHeader, payload_bytes

# Defence in depth: the storage actor validates keys; this only guarantees a key is one plain
# file name (no separators, no leading dot, no "~" used by temporary names).
SAFE_KEY = re.compile(r"[0-9A-Za-z_-][0-9A-Za-z_.-]{0,127}")


def check_key(key: str) -> str:
    """The key, if it is a plain file name a part may have.

    Raises:
        InvalidRequest: It is not.
    """
    if not SAFE_KEY.fullmatch(key):
        raise InvalidRequest(f"invalid part key {key!r}")
    return key


def _fan_out(key: str) -> str:
    """Four hex digits naming a key's leaf directory (``parts/aa/bb``)."""
    return hashlib.blake2b(key.encode("ascii"), digest_size=2).hexdigest()


class PartTree:
    """The paths of one store's parts (see the module docstring).

    Attributes:
        root: The store's directory.
        parts: ``root/parts``, the committed parts.
        tmp: ``root/tmp``, the writes in progress.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.parts = root / "parts"
        self.tmp = root / "tmp"
        self._parts_str = os.fspath(self.parts)
        # Directories known to exist durably (parts/aa, parts/aa/bb): no stat before a link.
        self._known_dirs: set[Path] = set()

    def make(self) -> None:
        """Create the root, ``parts/`` and ``tmp/`` if missing, owner-only (narrowed if
        they exist: the parts' own directories below are created so)."""
        for directory in (self.root, self.parts, self.tmp):
            private_dir(directory)

    # -- names ------------------------------------------------------------------------------

    def leaf(self, key: str) -> tuple[Path, Path]:
        """The two fan-out directories of a key: ``parts/aa`` and ``parts/aa/bb``."""
        digest = _fan_out(key)
        first = self.parts / digest[:2]
        return first, first / digest[2:]

    def part_file(self, key: str) -> str:
        """Where a committed part lives, as a string built without pathlib (cheaper, and
        every read opens one)."""
        digest = _fan_out(key)
        return f"{self._parts_str}/{digest[:2]}/{digest[2:]}/{key}"

    def part_path(self, key: str) -> Path:
        """Where a committed part with this key lives (whether or not it exists)."""
        return self.leaf(check_key(key))[1] / key

    def temporary(self, key: str) -> Path:
        """A fresh name in ``tmp/`` for a write of this key."""
        return self.tmp / f"{key}~{secrets.token_hex(8)}.tmp"

    # -- leaf directories -------------------------------------------------------------------

    def make_dirs(self, dirs: tuple[Path, Path]) -> list[Path]:
        """Create the fan-out directories of :meth:`leaf` unless known to exist.

        Returns:
            The directories found missing, whose parents the caller must sync to make them
            durable. That includes one another thread created first: it may not have synced
            its parent yet, and this caller's part must not depend on its progress.
        """
        new_dirs: list[Path] = []
        for directory in dirs:
            if directory not in self._known_dirs and not directory.is_dir():
                new_dirs.append(directory)
                with suppress(FileExistsError):
                    directory.mkdir(mode=DIR_MODE)
        return new_dirs

    def remember_dirs(self, dirs: tuple[Path, Path]) -> None:
        """Record fan-out directories as existing and durable (a part was linked into them)."""
        self._known_dirs.update(dirs)

    # -- reading ----------------------------------------------------------------------------

    def open_part(self, key: str) -> tuple[int, PartHeader, int]:
        """Open a committed part for reading: its fd, header and file size.

        Raises:
            NotFound: No such part.
            IntegrityError: Its header is damaged (the fd is closed then).
        """
        try:
            fd = os.open(self.part_file(key), os.O_RDONLY | O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"part {key} is not on this node") from None
        try:
            header = PartHeader.decode(pread_exact(fd, HEADER_SIZE, 0), key)
            size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        return fd, header, size

    # -- walking ----------------------------------------------------------------------------

    def clean_temporaries(self) -> int:
        """Delete every file in ``tmp/`` (writes that never committed); how many."""
        removed = 0
        with os.scandir(self.tmp) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
                    removed += 1
        return removed

    def _leaf_dirs(self) -> list[str]:
        leaves: list[str] = []
        with os.scandir(self.parts) as top:
            for first in top:
                if not first.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(first.path) as second:
                    leaves.extend(e.path for e in second if e.is_dir(follow_symlinks=False))
        return leaves

    def payload_total(self) -> int:
        """Payload bytes of every committed part, from file sizes (one stat per part)."""
        used = 0
        for leaf in self._leaf_dirs():
            with os.scandir(leaf) as entries:
                for entry in entries:
                    if entry.is_file(follow_symlinks=False) and SAFE_KEY.fullmatch(entry.name):
                        used += payload_bytes(entry.stat(follow_symlinks=False).st_size)
        return used

    def keys(self) -> list[str]:
        """The keys of all committed parts, sorted."""
        found: list[str] = []
        for leaf in self._leaf_dirs():
            with os.scandir(leaf) as entries:
                found.extend(
                    e.name
                    for e in entries
                    if SAFE_KEY.fullmatch(e.name) and e.is_file(follow_symlinks=False)
                )
        found.sort()
        return found
