"""Direct reads: a gateway worker reads files from its parent's disk, not over HTTP.

A gateway worker of the embedded cluster (``karma8 serve --workers N``, see
:mod:`karma8.net.workers`) runs on the same host as discovery and the storage nodes, which
live in its parent process. Asking them over HTTP costs each side about a millisecond of CPU
per hop, several times what the read itself costs (docs/benchmarks.md, "Gateway workers").
So a worker reads what it can the way its parent would, from the same files:

- the current version of a name from discovery's SQLite database, opened read-only (a WAL
  reader never blocks the writer), used only once discovery has synced what was read
  (:class:`~karma8.metadata.database.DurableMark`);
- a part's bytes from its node's directory (:class:`PartStoreReader`): a packed part
  checked against its needle's CRC, a part file block by block against its CRCs, as the
  node itself reads them.

Everything else goes to the parent as before (:class:`HttpDiscoveryClient`,
:class:`HttpStorageClient`): writes, deletes, listings, access checks, a name the database
does not have (for discovery's exact error), a part not found there or failing its check
when opened (the node then reads it, verifies it, and reports or quarantines it, and the
gateway's redundant read goes around it as for any failed part). A part file whose block
fails its check mid-stream fails the read as the node's own read would, and the node is
asked for the same bytes in the background, so that it finds the damage itself.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, suppress
from pathlib import Path
from types import TracebackType

import httpx
import trio

from karma8.core.errors import IntegrityError, Karma8Error, NotFound
from karma8.core.model import FileVersion, NodeRef, PartPlacement
from karma8.metadata.database import MARK_SUFFIX, DurableMark
from karma8.metadata.rows import committed_id, load_version
from karma8.net.clients import HttpDiscoveryClient
from karma8.net.locate import DATABASE_FILE, NODE_ID_FILE
from karma8.net.metrics import Sample, Source
from karma8.ports import StorageAPI, StoredPart
from karma8.store.readonly import PartStoreReader
from karma8.store.tiered import OneChunk

log = logging.getLogger("karma8.direct")

_Span = tuple[NodeRef, str, int, int]  # a part read: node, key, offset, length
KEEP_UP_EVERY = 0.2  # seconds between a worker's refreshes of its packed indexes


class ReadOnlyMetadata:
    """Discovery's SQLite database, opened read-only by another process.

    Names it resolved are kept. ``PRAGMA data_version`` (the same connection's count of
    commits by any other one, read from the shared log index, not the disk) is taken before
    each read; while it stays the same, the database is as it was when a kept answer was
    read (a read that began after a commit landed keeps an answer newer than its count,
    never older), and what was durable then still is: a hot file costs one statement
    instead of four and a look at the durability mark. Once it has moved (any commit: a
    heartbeat, every few seconds a node), a kept answer read less than ``keep_for`` seconds
    ago is still given if the name's committed version is the same one (one more
    statement): a version's rows change only where its parts are (a part moved away stays
    where it was for ``retire_grace``, for reads that resolved it before, as for the
    parent's own GETs), which of them were reported lost (a read then tries such a part
    first, and goes around it if it fails) and its nodes' URLs (asked only when a direct
    read fails). Older answers are read again. ``keep_for`` 0: kept only while nothing
    moves.
    """

    CACHE_MAX = 4096  # names kept at most (then all are dropped): ~10 MiB of versions

    def __init__(
        self,
        path: Path,
        *,
        keep_for: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # timeout=0: on the event loop, a busy database is asked over HTTP, not waited for.
        self._db = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, check_same_thread=False, timeout=0
        )
        self._db.row_factory = sqlite3.Row
        self._db.isolation_level = None  # BEGIN and COMMIT are this class's
        self._log = Path(f"{path}-wal")
        mark = Path(f"{path}{MARK_SUFFIX}")
        self._mark = DurableMark(mark, writer=False) if mark.exists() else None
        self._keep_for = keep_for
        self._clock = clock
        # name -> (its version, the data_version it was last checked at, when it was read
        # whole, and whether it was read whole at that data_version: only then is it as good
        # as a new read while nothing moves; a checked one only while it is young enough)
        self._kept: dict[tuple[str, str], tuple[FileVersion, int, float, bool]] = {}

    def current_version(self, namespace: str, name: str) -> FileVersion | None:
        """The committed version of ``namespace/name``, read in one transaction; None if the
        database has none, or if what was read may not be durable yet (see
        :class:`DurableMark`): the caller asks discovery, which waits for it."""
        seen: int = self._db.execute("PRAGMA data_version").fetchone()[0]
        key = (namespace, name)
        kept = self._kept.get(key)
        if kept is not None:
            version, checked_at, read_at, whole = kept
            young = self._clock() - read_at < self._keep_for
            if checked_at == seen and (whole or young):
                return version
            if young and committed_id(self._db, namespace, name) == version.version_id:
                self._kept[key] = (version, seen, read_at, False)
                return version
        read_at = self._clock()
        self._db.execute("BEGIN")
        try:
            version_id = committed_id(self._db, namespace, name)
            found = None if version_id is None else load_version(self._db, version_id)
        finally:
            self._db.execute("COMMIT")
        if found is None or self._mark is None or not self._mark.durable(self._log):
            self._kept.pop(key, None)
            return None
        if len(self._kept) >= self.CACHE_MAX:
            self._kept.clear()
        self._kept[key] = (found, seen, read_at, True)
        return found

    def close(self) -> None:
        if self._mark is not None:
            self._mark.close()
        self._db.close()


class DirectResolveDiscovery(HttpDiscoveryClient):
    """The HTTP discovery client, but names resolve from the database when it has them."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        urls: str,
        *,
        metadata: ReadOnlyMetadata,
        origin: str | None = None,
        warn_every: float | None = None,
    ) -> None:
        super().__init__(client, urls, origin=origin, warn_every=warn_every)
        self._metadata = metadata
        self.counts = {"direct": 0, "asked": 0}  # resolves read directly, and asked for

    async def resolve(self, *, namespace: str, name: str) -> FileVersion:
        try:
            version = self._metadata.current_version(namespace, name)
        except (sqlite3.Error, NotFound) as exc:
            log.debug("reading the metadata directly failed, asking discovery: %s", exc)
            version = None
        if version is None:  # discovery says which (no such namespace or file), or waits
            self.counts["asked"] += 1
            return await super().resolve(namespace=namespace, name=name)
        self.counts["direct"] += 1
        return version


