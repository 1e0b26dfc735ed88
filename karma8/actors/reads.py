"""How the gateway reads a version back: each part as a checked stream of exact length,
stitched in file order; for a redundant version, from another copy or rebuilt from parity
when a part's node fails, is slow or serves a corrupt block (see :mod:`karma8.actors.gateway`);
a small whole file from its data parts handed over at once, where the storage can.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, suppress

import trio

from karma8.core.erasure import rebuild, rebuild_share
from karma8.core.errors import (
    IntegrityError,
    Karma8Error,
    NotFound,
    StorageFailure,
    Unavailable,
)
from karma8.core.layout import StripeLayout, merge
from karma8.core.model import FileVersion, PartPlacement, VersionState
from karma8.ports import StorageAPI, WholeParts


def file_of(version: FileVersion) -> str:
    """A version's file as a message names it: ``namespace/name``."""
    return f"{version.namespace}/{version.name}"


def unread(placement: PartPlacement, exc: Karma8Error | None) -> str:
    """Why part ``placement`` could not be read (``exc``; None: no answer in time), as a
    client may be told it: the part, its node's id, never its address."""
    on = f"part {placement.index} is on node {placement.node.node_id}"
    if exc is None:
        return f"{on}, which did not answer in time"
    if isinstance(exc, Unavailable):
        return f"{on}, which does not answer"
    if isinstance(exc, (NotFound, IntegrityError)):
        return f"{on}, which lost it or found it damaged"
    return f"{on}, which failed to read it"


def read_failure(placement: PartPlacement, exc: Karma8Error, file: str) -> Karma8Error:
    """What a read of ``file`` without another copy says of a part that ``exc`` kept from
    it."""
    if isinstance(exc, Unavailable):
        # Which part of which file, on which node: "does not answer" alone cannot be told
        # from discovery being down. (The node's address and the transport's error are in
        # the message, for the log; a client is told the rest.)
        where = f"part {placement.index} of {file} is on node {placement.node.node_id}"
        return Unavailable.told(f"{where}, which does not answer", exc.message)
    if isinstance(exc, (StorageFailure, IntegrityError)):
        return exc
    if isinstance(exc, NotFound):
        # A committed part its node does not have: taken out of service after it failed a
        # check (a node quarantines such a part), or lost with the node's disk. Its bytes
        # are gone for good, as damaged ones are: the same answer as the read that found
        # the damage, not a node's failure, which a retry might get past.
        return IntegrityError(
            f"part {placement.index} on node {placement.node.node_id} is gone (quarantined"
            f" after failing a check, or lost): {exc.message}"
        )
    return StorageFailure(
        f"part {placement.index} on node {placement.node.node_id} cannot be read: {exc.message}"
    )


class PartCursor:
    """Reads exact byte counts from one part stream, checking its length as it goes.

    Holds at most the chunk it is handing out. It fetches nothing ahead itself: the part
    streams read ahead on their own (a node's file reader reads its next chunk in a thread as
    it hands one out; over HTTP, the socket buffers what the node sends), so the parts' reads
    overlap with sending without the gateway holding a chunk per part (measured: the same
    speed as fetching every part's next chunk at once, 16 MiB less per 256 MiB GET).
    """

    def __init__(
        self,
        placement: PartPlacement,
        stream: AsyncIterator[bytes],
        length: int,
        file: str,
    ) -> None:
        self._placement = placement
        self._file = file  # namespace/name, for messages
        self._stream = stream
        self._unread = length  # bytes the node has not sent yet
        self._buf = b""
        self._pos = 0

    async def _next_chunk(self) -> bytes:
        """The part's next chunk from the node, its length checked."""
        try:
            chunk = await anext(self._stream)
        except StopAsyncIteration:
            raise IntegrityError(
                f"part {self._placement.index} on node {self._placement.node.node_id}"
                f" ended {self._unread} bytes early"
            ) from None
        except Karma8Error as exc:
            raise read_failure(self._placement, exc, self._file) from None
        self._unread -= len(chunk)
        if self._unread < 0:
            raise IntegrityError(f"part {self._placement.index} is longer than recorded")
        return chunk

    async def read(self, limit: int) -> bytes:
        """Up to ``limit`` bytes (at least one) of the part."""
        while self._pos == len(self._buf):  # (a node may send an empty chunk)
            self._buf, self._pos = await self._next_chunk(), 0
        if self._pos == 0 and len(self._buf) <= limit:
            # Handed on whole: drop our reference, so the chunk is freed once it is sent
            # rather than when the next one arrives (a chunk is up to 4 MiB, per part).
            piece, self._buf = self._buf, b""
            return piece
        piece = self._buf[self._pos : self._pos + limit]
        self._pos += len(piece)
        return piece


