"""The gateway actor: the public face of karma8.

Access
    Every request is first :meth:`Gateway.authorize`-d: discovery checks the namespace and the
    token (:mod:`karma8.core.access`); positive answers are cached for a few seconds.

PUT
    ``begin_upload`` at discovery (a pending version and 5 placed nodes), then the body flows
    through a :class:`StripeSplitter` into 5 bounded channels, one per part, each drained by a
    task streaming to its node. All 5 tasks live in one nursery: the first failure cancels the
    other writes and the body. Each node checksums (sha256) the part it stores and the
    receipts carry those checksums; that the node got the bytes the gateway sent is the
    transport's check (:meth:`karma8.ports.StorageAPI.put_part`), and the gateway checks that
    every node took its whole part. Then ``commit_upload`` makes the version current. On any failure
    the written parts are deleted and the version aborted, in a shielded scope with a deadline,
    and the error propagates. Memory per upload is one row held by the splitter plus
    ``channel_depth`` units per part in flight.

    A part write that fails because of its node (unreachable, disk full, a storage failure) is
    reported to discovery, which stops placing parts there (the node is SUSPECT). If the node
    failed before it took any of the part's bytes, the chunks are all still in the part's
    channel: discovery moves the part to another node (``replace_part``) and the same channel
    is streamed there, up to ``part_retries`` times. Bytes a node took are not kept, so a
    node failing later fails the PUT; a body held whole (below) keeps its pieces, so its part
    moves whatever the node took.

    A body with a Content-Length of at most ``small_file_max`` is read whole first, then
    placed by ``place_upload`` (a lease in discovery's memory, no transaction), split at once
    and written by the same part writers, each fed its pieces instead of a channel, or, where
    the storage can (:class:`karma8.ports.WholePartWriter`: the embedded cluster's own
    nodes), all together in one sync round; the commit is its one metadata transaction.
    Failures are handled as above.

    A commit whose answer is lost is settled by ``abort_upload``, which reports the version's
    final state: if the commit had in fact happened the PUT succeeds; if discovery cannot be
    reached, nothing is deleted (the parts may belong to a committed version) and the pending
    version, if it still is one, expires and is swept.

    The part writes and the clean-up are :class:`karma8.actors.uploader.Uploader`'s.

GET
    ``resolve`` at discovery, then :meth:`Gateway.open_read` opens the part streams the range
    touches, at once, and interleaves them in file order, segment by segment, without
    collecting parts.
    The gateway checks every part's length; the part streams check its bytes (the node's
    block CRCs, and over HTTP the transport's sha256) before handing them out, so a corrupt
    or truncated part fails the response rather than completing it.

Redundant engines (raid1, parity; see docs/architecture.md, "Engines")
    A version's layout may store more than its 5 data parts: copies, or parity parts that
    :class:`karma8.core.erasure.ParityEncoder` computes as the chunks pass. Every stored part
    has its writer in the same nursery, so the PUT stays all or nothing. A read gives each
    data part a :class:`karma8.actors.reads.RedundantCursor`, which switches, at the byte
    where its source failed (down, slower than ``read_deadline``, or a chunk that fails its
    check), to another copy or to the read's rebuild from the others
    (:class:`karma8.actors.reads.SharedRebuild`), and reports the parts it found missing or
    corrupt for repair.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from functools import partial

import attrs
import trio

from karma8.actors.reads import (
    PartCursor,
    RedundantCursor,
    Sources,
    Stitcher,
    file_of,
    read_failure,
    whole_at_once,
)
from karma8.actors.streams import open_together
from karma8.actors.uploader import Uploader
from karma8.actors.writes import placed_on, receipt_of, too_long
from karma8.core.access import AccessCache, Right, cache_key
from karma8.core.errors import InvalidRequest, Karma8Error, TooLarge, Unavailable
from karma8.core.layout import DEFAULT_MAX_FILE_SIZE
from karma8.core.model import (
    FileEntry,
    FileVersion,
    NodeRef,
    PartPlacement,
    PartReceipt,
    VersionState,
)
from karma8.core.names import check_name, check_namespace
from karma8.ports import Appended, DiscoveryAPI, LendingStorage, Loan, StorageAPI, WholeParts


@attrs.frozen(kw_only=True)
class GatewayConfig:
    max_file_size: int = DEFAULT_MAX_FILE_SIZE
    channel_depth: int = 1
    cleanup_timeout: float = 30.0
    # A read of a redundant version (raid1, parity) that waits longer than this for a part's
    # node (to open it, or for its next chunk) reads another copy or rebuilds the part.
    read_deadline: float = 5.0
    # How many times one part moves to another node when its node fails before taking bytes
    # (or at any point, for a body held whole).
    part_retries: int = 2
    # Seconds a positive access answer is reused without asking discovery: a revoked token
    # or a disabled namespace is refused within this long. 0: ask every time.
    access_cache_ttl: float = 5.0
    # Discovery reserves room for the first ``reserve_step`` bytes of a Content-Length at
    # begin; the gateway extends the reservation by this much as the body passes it.
    reserve_step: int = 64 << 20
    # A splitter holds back up to one row (5 stripe units) until it knows where the row
    # goes: always without a Content-Length, and for a file's tail. An upload that would
    # hold more than ``stage_free`` bytes first takes one of ``staging_uploads`` slots (for the
    # rest of its body), so what stalled uploads can hold is bounded gateway-wide.
    staging_uploads: int = 16
    stage_free: int = 1 << 20
    # A body with a Content-Length of at most this many bytes is read whole before its parts
    # are placed: its placement is a lease at discovery and the commit its one metadata
    # transaction (see put). 0: every body streams through begin_upload. At most
    # ``stage_free``: a held body is no more than any upload holds without a staging slot.
    small_file_max: int = attrs.field(default=1 << 20)

    @small_file_max.validator
    def _held_like_staged(self, attribute: object, value: int) -> None:
        if not 0 <= value <= self.stage_free:
            raise ValueError(f"small_file_max must be between 0 and {self.stage_free} bytes")


class Gateway:
    """PUT/GET/HEAD/DELETE/list of ``namespace/name`` over discovery and storage ports."""

    def __init__(
        self,
        *,
        discovery: DiscoveryAPI,
        storage: StorageAPI,
        config: GatewayConfig,
    ) -> None:
        self._discovery = discovery
        self._storage = storage
        self._config = config
        self._access = AccessCache(config.access_cache_ttl)
        self._whole_parts = storage if isinstance(storage, WholeParts) else None
        self._lending = storage if isinstance(storage, LendingStorage) else None
        # Part reads and writes that failed because of their node, by (node id, "read" or
        # "write"): plain counts for the operator's metrics (the net layer reads them).
        self.part_failures: Counter[tuple[str, str]] = Counter()
        self._uploader = Uploader(
            discovery=discovery, storage=storage, config=config, part_failures=self.part_failures
        )

    async def authorize(self, namespace: str, token: str | None, right: Right) -> None:
        """Raise unless ``token`` (None: anonymous) may ``right`` in ``namespace``.

        Called before a request's body is read. Positive answers are kept for
        ``access_cache_ttl`` seconds; refusals are not. Raises InvalidName, NotFound,
        Unauthorized, Forbidden (see :meth:`karma8.ports.DiscoveryAPI.check_access`).
        """
        check_namespace(namespace)
        key = cache_key(namespace, token, right)
        if self._access.allows(key, trio.current_time()):
            return
        await self._discovery.check_access(namespace=namespace, token=token, right=right)
        self._access.remember(key, trio.current_time())

    # -- PUT ------------------------------------------------------------------------------

    async def put(
        self,
        namespace: str,
        name: str,
        body: AsyncIterable[bytes],
        *,
        content_length: int | None = None,
        if_absent: bool = False,
    ) -> FileVersion:
        """Store ``body`` as the new current version of ``namespace/name``.

        All or nothing: on any failure, including cancellation, no part of this upload stays
        visible or on disk (best effort within ``cleanup_timeout``; the sweeper does the rest).

        Raises:
            InvalidName, InvalidRequest (body shorter/longer than ``content_length``),
            TooLarge, NotFound (namespace), NotEnoughNodes, PreconditionFailed (``if_absent``),
            StorageFailure / Unavailable (a node or discovery failed).
        """
        check_namespace(namespace)
        check_name(name)
        if content_length is not None and content_length > self._config.max_file_size:
            raise TooLarge(
                f"{content_length} bytes is more than the limit of {self._config.max_file_size}"
            )
        held: bytes | None = None
        if self.holds_whole(content_length):
            assert content_length is not None
            held = await self.read_held(body, content_length)
        # Shielded: if the client goes away while discovery is creating the version, we still
        # learn its id and abort it below, instead of leaving a reservation until it expires.
        with trio.move_on_after(self._config.cleanup_timeout) as begin_scope:
            begin_scope.shield = True
            if held is None:
                version = await self._discovery.begin_upload(
                    namespace=namespace, name=name, size_hint=content_length, if_absent=if_absent
                )
            else:
                version = await self._discovery.place_upload(
                    namespace=namespace, name=name, size=len(held), if_absent=if_absent
                )
        if begin_scope.cancelled_caught:
            raise Unavailable("discovery did not answer in time")
        # Where each part is now: a part whose node fails before taking any bytes (any part of a
        # body held whole) moves.
        placed = list(version.parts)
        uploader = self._uploader
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if held is None:
                size, receipts = await uploader.write_streamed(
                    version, placed, body, content_length
                )
            else:
                size, receipts = len(held), await uploader.write_held(version, placed, held)
        except BaseException:
            await uploader.clean_up(placed_on(version, placed), commit_attempted=False)
            raise
        return await self._commit(version, placed, size, receipts, if_absent=if_absent)

    async def place_held(
        self, namespace: str, name: str, size: int, *, if_absent: bool = False
    ) -> FileVersion:
        """Where a small body of ``size`` bytes, held whole elsewhere, is to be written: a
        pending version placed as :meth:`put` places one (a lease at discovery), for
        :meth:`put_written` to finish or :meth:`abandon` to give up.

        Raises:
            InvalidName, NotFound (namespace), PreconditionFailed (``if_absent``),
            InvalidRequest (not a size :meth:`put` holds whole), NotEnoughNodes.
        """
        check_namespace(namespace)
        check_name(name)
        if not self.holds_whole(size):
            raise InvalidRequest(f"{size} bytes is not a small upload here")
        return await self._discovery.place_upload(
            namespace=namespace, name=name, size=size, if_absent=if_absent
        )

    async def abandon(self, version: FileVersion) -> None:
        """Give up a version :meth:`place_held` placed: its parts deleted where adopted, the
        version aborted (best effort, as a failed :meth:`put` cleans up)."""
        await self._uploader.clean_up(version, commit_attempted=False)

    async def lend_volume(self, node: NodeRef, borrower: str) -> Loan:
        """A volume of ``node`` lent to ``borrower`` (:class:`karma8.ports.LendingStorage`);
        Unavailable if this gateway's storage does not lend."""
        if self._lending is None:
            raise Unavailable("this gateway's nodes do not lend volumes")
        return await self._lending.lend_volume(node, borrower)

    async def give_back_volume(self, node: NodeRef, borrower: str, volume: int, end: int) -> None:
        if self._lending is None:
            raise Unavailable("this gateway's nodes do not lend volumes")
        await self._lending.give_back_volume(node, borrower, volume, end)

    async def adopt_written(
        self, version: FileVersion, written: Sequence[Appended], *, borrower: str, size: int
    ) -> list[PartReceipt]:
        """The receipts of a small upload that ``place_upload`` placed as ``version`` and
        whose parts ``borrower``, a process on this host, appended itself to volumes the
        nodes lent it (:class:`karma8.ports.LendingStorage`; ``written`` in the order of the
        version's parts), once each node has adopted its part; :meth:`commit_written` then
        commits them. On any failure the upload is cleaned up as a failed :meth:`put` is.

        Raises:
            Unavailable: This gateway's storage does not lend volumes.
            InvalidRequest: ``written`` does not match the placement.
            what adopting a part raises (IntegrityError, DiskFull, StorageFailure, ...).
        """
        placed = list(version.parts)
        sizes = version.layout.slot_sizes(size)
        try:
            if self._lending is None:
                raise Unavailable("this gateway's nodes do not lend volumes")
            if [w.key for w in written] != [p.key for p in placed]:
                raise InvalidRequest("the parts written are not the parts placed")
            results = await self._lending.adopt_parts(
                borrower, [(p.node, w) for p, w in zip(placed, written, strict=True)]
            )
            receipts = []
            for placement, result in zip(placed, results, strict=True):
                if isinstance(result, Karma8Error):
                    raise result
                receipts.append(receipt_of(placement, result, sizes[placement.index]))
        except BaseException:
            await self._uploader.clean_up(version, commit_attempted=False)
            raise
        return receipts

    async def commit_written(
        self, version: FileVersion, receipts: list[PartReceipt], *, size: int, if_absent: bool
    ) -> FileVersion:
        """Commit what :meth:`adopt_written` adopted, as :meth:`put` ends."""
        return await self._commit(version, list(version.parts), size, receipts, if_absent=if_absent)

    async def _commit(
        self,
        version: FileVersion,
        placed: list[PartPlacement],
        size: int,
        receipts: list[PartReceipt],
        *,
        if_absent: bool,
    ) -> FileVersion:
        """A PUT's last step: discovery commits the version its parts are written for; on
        failure the parts are cleaned up, and a commit whose answer was lost is settled."""
        uploader = self._uploader
        try:
            return await self._discovery.commit_upload(
                version_id=version.version_id, size=size, receipts=receipts, if_absent=if_absent
            )
        except Karma8Error:
            settled = await uploader.clean_up(placed_on(version, placed), commit_attempted=True)
            if settled is not None and settled.state is VersionState.COMMITTED:
                return settled
            raise
        except BaseException:
            await uploader.clean_up(placed_on(version, placed), commit_attempted=True)
            raise

    def holds_whole(self, content_length: int | None) -> bool:
        """Whether :meth:`put` reads a body of this declared length whole before asking
        discovery where to put it (a small file; one over ``max_file_size`` is refused
        unread)."""
        config = self._config
        return content_length is not None and content_length <= min(
            config.small_file_max, config.max_file_size
        )

    async def read_held(self, body: AsyncIterable[bytes], content_length: int) -> bytes:
        """The whole body of a small upload; raises InvalidRequest unless it has exactly
        ``content_length`` bytes (a client gone or idle raises whatever the body raises)."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in body:
            size += len(chunk)
            if size > content_length:
                raise too_long(content_length, self._config.max_file_size)
            chunks.append(chunk)
        if size != content_length:
            raise InvalidRequest(f"body has {size} bytes, Content-Length said {content_length}")
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _report_lost(self, sources: Sources) -> None:
        """Tell discovery which parts a read found missing or corrupt, so that they are
        repaired. Best effort, shielded and brief: the read is over."""
        if not sources.lost:
            return
        by_node: dict[str, list[str]] = {}
        for slot in sorted(sources.lost):
            placement = sources.slot(slot)
            by_node.setdefault(placement.node.node_id, []).append(placement.key)
        with trio.move_on_after(self._config.read_deadline) as scope:
            scope.shield = True
            for node_id, keys in by_node.items():
                with suppress(Karma8Error):
                    await self._discovery.report_lost_parts(
                        node_id=node_id, keys=keys, reason="a read found it missing or corrupt"
                    )

    # -- GET / HEAD -----------------------------------------------------------------------

    async def stat(self, namespace: str, name: str) -> FileVersion:
        """The current version of a file. Raises NotFound."""
        check_namespace(namespace)
        check_name(name)
        return await self._discovery.resolve(namespace=namespace, name=name)

    async def read_bytes(
        self, version: FileVersion, *, start: int = 0, stop: int | None = None
    ) -> bytes:
        """Bytes ``[start, stop)`` of a committed version, read whole (a small answer's body).

        A whole file whose data parts (the first copy of each) the storage can hand over at
        once (:class:`karma8.ports.WholeParts`) is put back together from them without a
        stream per part; any other read, and one where a part is not there whole and intact,
        goes through :meth:`open_read`, which reads around it or says why it cannot.
        """
        if self._whole_parts is not None and start == 0 and stop in (None, version.size):
            whole = whole_at_once(version, self._whole_parts)
            if whole is not None:
                await trio.lowlevel.checkpoint_if_cancelled()  # no pass of the scheduler
                return whole
        async with self.open_read(version, start=start, stop=stop) as chunks:
            return b"".join([chunk async for chunk in chunks])

    @asynccontextmanager
    async def open_read(
        self, version: FileVersion, *, start: int = 0, stop: int | None = None
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """Open bytes ``[start, stop)`` of a committed version as a stream of chunks.

        Only the parts the range touches are opened. The stream raises StorageFailure or
        IntegrityError if a part cannot be read or fails verification: its length here, its
        bytes by the node that reads them from disk and, where bytes travel, by the
        transport (:meth:`karma8.ports.StorageAPI.read_part`).
        """
        size = version.size
        if size is None or version.state is not VersionState.COMMITTED:
            raise InvalidRequest(f"version {version.version_id} is not committed")
        stop = size if stop is None else stop
        spans = version.layout.part_spans(size, start, stop)
        whole = start == 0 and stop == size
        async with AsyncExitStack() as stack:
            cursors: dict[int, PartCursor | RedundantCursor] = {}
            if version.layout.tolerates:
                sources = Sources(
                    self._storage, version, self._config.read_deadline, self.part_failures
                )
                stack.push_async_callback(self._report_lost, sources)  # (runs after aclose)
                stack.push_async_exit(sources.finish)
                live = [(part, span) for part, span in enumerate(spans) if span is not None]
                sources.ends = {part: offset + length for part, (offset, length) in live}
                for part, (offset, length) in live:
                    cursors[part] = await RedundantCursor.open(sources, part, offset, length)
                yield Stitcher(version.layout, size, start, stop, cursors)
                return
            touched = [
                (placement, span)
                for placement, span in zip(version.parts, spans, strict=True)
                if span is not None
            ]
            streams = await open_together(
                stack,
                [
                    partial(
                        self._storage.read_part,
                        placement.node,
                        placement.key,
                        offset=offset,
                        length=length,
                        checksum=placement.checksum if whole else None,
                    )
                    for placement, (offset, length) in touched
                ],
            )
            failed = [
                (placement, stream)
                for (placement, _), stream in zip(touched, streams, strict=True)
                if isinstance(stream, Karma8Error)
            ]
            for placement, _ in failed:
                self.part_failures[placement.node.node_id, "read"] += 1
            if failed:
                placement, error = failed[0]
                raise read_failure(placement, error, file_of(version))
            for (placement, (_, length)), stream in zip(touched, streams, strict=True):
                assert stream is not None
                assert not isinstance(stream, Karma8Error)
                cursors[placement.index] = PartCursor(placement, stream, length, file_of(version))
            yield Stitcher(version.layout, size, start, stop, cursors)

    # -- DELETE / list --------------------------------------------------------------------

    async def delete(self, namespace: str, name: str) -> bool:
        """Retire the current version; True if there was one. Its parts are collected later."""
        check_namespace(namespace)
        check_name(name)
        return await self._discovery.delete_file(namespace=namespace, name=name)

    async def list(
        self, namespace: str, *, prefix: str = "", after: str = "", limit: int = 1000
    ) -> list[FileEntry]:
        check_namespace(namespace)
        return await self._discovery.list_files(
            namespace=namespace, prefix=prefix, after=after, limit=limit
        )
