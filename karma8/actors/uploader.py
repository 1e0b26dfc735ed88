"""Writing an upload's parts to their nodes, and undoing an upload that failed: the part of
the gateway's PUT below its orchestration (place, write, commit), which stays in
:meth:`karma8.actors.gateway.Gateway.put`. The gateway's module doc tells the whole flow: the
splitter and a channel per part for a streamed body, a held body written at once, a part
moved off a node that fails it, the clean-up after a failure."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import AsyncIterable, Sequence
from contextlib import AsyncExitStack, suppress
from typing import TYPE_CHECKING

import trio

from karma8.actors.writes import (
    Fanout,
    HeldChunks,
    PartChunks,
    held_pieces,
    node_at_fault,
    primary_error,
    receipt_of,
    source_of,
    too_long,
    write_failure,
)
from karma8.core.errors import IntegrityError, InvalidRequest, Karma8Error, NotFound
from karma8.core.layout import StripeSplitter
from karma8.core.model import FileVersion, PartPlacement, PartReceipt, VersionState
from karma8.ports import DiscoveryAPI, StorageAPI, WholePartWriter

if TYPE_CHECKING:
    from karma8.actors.gateway import GatewayConfig


class Uploader:
    """Writes the parts of an upload to their nodes, moves a part off a node that fails it,
    and undoes an upload that failed."""

    def __init__(
        self,
        *,
        discovery: DiscoveryAPI,
        storage: StorageAPI,
        config: GatewayConfig,
        part_failures: Counter[tuple[str, str]],
    ) -> None:
        self._discovery = discovery
        self._storage = storage
        self._config = config
        self._staging = trio.Semaphore(config.staging_uploads)
        self._whole_writer = storage if isinstance(storage, WholePartWriter) else None
        # The gateway's counts of part failures by (node id, "read" or "write"), shared.
        self._part_failures = part_failures

    async def write_held(
        self, version: FileVersion, placed: list[PartPlacement], data: bytes
    ) -> list[PartReceipt]:
        """Write a body held whole: split at once, its parts (their copies, its parity parts)
        written together where the storage can (one sync round, one wait), else concurrently
        by the same part writers as a streamed body's, each from its pieces instead of a
        channel; a part refused because of its node moves as a writer's would."""
        layout = version.layout
        pieces = held_pieces(layout, data)
        sizes = layout.slot_sizes(len(data))
        receipts: list[PartReceipt | None] = [None] * layout.slots
        slots = [placement.index for placement in version.parts]
        # Each slot's first try: all together where the storage can (one sync round, one
        # wait), else each by its own writer; a slot whose node failed it is moved and
        # written again by its writer, with the tries it has left.
        retry: dict[int, Karma8Error | None] = dict.fromkeys(slots)
        if self._whole_writer is not None:
            stored = await self._whole_writer.put_whole_parts(
                [
                    (placed[s].node, placed[s].key, b"".join(pieces[source_of(layout, s)]))
                    for s in slots
                ]
            )
            if stored is not None:
                retry = {}
                for slot, result in zip(slots, stored, strict=True):
                    if isinstance(result, Karma8Error):
                        retry[slot] = result
                    else:
                        receipts[slot] = receipt_of(placed[slot], result, sizes[slot])
        # Nodes a part moved off after they took it all: any copy they kept is garbage.
        abandoned: list[PartPlacement] = []
        try:
            async with trio.open_nursery() as nursery:
                for slot, failure in retry.items():
                    nursery.start_soon(
                        self._write_part,
                        version.version_id,
                        placed,
                        slot,
                        HeldChunks(pieces[source_of(layout, slot)]),
                        sizes[slot],
                        receipts,
                        failure,
                        abandoned,
                        name=f"gw-put-{placed[slot].key}",
                    )
        except BaseExceptionGroup as group:
            error = primary_error(group)
            if error is None:
                raise
            raise error from None
        finally:
            if abandoned:
                await self.delete_all(abandoned)
        return [r for r in receipts if r is not None]

    async def write_streamed(
        self,
        version: FileVersion,
        placed: list[PartPlacement],
        body: AsyncIterable[bytes],
        content_length: int | None,
    ) -> tuple[int, list[PartReceipt]]:
        layout = version.layout
        splitter = StripeSplitter(layout, content_length)
        sizes = None if content_length is None else layout.slot_sizes(content_length)
        receipts: list[PartReceipt | None] = [None] * layout.slots
        limit = self._config.max_file_size if content_length is None else content_length
        step = self._config.reserve_step
        stage_free = self._config.stage_free
        # Bytes reserved on the nodes so far; a body without a Content-Length reserves
        # nothing (as before) and is never extended.
        reserved = limit if content_length is None else min(content_length, step)
        try:
            async with trio.open_nursery() as nursery:
                senders = []
                for placement in version.parts:
                    send, receive = trio.open_memory_channel[bytes](self._config.channel_depth)
                    senders.append(send)
                    nursery.start_soon(
                        self._write_part,
                        version.version_id,
                        placed,
                        placement.index,
                        receive,
                        None if sizes is None else sizes[placement.index],
                        receipts,
                        None,
                        None,
                        name=f"gw-put-{placement.key}",
                    )
                fanout = Fanout(layout, senders)
                # The channels end (each part's end) only once the body is whole: a body that
                # fails must not look like its end to the writers, which the nursery cancels.
                async with AsyncExitStack() as closing:
                    staging = False
                    async for chunk in body:
                        if not staging and splitter.held_after(len(chunk)) > stage_free:
                            await closing.enter_async_context(self._staging)
                            staging = True
                        if splitter.size + len(chunk) > limit:
                            raise too_long(content_length, self._config.max_file_size)
                        if splitter.size + len(chunk) > reserved:
                            assert content_length is not None  # else reserved == limit
                            wanted = -(-(splitter.size + len(chunk)) // step) * step
                            reserved = min(content_length, wanted)
                            await self._discovery.extend_upload(
                                version_id=version.version_id, size=reserved
                            )
                        await fanout.send(splitter.feed(chunk))
                    if content_length is not None and splitter.size != content_length:
                        raise InvalidRequest(
                            f"body has {splitter.size} bytes, Content-Length said {content_length}"
                        )
                    await fanout.send(splitter.finish())
                    await fanout.finish()
                for send in reversed(senders):
                    await send.aclose()
        except BaseExceptionGroup as group:
            splitter.discard()
            error = primary_error(group)
            if error is None:
                raise
            raise error from None
        return splitter.size, [r for r in receipts if r is not None]

    async def _write_part(
        self,
        version_id: str,
        placed: list[PartPlacement],
        index: int,
        chunks: trio.MemoryReceiveChannel[bytes] | HeldChunks,
        size: int | None,
        receipts: list[PartReceipt | None],
        failed: Karma8Error | None,
        abandoned: list[PartPlacement] | None,
    ) -> None:
        """Stream part ``index`` to its node; on a node failure before the node took anything,
        move the part (``placed[index]``) to another node and stream the same chunks there.
        ``failed``: the first try already failed so (a held part written with others).
        A held part's pieces are kept, so it moves whatever its node took; a node it moves off
        after that goes into ``abandoned``, for its copy, if it kept one, to be deleted."""
        held = chunks if isinstance(chunks, HeldChunks) else None
        async with chunks:
            for attempt in itertools.count():
                placement = placed[index]
                if held is not None and attempt:
                    held.rewind()
                counted = PartChunks(chunks)
                try:
                    if failed is not None:  # (once)
                        first: Karma8Error = failed
                        failed = None
                        raise first
                    stored = await self._storage.put_part(
                        placement.node, placement.key, counted, size=size
                    )
                    break
                except Karma8Error as exc:
                    if not node_at_fault(exc):
                        raise write_failure(placement, exc) from None
                    await self._report_failure(placement, exc)
                    if (counted.started and held is None) or attempt >= self._config.part_retries:
                        raise write_failure(placement, exc) from None
                    try:
                        placed[index] = await self._discovery.replace_part(
                            version_id=version_id,
                            index=index,
                            failed_node_id=placement.node.node_id,
                        )
                    except Karma8Error:
                        raise write_failure(placement, exc) from None
                    if counted.started and abandoned is not None:
                        abandoned.append(placement)
        # The channel ends only once the splitter is done with the body: a node that answers
        # before reading to the end did not store the whole part. (That the bytes arrived
        # intact is the transport's check: see StorageAPI.put_part.)
        if not counted.exhausted or stored.size != counted.size:
            raise IntegrityError(
                f"node {placement.node.node_id} stored {stored.size} bytes of part"
                f" {placement.index}, the gateway sent {counted.size}"
                + ("" if counted.exhausted else " and more were to come")
            )
        receipts[placement.index] = PartReceipt(
            index=placement.index, size=stored.size, checksum=stored.checksum
        )

    async def _report_failure(self, placement: PartPlacement, exc: Karma8Error) -> None:
        self._part_failures[placement.node.node_id, "write"] += 1
        # Best effort: an unreachable discovery must not turn a node's error into its own.
        with suppress(Karma8Error):
            await self._discovery.report_node_failure(
                node_id=placement.node.node_id,
                reason=f"writing part {placement.key} failed: {exc.code}: {exc.message}",
            )

    async def clean_up(self, version: FileVersion, *, commit_attempted: bool) -> FileVersion | None:
        """Undo an upload that failed; returns the version's settled state if known.

        Shielded with a deadline: a cancelled PUT still cleans up after itself.
        """
        settled: FileVersion | None = None
        with trio.move_on_after(self._config.cleanup_timeout) as scope:
            scope.shield = True
            gone = False
            try:
                settled = await self._discovery.abort_upload(version_id=version.version_id)
            except NotFound:
                gone = True  # expired, aborted and already collected: it cannot be committed
            except Karma8Error:
                settled = None
            if (
                commit_attempted
                and not gone
                and (settled is None or settled.state is not VersionState.ABORTED)
            ):
                # Unknown outcome, or committed after all: the parts may be live. Keep them.
                return settled
            await self._delete_each(version.parts)
        return settled

    async def delete_all(self, placements: Sequence[PartPlacement]) -> None:
        """Delete parts that are garbage, best effort, shielded and within cleanup_timeout."""
        with trio.move_on_after(self._config.cleanup_timeout) as scope:
            scope.shield = True
            await self._delete_each(placements)

    async def _delete_each(self, placements: Sequence[PartPlacement]) -> None:
        async with trio.open_nursery() as nursery:
            for placement in placements:
                nursery.start_soon(self._delete_quietly, placement, name=f"gw-undo-{placement.key}")

    async def _delete_quietly(self, placement: PartPlacement) -> None:
        # A part we cannot delete now is garbage of an aborted (or expiring) version, which the
        # node's heartbeat collects later.
        with suppress(Karma8Error):
            await self._storage.delete_part(placement.node, placement.key)