class DirectReadStorage:
    """:class:`karma8.ports.StorageAPI` that reads the parts of local nodes itself."""

    def __init__(
        self, remote: StorageAPI, readers: Mapping[str, PartStoreReader], small_part_max: int
    ) -> None:
        self.remote = remote
        self._readers = readers
        self.small_part_max = small_part_max
        self.counts = {"direct": 0, "asked": 0}  # part reads from the node's files, and asked
        # Part reads that failed a block's check mid-stream, for the node to read again.
        self._damaged_send, self._damaged_receive = trio.open_memory_channel[_Span](64)

    async def run(self) -> None:
        """Until cancelled: keep the packed indexes up with their nodes' appends, a bounded
        refresh at a time (so that a burst of writes is indexed as it happens, not by the
        first reads after it, each of which would then pay for part of it), and have each
        node read again what failed its check here, so that it verifies the part,
        quarantines and reports it, as when it serves a damaged read."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_up, name="gateway-direct-index")
            async for node, key, offset, length in self._damaged_receive:
                with suppress(Karma8Error):
                    async with self.remote.read_part(
                        node, key, offset=offset, length=length
                    ) as chunks:
                        async for _ in chunks:
                            pass

    async def _keep_up(self) -> None:
        failing: set[str] = set()  # nodes whose last refresh failed (logged once until it works)
        while True:
            for node_id, reader in self._readers.items():
                try:
                    while not reader.packed.refresh():  # a bounded step; others run between
                        await trio.lowlevel.checkpoint()
                except Exception:  # the worker goes on serving: its reads refresh for themselves
                    if node_id not in failing:
                        failing.add(node_id)
                        log.exception("indexing node %s's volumes failed", node_id)
                else:
                    failing.discard(node_id)
            await trio.sleep(KEEP_UP_EVERY)

    def _damaged(self, span: _Span) -> None:
        with suppress(trio.WouldBlock):  # many at once: the scrubber finds the rest
            self._damaged_send.send_nowait(span)

    async def put_part(
        self, node: NodeRef, key: str, chunks: AsyncIterable[bytes], *, size: int | None = None
    ) -> StoredPart:
        return await self.remote.put_part(node, key, chunks, size=size)

    def parts_now(self, parts: Sequence[PartPlacement]) -> list[bytes] | None:
        """Packed parts of local nodes, whole and checked (:class:`karma8.ports.WholeParts`);
        None if any is not (a node elsewhere, a part too large to be packed, one not found or
        failing its check): the read then opens them as :meth:`read_part` does. Counted as
        direct reads only when all were read, each that the long way would have read."""
        readers = []
        for part in parts:
            reader = self._readers.get(part.node.node_id)
            if reader is None or part.size is None or part.size > self.small_part_max:
                return None
            readers.append(reader)
        found = []
        for part, reader in zip(parts, readers, strict=True):
            assert part.checksum is not None  # a committed part's
            data = reader.read_packed(part.key, part.checksum)
            if data is None:
                return None
            found.append(data)
        self.counts["direct"] += sum(1 for data in found if data)
        return found

    def read_part(
        self, node: NodeRef, key: str, *, offset: int, length: int, checksum: str | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        reader = self._readers.get(node.node_id)
        if reader is not None:
            return _DirectRead(self, reader, node, key, offset, length, checksum)
        self.counts["asked"] += 1
        return self.remote.read_part(node, key, offset=offset, length=length, checksum=checksum)

    async def delete_part(self, node: NodeRef, key: str) -> None:
        await self.remote.delete_part(node, key)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()


class _DirectRead:
    """One part read: from the node's volumes or part file if it is there and intact at
    opening, else from the node (whose read is then entered in its place)."""

    def __init__(
        self,
        storage: DirectReadStorage,
        reader: PartStoreReader,
        node: NodeRef,
        key: str,
        offset: int,
        length: int,
        checksum: str | None,
    ) -> None:
        self._storage = storage
        self._reader = reader
        self._node = node
        self._key = key
        self._offset = offset
        self._length = length
        self._checksum = checksum
        self._opened: AbstractAsyncContextManager[AsyncIterator[bytes]] | None = None

    async def __aenter__(self) -> AsyncIterator[bytes]:
        start, stop = self._offset, self._offset + self._length
        counts = self._storage.counts
        if stop <= self._storage.small_part_max:
            data = self._reader.read_packed(self._key, self._checksum)  # all of it
            if data is not None and stop <= len(data):
                counts["direct"] += 1
                return OneChunk(data if (start, stop) == (0, len(data)) else data[start:stop])
        opened = self._reader.open_file(self._key, offset=start, length=self._length)
        try:
            chunks = await opened.__aenter__()
        except Karma8Error:  # not a file here, or damaged: the node knows best
            pass
        else:
            self._opened = opened
            counts["direct"] += 1
            span = (self._node, self._key, start, self._length)
            return _Watched(chunks, lambda: self._storage._damaged(span))
        counts["asked"] += 1
        self._opened = self._storage.remote.read_part(
            self._node, self._key, offset=start, length=self._length, checksum=self._checksum
        )
        return await self._opened.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if self._opened is not None:
            return await self._opened.__aexit__(exc_type, exc, tb)
        return None


class _Watched:
    """A part file's chunks whose damaged block (:class:`IntegrityError`, raised on to the
    reader) is reported with ``damaged``."""

    def __init__(self, chunks: AsyncIterator[bytes], damaged: Callable[[], None]) -> None:
        self._chunks = chunks
        self._on_damage = damaged

    def __aiter__(self) -> _Watched:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await anext(self._chunks)
        except IntegrityError:
            self._on_damage()
            raise


def open_direct_reads(
    data_dir: Path, *, metadata: bool = True, keep_for: float = 0.0
) -> tuple[ReadOnlyMetadata | None, dict[str, PartStoreReader]]:
    """A reader per node directory (``storage-*`` with a ``node_id``) of an embedded
    cluster's ``data_dir``, and its discovery database if ``metadata`` (False when the
    metadata is elsewhere, on PostgreSQL: a database file left from before is stale) and the
    file is there, keeping resolved names as :class:`ReadOnlyMetadata` says."""
    database = data_dir / DATABASE_FILE
    found = (
        ReadOnlyMetadata(database, keep_for=keep_for) if metadata and database.exists() else None
    )
    readers: dict[str, PartStoreReader] = {}
    for node_dir in sorted(data_dir.glob("storage-*")):
        id_file = node_dir / NODE_ID_FILE
        if id_file.exists():
            node_id = id_file.read_text().strip()
            if node_id:
                readers[node_id] = PartStoreReader(node_dir)
    return found, readers


def direct_source(
    storage: DirectReadStorage | None, discovery: DirectResolveDiscovery | None
) -> Source:
    """What a gateway that reads directly adds to its process's metrics."""

    async def read() -> Iterable[Sample]:
        samples: list[Sample] = []
        for what, counts in (("part", storage), ("resolve", discovery)):
            for how, count in (counts.counts if counts is not None else {}).items():
                samples.append(
                    (
                        "karma8_gateway_direct_reads",
                        "counter",
                        "Part reads and name resolves done from the cluster's files (direct)"
                        " or asked of the nodes and discovery (asked)",
                        {"what": what, "how": how},
                        count,
                    )
                )
        return samples

    return read
