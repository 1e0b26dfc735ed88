"""The storage actor: holds parts on one node's disk.

A node has a permanent id (kept by whoever owns its data directory) and registers it with
discovery on start, then heartbeats. Heartbeat replies carry the keys of garbage parts (their
versions were aborted or retired); the node deletes them and reports the deletions in its next
heartbeat, so discovery forgets a part only after it is gone from disk.

Writes are checksummed as they stream, and a part becomes visible only when
:meth:`PartWriter.commit` has made it durable; a write that fails or is cancelled is
discarded, under a shield so cancellation cannot leave a half-written temporary behind.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import AbstractAsyncContextManager, suppress
from typing import Any

import attrs
import trio

from karma8.core.errors import (
    IntegrityError,
    InvalidRequest,
    Karma8Error,
    NodeForgotten,
    NotFound,
    Unavailable,
)
from karma8.core.model import FAILED_ITS_CHECKSUM, MISSING_ON_ITS_NODE, NodeRegistration
from karma8.ports import (
    Appended,
    DiscoveryAPI,
    LendingStore,
    Loan,
    PartStore,
    PendingWrite,
    StepRunner,
    StoredPart,
    WholePartStore,
)

log = logging.getLogger("karma8.storage")
_PART_KEY = re.compile(r"[0-9a-zA-Z_-]{1,64}\.[0-9]{1,3}")


def check_part_key(key: str) -> str:
    if not _PART_KEY.fullmatch(key):
        raise InvalidRequest(f"invalid part key {key!r}")
    return key


@attrs.frozen(kw_only=True)
class ScrubReport:
    node_id: str
    checked: int
    corrupt: tuple[str, ...]


@attrs.frozen(kw_only=True)
class StorageConfig:
    heartbeat_interval: float = 2.0
    register_retry: float = 1.0
    # Every ``orphan_check_interval`` seconds the node asks discovery which of its parts it
    # does not know; a part still unknown ``orphan_grace`` seconds after it was first seen
    # unknown is deleted. (A part whose upload is in flight is known from its begin on, or
    # its placement lease's, so only true leftovers qualify: e.g. a write that landed after
    # its version was collected, or a small PUT's parts once its lease is gone.)
    orphan_check_interval: float = 60.0
    orphan_grace: float = 600.0
    # The background scrubber re-reads every part once per ``scrub_interval`` (0 = never),
    # pausing ``scrub_pause`` seconds between parts so that it never competes with traffic.
    scrub_interval: float = 24 * 3600.0
    scrub_pause: float = 0.05


class StorageNode:
    """One storage node. Serves the node side of :class:`karma8.ports.StorageAPI`."""

    def __init__(
        self,
        *,
        node_id: str,
        url: str,
        store: PartStore,
        discovery: DiscoveryAPI,
        config: StorageConfig,
        place: str | None = None,
    ) -> None:
        self.node_id = node_id
        self.url = url
        self.place = place  # where its directory is (NodeRegistration.place)
        self._store = store
        self._whole = store if isinstance(store, WholePartStore) else None
        self._lending = store if isinstance(store, LendingStore) else None
        self._discovery = discovery
        self._config = config
        self._suspects: dict[str, float] = {}
        # Parts the last check found missing: each is logged once, when first found (they
        # are reported to discovery at every check until repair has moved them off).
        self._missing: frozenset[str] = frozenset()
        # Parts a read found damaged, for the checker task (bounded: when it is full, the
        # scrubber finds the rest).
        self._damaged_send, self._damaged_receive = trio.open_memory_channel[str](256)
        # Plain counts since start, for the operator's metrics (the net layer reads them).
        self.counts = dict.fromkeys(
            ("scrubbed_parts", "corrupt_parts", "garbage_deleted", "orphans_deleted"), 0
        )

    async def registration(self) -> NodeRegistration:
        """What discovery is told: the capacity is the smaller of the quota and what the disk
        can really hold (used plus free), so a disk that fills up for any reason is avoided."""
        used = await self._store.used_bytes()
        capacity = self._store.capacity_bytes
        try:
            capacity = min(capacity, used + await self._store.free_bytes())
        except Karma8Error as exc:  # the disk's free space is unknown: the quota must do
            log.warning("node %s: cannot read the disk's free space: %s", self.node_id, exc)
        return NodeRegistration(
            node_id=self.node_id,
            url=self.url,
            capacity_bytes=capacity,
            disk_used_bytes=used,
            place=self.place,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Register (retrying while discovery is unreachable), report ready, then heartbeat
        and scrub in the background until cancelled.

        A refused registration (bad capacity, wrong secret, the id heard from another place,
        a node the operator forgot) is not retried: it raises; so does a heartbeat refused
        because the operator forgot the node.
        """
        while True:
            try:
                await self._discovery.register_node(await self.registration())
                break
            except Unavailable:
                await trio.sleep(self._config.register_retry)
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.run_scrubber, name=f"scrubber-{self.node_id}")
            nursery.start_soon(self._check_damaged, name=f"checker-{self.node_id}")
            await self._heartbeats()

    async def _heartbeats(self) -> None:
        deleted: list[str] = []
        next_orphan_check = trio.current_time() + self._config.orphan_check_interval
        while True:
            await trio.sleep(self._config.heartbeat_interval)
            if trio.current_time() >= next_orphan_check:
                next_orphan_check = trio.current_time() + self._config.orphan_check_interval
                await self._check_parts()
            try:
                garbage = await self._discovery.heartbeat(
                    await self.registration(), deleted=deleted
                )
            except NodeForgotten:
                raise  # the operator wrote this node off: serving on would mislead
            except Karma8Error:
                continue  # discovery unreachable: keep the deletions to report next time
            deleted = []
            for key in garbage:
                await self._store.delete(key)
                deleted.append(key)
                self.counts["garbage_deleted"] += 1

    async def scrub(self, *, pause: float = 0.0) -> ScrubReport:
        """Verify every part against its checksum; quarantine the ones that fail.

        A quarantined part is no longer served: a read that needs it fails cleanly instead of
        returning wrong bytes, and discovery is told, so that a part of a redundant file is
        rebuilt elsewhere (a raid0 file's part cannot be).
        """
        checked = 0
        corrupt: list[str] = []
        for key in await self._store.keys():
            try:
                intact = await self._store.verify(key)
            except NotFound:
                continue  # deleted meanwhile
            checked += 1
            self.counts["scrubbed_parts"] += 1
            if not intact:
                await self._store.quarantine(key)
                corrupt.append(key)
                self.counts["corrupt_parts"] += 1
                log.error("node %s: part %s failed its checksum; quarantined", self.node_id, key)
            if pause:
                await trio.sleep(pause)
        await self._report_corrupt(corrupt)
        return ScrubReport(node_id=self.node_id, checked=checked, corrupt=tuple(corrupt))

    async def _check_damaged(self) -> None:
        """Verify each part a read found damaged and, if it is corrupt, take it out of
        service and report it, as the scrubber would. (Over HTTP the reader sees only a cut
        stream, which could as well be this node dying: the node is the one that knows.)"""
        async for key in self._damaged_receive:
            try:
                intact = await self._store.verify(key)
            except NotFound:
                continue
            if intact:
                continue
            await self._store.quarantine(key)
            self.counts["corrupt_parts"] += 1
            log.error(
                "node %s: part %s failed its checksum on a read; quarantined", self.node_id, key
            )
            await self._report_corrupt([key])

    def _read_failed_check(self, key: str) -> None:
        with suppress(trio.WouldBlock):
            self._damaged_send.send_nowait(key)

    async def _report_corrupt(self, keys: list[str]) -> None:
        if not keys:
            return
        # Best effort: one not told now is found missing by the next parts check.
        with suppress(Karma8Error):
            await self._discovery.report_lost_parts(
                node_id=self.node_id, keys=keys, reason=FAILED_ITS_CHECKSUM
            )

    async def run_scrubber(self) -> None:
        """Scrub all parts once per ``scrub_interval``, throttled; runs until cancelled."""
        if self._config.scrub_interval <= 0:
            return
        while True:
            await trio.sleep(self._config.scrub_interval)
            await self.scrub(pause=self._config.scrub_pause)

    async def _check_parts(self) -> None:
        """Compare the parts on disk with discovery's records, both ways: report the parts
        it expects here that are gone (a lost or replaced disk, a part taken out), and delete
        those it has not known of for ``orphan_grace`` seconds.

        Discovery's list is asked for before the disk is listed: a part it names was written
        here before it was recorded, so one missing from the later listing is lost (this
        node's deletions of garbage happen in this same task, never in between)."""
        try:
            expected = await self._discovery.expected_parts(node_id=self.node_id)
        except Karma8Error:
            return  # discovery unreachable: nothing is judged on a guess
        keys = await self._store.keys()
        missing = sorted(set(expected).difference(keys))
        try:
            new = [key for key in missing if key not in self._missing]
            self._missing = frozenset(missing)
            if new and len(missing) == 1:
                log.error(
                    "node %s: 1 part is missing (%s); reported for repair", self.node_id, new[0]
                )
            elif new:
                log.error(
                    "node %s: %d parts are missing (e.g. %s), %d of them newly found;"
                    " reported for repair",
                    *(self.node_id, len(missing), new[0], len(new)),
                )
            if missing:
                await self._discovery.report_lost_parts(
                    node_id=self.node_id, keys=missing, reason=MISSING_ON_ITS_NODE
                )
            unknown = set(await self._discovery.unknown_parts(node_id=self.node_id, keys=keys))
        except Karma8Error:
            return
        now = trio.current_time()
        self._suspects = {k: since for k, since in self._suspects.items() if k in unknown}
        for key in sorted(unknown):
            since = self._suspects.setdefault(key, now)
            if now - since >= self._config.orphan_grace:
                await self._store.delete(key)
                del self._suspects[key]
                self.counts["orphans_deleted"] += 1
                log.warning("node %s: deleted orphan part %s", self.node_id, key)

    async def put_part(self, key: str, chunks: AsyncIterable[bytes]) -> StoredPart:
        """Write a part from a stream; returns once it is durable.

        Cancellation or a failing stream discards the partial write. A key that is already
        stored raises :class:`UploadConflict` from the store's commit (parts are immutable).
        There is no lookup before the write: part keys are unique per upload, so a duplicate
        is a caller's bug, and looking first cost every PUT five disk lookups.
        """
        check_part_key(key)
        writer = await self._store.create(key)
        try:
            async for chunk in chunks:
                await writer.write(chunk)
            return await writer.commit()  # the store hashes as it writes
        except BaseException:
            with trio.CancelScope(shield=True):
                await writer.discard()
            raise

    def whole_runner(self, size: int) -> StepRunner | None:
        """What runs the write of a whole part of ``size`` bytes begun by :meth:`begin_whole`
        (shared with the other nodes on its disk); None if this node cannot take one that
        way (:meth:`put_part` then)."""
        return None if self._whole is None else self._whole.whole_runner(size)

    async def begin_whole(self, key: str, data: bytes) -> PendingWrite:
        """:meth:`put_part` of a whole part up to its write, for a caller that runs the
        writes of several parts together (see :class:`karma8.ports.PendingWrite`).
        :meth:`whole_runner` must have said it can. Raises as :meth:`put_part` does."""
        check_part_key(key)
        assert self._whole is not None, "whole_runner said no"
        return await self._whole.begin_whole(key, data)

    async def lend_volume(self, borrower: str) -> Loan:
        """A new volume for a process on this host to append small parts to
        (:mod:`karma8.store.packed.loans`); Unavailable if this node's store cannot lend."""
        if self._lending is None:
            raise Unavailable(f"node {self.node_id} does not lend volumes")
        return await self._lending.lend(borrower)

    def adopt_part(self, borrower: str, appended: Appended) -> StoredPart:
        """A needle appended to a volume this node lent, made one of its parts (it reads
        the needle back and checks it first; blocking, brief). Raises as the store's
        ``adopt`` does."""
        check_part_key(appended.key)
        if self._lending is None:
            raise Unavailable(f"node {self.node_id} does not lend volumes")
        return self._lending.adopt(borrower, appended)

    async def give_back_volume(self, borrower: str, volume: int, end: int) -> None:
        if self._lending is None:
            raise Unavailable(f"node {self.node_id} does not lend volumes")
        await self._lending.give_back(borrower, volume, end)

    def end_loans(self) -> None:
        """Take back every volume this node lent: the borrowers have exited (blocking)."""
        if self._lending is not None:
            self._lending.end_loans()

    def read_part(
        self, key: str, *, offset: int, length: int
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        check_part_key(key)
        if offset < 0 or length < 0:
            raise InvalidRequest("offset and length must not be negative")
        return _Watched(self._store.open(key, offset=offset, length=length), key, self)

    async def stat_part(self, key: str) -> StoredPart | None:
        check_part_key(key)
        return await self._store.stat(key)

    async def delete_part(self, key: str) -> None:
        check_part_key(key)
        await self._store.delete(key)

    async def part_keys(self) -> list[str]:
        return await self._store.keys()

    def close(self) -> None:
        """Release the disk's descriptors once the node has stopped: its tasks have ended,
        and nothing calls it any more (a node run in-process, whose process goes on)."""
        self._store.close()


class _Watched:
    """A part read whose block that fails its check (at opening or mid-stream) has the
    node verify the part in the background; the error goes on to the reader at once."""

    def __init__(
        self,
        opened: AbstractAsyncContextManager[AsyncIterator[bytes]],
        key: str,
        node: StorageNode,
    ) -> None:
        self._opened = opened
        self._key = key
        self._node = node
        self._chunks: AsyncIterator[bytes] | None = None

    async def __aenter__(self) -> _Watched:
        try:
            self._chunks = await self._opened.__aenter__()
        except IntegrityError:
            self._node._read_failed_check(self._key)
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self._opened.__aexit__(*exc_info)

    def __aiter__(self) -> _Watched:
        return self

    async def __anext__(self) -> bytes:
        assert self._chunks is not None
        try:
            return await anext(self._chunks)
        except IntegrityError:
            self._node._read_failed_check(self._key)
            raise
