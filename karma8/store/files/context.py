"""What a file store shares with its writers and readers: :class:`FileStoreContext`.

:class:`~karma8.store.files.store.FilePartStore` builds one context when it opens and hands it
to every :class:`~karma8.store.files.writer.FilePartWriter` and
:class:`~karma8.store.files.reader.PartRead` it creates. They reach the store only through it:
its settings, the paths (:class:`PartTree`), the space counters (:class:`SpaceQuota`), where
blocking calls run (:class:`BlockingIO`) and the syncer commits wait for.
"""

from __future__ import annotations

import attrs

from karma8.store.diskio import BlockingIO
from karma8.store.files.tree import PartTree
from karma8.store.groupsync import GroupSync
from karma8.store.quota import SpaceQuota

DEFAULT_WRITE_BUFFER = 1 << 20
DEFAULT_READ_CHUNK = 4 << 20


@attrs.frozen(kw_only=True)
class FileStoreContext:
    """One file store's settings and shared state.

    Attributes:
        tree: Where parts and temporaries live.
        quota: Committed and in-flight payload bytes against the capacity.
        io: Where blocking calls run (inline below ``io.inline_io`` bytes).
        read_chunk: Largest chunk a reader yields, and what one of its thread hops reads.
        write_buffer: Bytes a writer buffers before handing them to a thread.
        group_sync: The syncer that makes commits durable in shared rounds, or None: then
            each commit fsyncs its file and directories itself.
    """

    tree: PartTree
    quota: SpaceQuota
    io: BlockingIO
    read_chunk: int = DEFAULT_READ_CHUNK
    write_buffer: int = DEFAULT_WRITE_BUFFER
    group_sync: GroupSync | None = None
