"""How the gateway feeds a version's parts to their writers: the pieces of a body held
whole (kept, so their part can move whatever its node took), the chunks a node pulls
(counted, so a streamed part whose node took nothing can move), the
fan-out of each data piece to its copies and to the parity encoder, and what a failed part
write means: the node's fault or not, and the error the PUT reports
(see :mod:`karma8.actors.gateway`).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import trio

from karma8.core.erasure import ParityEncoder, encode_parity
from karma8.core.errors import (
    DiskFull,
    IntegrityError,
    InvalidRequest,
    Karma8Error,
    StorageFailure,
    TooLarge,
    Unavailable,
)
from karma8.core.layout import StripeLayout, StripeSplitter
from karma8.core.model import FileVersion, PartPlacement, PartReceipt
from karma8.ports import StoredPart


class WriterStopped(StorageFailure):
    """A part's writer stopped taking chunks: the consequence of its own error, if any."""


class HeldChunks:
    """A held part's pieces, received like a part channel's chunks: no task feeds it."""

    def __init__(self, pieces: list[bytes]) -> None:
        self._pieces = pieces
        self._next = 0

    async def receive(self) -> bytes:
        # No checkpoint: the node's writer awaits each piece's write.
        if self._next == len(self._pieces):
            raise trio.EndOfChannel
        piece = self._pieces[self._next]
        self._next += 1
        return piece

    def rewind(self) -> None:
        """From the first piece again (the part moves to another node)."""
        self._next = 0

    def __aiter__(self) -> HeldChunks:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> HeldChunks:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._pieces = []


class PartChunks:
    """One part's chunks on their way to its node, counted as the node pulls them."""

    def __init__(self, chunks: trio.MemoryReceiveChannel[bytes] | HeldChunks) -> None:
        self._chunks = chunks
        self.size = 0
        self.exhausted = False
        self.started = False  # the node took a chunk, or saw the end: a retry would lose it

    def __aiter__(self) -> PartChunks:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._chunks.receive()
        except trio.EndOfChannel:
            self.started = self.exhausted = True
            raise StopAsyncIteration from None
        self.started = True
        self.size += len(chunk)
        return chunk


WRITER_GRACE = 1.0  # seconds; a writer that stopped without an error (a bug) fails the PUT


class Fanout:
    """Sends the splitter's data part chunks to every slot that stores them: each copy, and
    the parity encoder, whose chunks go to the parity parts' slots."""

    def __init__(
        self, layout: StripeLayout, senders: Sequence[trio.MemorySendChannel[bytes]]
    ) -> None:
        self._copies = [[senders[s] for s in layout.copies_of(p)] for p in range(layout.parts)]
        first_parity = layout.parts * layout.copies
        self._parity = list(enumerate(senders[first_parity:], start=first_parity))
        self._encoder = ParityEncoder(layout.parts, layout.parity) if layout.parity else None

    async def send(self, pieces: Sequence[tuple[int, bytes]]) -> None:
        for index, piece in pieces:
            for sender in self._copies[index]:
                await send_piece(sender, index, piece)
            if self._encoder is not None:
                await self._send_parity(self._encoder.feed(index, piece))

    async def finish(self) -> None:
        """Send the parity parts' last chunks (the data parts' ends, zero-padded)."""
        if self._encoder is not None:
            await self._send_parity(self._encoder.finish())

    async def _send_parity(self, coded: Sequence[bytes]) -> None:
        if not coded:  # nothing new that every data part has reached
            return
        for (slot, sender), chunk in zip(self._parity, coded, strict=True):
            await send_piece(sender, slot, chunk)


async def send_piece(sender: trio.MemorySendChannel[bytes], slot: int, piece: bytes) -> None:
    try:
        await sender.send(piece)
    except trio.BrokenResourceError:
        # The writer closed its channel on its way out with its own error, which cancels
        # this nursery: wait for that, so that the cause, not this, is the PUT's error.
        await trio.sleep(WRITER_GRACE)
        raise WriterStopped(f"the writer of part {slot} stopped early") from None


def primary_error(group: BaseExceptionGroup[BaseException]) -> Karma8Error | None:
    """The first karma8 error in a (nested) exception group, if any; a part writer that
    stopped early (:class:`WriterStopped`) only if no other error says why.

    None if the group holds a ``Cancelled``: an outer cancellation must propagate as it is.
    """
    if group.subgroup(trio.Cancelled) is not None:
        return None
    errors = group.subgroup(lambda exc: isinstance(exc, Karma8Error))
    if errors is None:
        return None
    found = _flat_errors(errors)
    causes = [exc for exc in found if not isinstance(exc, WriterStopped)]
    return (causes or found)[0]


def _flat_errors(group: BaseExceptionGroup[BaseException]) -> list[Karma8Error]:
    out: list[Karma8Error] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out += _flat_errors(exc)
        elif isinstance(exc, Karma8Error):
            out.append(exc)
    return out


def held_pieces(layout: StripeLayout, data: bytes) -> list[list[bytes]]:
    """A body held whole, split: each data part's pieces, then each parity part's (one
    piece). Slot ``s`` is written from ``pieces[source_of(layout, s)]``."""
    splitter = StripeSplitter(layout, len(data))
    pieces: list[list[bytes]] = [[] for _ in range(layout.parts)]
    for index, piece in (*splitter.feed(data), *splitter.finish()):
        pieces[index].append(piece)
    if layout.parity:
        coded = encode_parity([b"".join(p) for p in pieces], layout.parity)
        pieces += [[p] for p in coded]
    return pieces


def source_of(layout: StripeLayout, slot: int) -> int:
    """Which of a held body's piece lists a slot is written from: its data part's, or (for
    a parity part) its own, after the data parts'."""
    part = layout.data_part(slot)
    return slot - layout.parts * (layout.copies - 1) if part is None else part


def node_at_fault(exc: Karma8Error) -> bool:
    """Whether a failed part write says the node is unfit for new parts: it could not be
    reached, is full or failed to store. (A damaged transfer, a conflict or a bad request is
    not the node's health; a cancelled write, e.g. a client gone, is no error at all.)"""
    return isinstance(exc, (Unavailable, DiskFull, StorageFailure)) or type(exc) is Karma8Error


def write_failure(placement: PartPlacement, exc: Karma8Error) -> Karma8Error:
    """The PUT's error for a part write that failed and will not move: an unreachable node
    or a damaged transfer as it is, anything else a storage failure naming part and node."""
    if isinstance(exc, (Unavailable, IntegrityError)):
        return exc
    return StorageFailure(
        f"writing part {placement.index} to node {placement.node.node_id} failed: {exc.message}"
    )


def too_long(content_length: int | None, max_size: int) -> Karma8Error:
    """A body that ran past its Content-Length, or past the largest file, without one."""
    if content_length is not None:
        return InvalidRequest(f"body is longer than Content-Length ({content_length})")
    return TooLarge(f"body is larger than the limit of {max_size} bytes")


def placed_on(version: FileVersion, placed: Sequence[PartPlacement]) -> FileVersion:
    """The version with its parts where they were last placed (for clean-up)."""
    return attrs.evolve(version, parts=tuple(placed))


def receipt_of(placement: PartPlacement, stored: StoredPart, size: int) -> PartReceipt:
    """A whole part's receipt, once the node says it stored all of it."""
    if stored.size != size:
        raise IntegrityError(
            f"node {placement.node.node_id} stored {stored.size} bytes of part"
            f" {placement.index}, the gateway sent {size}"
        )
    return PartReceipt(index=placement.index, size=stored.size, checksum=stored.checksum)