class Stitcher:
    """Interleaves part cursors back into file order, segment by segment.

    An async iterator class rather than an async generator: a read abandoned half-way (a
    failed part, a client gone) then leaves nothing for a finaliser to clean up.
    """

    def __init__(
        self,
        layout: StripeLayout,
        size: int,
        start: int,
        stop: int,
        cursors: dict[int, PartCursor | RedundantCursor],
    ) -> None:
        self._segments = layout.segments(size, start, stop)
        self._cursors = cursors
        self._cursor: PartCursor | RedundantCursor | None = None
        self._remaining = 0

    def __aiter__(self) -> Stitcher:
        return self

    async def __anext__(self) -> bytes:
        while self._remaining == 0:
            segment = next(self._segments, None)
            if segment is None:
                raise StopAsyncIteration
            self._cursor = self._cursors[segment.part]
            self._remaining = segment.length
        assert self._cursor is not None
        piece = await self._cursor.read(self._remaining)
        self._remaining -= len(piece)
        return piece


class Sources:
    """Opens the part streams of one read of a redundant version, and remembers which slots
    failed during it, so that no cursor tries them again, and which of them the node lost
    (missing, or failing its checks: ``lost``), for the reader to report.

    Each stream has its own exit stack: a stream given up on (its node failed or was slow)
    is closed at once, as failed, rather than drained to its end when the read completes.
    """

    def __init__(
        self,
        storage: StorageAPI,
        version: FileVersion,
        deadline: float,
        failures: Counter[tuple[str, str]],
    ) -> None:
        self.storage = storage
        self.version = version
        self.layout = version.layout
        self.deadline = deadline
        self.failed: set[int] = set()
        self.why: dict[int, Karma8Error | None] = {}  # failed slot -> its error (None: slow)
        self.lost: set[int] = set()
        # Parts reported lost on their node (a failed check there, or missing) until repair
        # replaces them: tried last, after every other copy or a rebuild around them (a
        # report may be stale: a disk that was only unmounted, say).
        self.suspect = frozenset(p.index for p in version.parts if p.reported_lost is not None)
        # Where the read ends in each data part it reads (bounds what a rebuild reads).
        self.ends: dict[int, int] = {}
        self.shared: SharedRebuild | None = None
        self._failures = failures
        self._open: list[tuple[PartCursor, AsyncExitStack]] = []

    def slot(self, index: int) -> PartPlacement:
        return self.version.parts[index]

    def readable(self, slots: Iterable[int]) -> list[int]:
        """``slots`` not failed during this read, those reported lost last."""
        left = [s for s in slots if s not in self.failed]
        return sorted(left, key=self.suspect.__contains__)

    async def open(self, slot: int, offset: int, length: int) -> PartCursor | None:
        """A cursor over bytes ``[offset, offset + length)`` of ``slot``, or None (and the
        slot counts as failed) if its node cannot open it within the deadline."""
        placement = self.slot(slot)
        whole = offset == 0 and length == placement.size
        stack = AsyncExitStack()
        with trio.move_on_after(self.deadline):
            try:
                stream = await stack.enter_async_context(
                    self.storage.read_part(
                        placement.node,
                        placement.key,
                        offset=offset,
                        length=length,
                        checksum=placement.checksum if whole else None,
                    )
                )
            except Karma8Error as exc:
                self._fail(slot, exc)
                return None
            cursor = PartCursor(placement, stream, length, file_of(self.version))
            self._open.append((cursor, stack))
            return cursor
        self._fail(slot, None)
        await abandon(stack)
        return None

    def _fail(self, slot: int, exc: Karma8Error | None) -> None:
        if isinstance(exc, (NotFound, IntegrityError)):
            self.lost.add(slot)
        if slot not in self.failed:
            self.failed.add(slot)
            self.why[slot] = exc
            self._failures[self.slot(slot).node.node_id, "read"] += 1

    async def give_up(
        self, slot: int, cursor: PartCursor | None, exc: Karma8Error | None = None
    ) -> None:
        """Open ``slot`` no more during this read (``exc``: why, if not too slow), and close
        ``cursor``'s stream now. (Other cursors reading the slot go on until they fail
        themselves.)"""
        self._fail(slot, exc)
        if cursor is not None:
            await self.close(cursor)

    def cannot_read(self, summary: str, slots: Iterable[int]) -> Unavailable:
        """Unavailable: ``summary``, then why each of ``slots`` (failed ones) could not be
        read; what a client is told, with the nodes' own messages for the log."""
        slots = sorted(slots)
        public = "; ".join([summary, *(unread(self.slot(s), self.why.get(s)) for s in slots)])
        causes = [(self.why.get(s), self.slot(s).node.node_id) for s in slots]
        return Unavailable.told(
            public, "; ".join(f"{node}: {exc.message}" for exc, node in causes if exc)
        )

    def share_rebuild(self) -> None:
        """From now on every data part of this read comes from one shared rebuild."""
        if self.shared is None:
            self.shared = SharedRebuild(self)

    async def close(self, cursor: PartCursor) -> None:
        """Close a healthy stream no longer needed (its slot stays readable)."""
        keep = []
        for opened, stack in self._open:
            if opened is cursor:
                await abandon(stack)
            else:
                keep.append((opened, stack))
        self._open = keep

    async def aclose(self) -> None:
        for _, stack in reversed(self._open):
            await stack.aclose()

    async def finish(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        """The read's end (an exit callback): every stream closed as read to its end if the
        read ended normally, else given up on (an HTTP stream closed normally drains the
        rest of its part)."""
        if exc is None:
            await self.aclose()
            return
        for _, stack in reversed(self._open):
            await abandon(stack)


async def abandon(stack: AsyncExitStack) -> None:
    """Close a stream given up on as failed (not drained), shielded, within a second."""
    with trio.move_on_after(1.0) as scope:
        scope.shield = True
        with suppress(Exception):
            await stack.__aexit__(StreamAbandoned, StreamAbandoned("given up"), None)


class StreamAbandoned(Karma8Error):
    """A part stream the gateway stopped reading from (its node failed or was too slow)."""


class RedundantCursor:
    """Data part ``part``'s bytes from wherever they can be had: its first copy, else the
    next copy, else (parity) rebuilt from other parts, switching source at the exact byte
    where the last one failed. A failure is an error of the node (Unavailable, a storage
    failure), a chunk that fails its checks (IntegrityError: the node checks each block
    before handing it on, so nothing wrong was handed out), or no answer within
    ``read_deadline``. Raises Unavailable once no source is left.

    Once one data part of a parity version is being rebuilt, every cursor of the read moves
    to the same :class:`SharedRebuild` at its next read: the read then takes in k parts'
    worth of bytes, as a healthy one does, instead of its own parts plus k more."""

    def __init__(self, sources: Sources, part: int, offset: int, length: int) -> None:
        self._sources = sources
        self._part = part
        self._pos = offset
        self._end = offset + length
        self._cursor: PartCursor | None = None
        self._slot: int | None = None
        self._error: Karma8Error | None = None  # why the current source was given up

    @classmethod
    async def open(cls, sources: Sources, part: int, offset: int, length: int) -> RedundantCursor:
        cursor = cls(sources, part, offset, length)
        await cursor._switch()
        return cursor

    async def _switch(self) -> None:
        sources = self._sources
        if self._slot is not None:
            await sources.give_up(self._slot, self._cursor, self._error)
        self._cursor = self._slot = None
        self._error = None
        if sources.shared is not None:
            return  # rebuilding already: read from it
        for slot in sources.readable(sources.layout.copies_of(self._part)):
            if slot in sources.suspect and sources.layout.parity:
                break  # rebuild around it: the rebuild takes it only if nothing else is left
            cursor = await sources.open(slot, self._pos, self._end - self._pos)
            if cursor is not None:
                self._cursor, self._slot = cursor, slot
                return
        if sources.layout.parity:
            sources.share_rebuild()
            return
        copies = sources.layout.copies_of(self._part)
        raise sources.cannot_read(
            f"part {self._part} of {file_of(sources.version)}: none of its {len(copies)}"
            " copies can be read",
            (slot for slot in copies if slot in sources.failed),
        )

    async def read(self, limit: int) -> bytes:
        """Up to ``limit`` bytes (at least one) of the part."""
        limit = min(limit, self._end - self._pos)
        sources = self._sources
        while True:
            if sources.shared is not None:
                if self._cursor is not None:  # a healthy stream, no longer needed
                    await sources.close(self._cursor)
                    self._cursor = self._slot = None
                # Each source has its own deadline; an error means too many parts are
                # lost, and propagates.
                rebuilt = await sources.shared.read(self._part, self._pos, limit)
                self._pos += len(rebuilt)
                return rebuilt
            assert self._cursor is not None
            piece: bytes | None = None
            with trio.move_on_after(sources.deadline):
                try:
                    piece = await self._cursor.read(limit)
                except Karma8Error as exc:
                    self._error = exc
            if piece is None:
                await self._switch()
                continue
            self._pos += len(piece)
            return piece


class BlockRebuilder:
    """The same byte range of k readable slots of a parity version, read window by window
    from one stream per slot (each continues where the last window ended), zero-padded past
    a slot's end. A slot that fails or is too slow is dropped for the rest of the read and
    the next readable slot takes its place."""

    def __init__(self, sources: Sources, *, skip: int | None = None) -> None:
        self._sources = sources
        self._skip = skip  # a slot never to read (the one being rebuilt)
        self._cursors: dict[int, tuple[PartCursor, int]] = {}  # slot -> (cursor, position)

    async def shares(self, start: int, count: int, end: int) -> dict[int, bytes]:
        """k shares of bytes ``[start, start + count)``, by slot; a stream opened here
        reads on to ``end`` (or the slot's size)."""
        sources = self._sources
        layout = sources.layout
        shares: dict[int, bytes | None] = {}
        while sum(b is not None for b in shares.values()) < layout.parts:
            need = layout.parts - sum(b is not None for b in shares.values())
            batch = sources.readable(
                s for s in range(layout.slots) if s != self._skip and s not in shares
            )[:need]
            if len(batch) < need:
                raise sources.cannot_read(
                    f"{file_of(sources.version)}: {len(sources.failed)} of its {layout.slots}"
                    f" parts cannot be read; parity {layout.parity} rebuilds at most"
                    f" {layout.parity}",
                    sources.failed,
                )
            async with trio.open_nursery() as nursery:
                for slot in batch:
                    nursery.start_soon(self._fetch, slot, start, count, end, shares)
        return {slot: block for slot, block in shares.items() if block is not None}

    async def _fetch(
        self, slot: int, start: int, count: int, end: int, shares: dict[int, bytes | None]
    ) -> None:
        shares[slot] = await self._block(slot, start, count, end)

    async def _block(self, slot: int, start: int, count: int, end: int) -> bytes | None:
        """``count`` bytes of ``slot`` from ``start``, zero-padded past its end; None if the
        slot fails (it is then dropped)."""
        sources = self._sources
        size = sources.slot(slot).size or 0
        real = max(0, min(start + count, size) - start)
        held = self._cursors.get(slot)
        if held is not None and held[1] != start:  # (not where it stopped: start afresh)
            await sources.close(held[0])
            del self._cursors[slot]
            held = None
        cursor = held[0] if held is not None else None
        if cursor is None and real:
            cursor = await sources.open(slot, start, min(max(end, start + count), size) - start)
            if cursor is None:
                return None
        chunks: list[bytes] = []
        got = 0
        error: Karma8Error | None = None
        with trio.move_on_after(sources.deadline):
            try:
                while got < real:
                    assert cursor is not None
                    chunk = await cursor.read(real - got)
                    chunks.append(chunk)
                    got += len(chunk)
            except Karma8Error as exc:
                error = exc
        if got < real:
            self._cursors.pop(slot, None)
            await sources.give_up(slot, cursor, error)
            return None
        if cursor is not None:
            self._cursors[slot] = (cursor, start + count)
        block = b"".join(chunks)
        return block if real == count else block + bytes(count - real)


class SharedRebuild:
    """Every data part of one read of a parity version, decoded window by window from the
    shares of k readable slots (:class:`BlockRebuilder`). Windows start at multiples of
    :data:`WINDOW` (a whole number of stripe units), so the parts, which the stitcher reads
    in turn unit by unit, all find their bytes in the window last decoded; the one before
    it is kept too."""

    WINDOW = 1 << 20

    def __init__(self, sources: Sources) -> None:
        self._sources = sources
        self._rebuilder = BlockRebuilder(sources)
        unit = sources.layout.unit
        self._window = max(unit, self.WINDOW - self.WINDOW % unit)
        self._end = max(sources.ends.values(), default=sources.slot(0).size or 0)
        self._decoded: dict[int, list[bytes]] = {}  # window start -> data blocks

    async def read(self, part: int, pos: int, limit: int) -> bytes:
        start = pos - pos % self._window
        blocks = self._decoded.get(start)
        if blocks is None:
            count = min(self._window, max(self._end, pos + limit) - start)
            layout = self._sources.layout
            shares = await self._rebuilder.shares(start, count, self._end)
            blocks = rebuild(layout.parts, layout.parity, shares)
            self._decoded = {s: b for s, b in self._decoded.items() if s == start - self._window}
            self._decoded[start] = blocks
        offset = pos - start
        return blocks[part][offset : offset + limit]


class RebuiltPart:
    """Bytes ``[pos, end)`` of ``slot`` (a data part, or a parity part for repair) rebuilt,
    block by block, from the same bytes of k other parts (data parts and parity parts; see
    :mod:`karma8.core.erasure`)."""

    BLOCK = 1 << 20

    def __init__(self, sources: Sources, slot: int, pos: int, end: int) -> None:
        self._sources = sources
        self._slot = slot
        self._pos = pos
        self._end = end
        self._rebuilder = BlockRebuilder(sources, skip=slot)

    def __aiter__(self) -> RebuiltPart:
        return self

    async def __anext__(self) -> bytes:
        if self._pos >= self._end:
            raise StopAsyncIteration
        count = min(self.BLOCK, self._end - self._pos)
        shares = await self._rebuilder.shares(self._pos, count, self._end)
        self._pos += count
        layout = self._sources.layout
        return rebuild_share(layout.parts, layout.parity, shares, self._slot)


def whole_at_once(version: FileVersion, storage: WholeParts) -> bytes | None:
    """A committed version's bytes put back together from its data parts (the first copy of
    each), if ``storage`` hands every one over whole and intact at once; else None, and the
    read goes the long way, which reads around a missing or damaged part or says why."""
    if version.state is not VersionState.COMMITTED or version.size is None:
        return None
    layout = version.layout
    placements = []
    for part in range(layout.parts):
        slot = layout.copies_of(part)[0]
        placement = version.parts[slot] if slot < len(version.parts) else None
        if placement is None or placement.index != slot or placement.reported_lost:
            return None
        placements.append(placement)
    parts = storage.parts_now(placements)
    if parts is None or sum(map(len, parts)) != version.size:
        return None  # (parts of other lengths than the version's: the long way says)
    try:
        return merge(layout, parts)  # which checks each part's length against the size
    except ValueError:
        return None
