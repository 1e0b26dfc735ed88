"""A read-only view of a storage node's part store from another process: :class:`PartStoreReader`.

Gateway workers read parts of the nodes their parent process runs straight from the node's
directory (:mod:`karma8.net.direct`): packed parts through :class:`PackedReader`, part files
through the file engine's own checked reader (:class:`PartRead`: every block against its CRC
before any byte of it is handed out). The node stays the only writer; nothing here writes,
creates or removes a file.
"""

from __future__ import annotations

from pathlib import Path

from karma8.store.diskio import BlockingIO
from karma8.store.files.context import FileStoreContext
from karma8.store.files.reader import PartRead
from karma8.store.files.tree import PartTree
from karma8.store.packed.reader import PackedReader
from karma8.store.quota import SpaceQuota


class PartStoreReader:
    """Reads the parts under a node's directory ``root`` without writing."""

    def __init__(self, root: Path) -> None:
        self.packed = PackedReader(root)
        self._files = FileStoreContext(tree=PartTree(root), quota=SpaceQuota(0), io=BlockingIO())

    def read_packed(self, key: str, checksum: str | None = None) -> bytes | None:
        """A packed part's whole payload, CRC-checked (and against ``checksum``, its sha256,
        if given); None if not packed here or damaged."""
        return self.packed.read(key, checksum)

    def open_file(self, key: str, *, offset: int, length: int) -> PartRead:
        """Bytes ``[offset, offset + length)`` of a part file, as ``FilePartStore.open`` reads
        them (NotFound or IntegrityError on entry; IntegrityError from a damaged block)."""
        return PartRead(self._files, key, offset, length)

    def close(self) -> None:
        self.packed.close()
