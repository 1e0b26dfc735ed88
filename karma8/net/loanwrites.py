"""Small uploads whose parts a gateway worker writes itself, to volumes its parent's nodes
lend it.

With :mod:`karma8.net.writepipe` alone a worker parses a small PUT and sends the body to the
parent, whose one event loop then splits it, encodes five needles and waits for a sync round
to write them, for every small PUT of every worker. Here the worker does that part of the
work on its own core, and the parent only places and commits:

1. ``place``: the parent's gateway places the upload (:meth:`Gateway.place_held`: a lease at
   discovery, no transaction) and keeps the pending version; the worker gets it.
2. The worker splits the body, appends each part's needle to the volume the part's node
   lent it (``lend``, once per node, and again when one is full) and waits for one
   ``syncfs`` round of its own (:class:`karma8.store.groupsync.GroupSync`).
3. ``commit``: the parent's nodes adopt the needles (each read back and checked,
   :meth:`karma8.store.packed.store.PackedStore.adopt`), then discovery commits
   (:meth:`Gateway.put_written`); the answer is a PUT's.
4. On any failure before the commit the worker says ``abandon``, and the parent cleans up as
   a failed PUT does; needles never adopted are garbage that compaction drops, or orphans
   after a restart (:mod:`karma8.store.packed.loans`). Where the worker could not write
   (no loan, a disk error) or a node would not adopt its part for a reason of its own
   (full, a disk error, a needle not whole: the answer says ``again``), the worker then
   sends the body the :mod:`~karma8.net.writepipe` way, and the parent stores it as any
   small PUT, moving a part off a node that fails it.

A worker gives a full volume back (``give_back``) once none of its appends to it is in
flight; the nodes take back the rest once the workers have exited (a worker ends with its
parent). A
version whose placement names a node of another process (joined over HTTP) is abandoned
and its body sent the :mod:`~karma8.net.writepipe` way. The frames are the pipe's, each
JSON with an ``op`` and no body.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from contextlib import suppress
from pathlib import Path
from typing import Any

import trio

from karma8.actors.gateway import Gateway
from karma8.actors.writes import held_pieces, source_of
from karma8.core.errors import (
    DiskFull,
    IntegrityError,
    InvalidRequest,
    Karma8Error,
    StorageFailure,
    Unavailable,
)
from karma8.core.layout import StripeLayout
from karma8.core.model import FileVersion, NodeRef, StoredVersion
from karma8.net import requestlog
from karma8.net.codec import decode, encode, error_body
from karma8.net.exchange import INTERNAL_ERROR
from karma8.net.metrics import Sample
from karma8.net.writepipe import ParentWrites, answered, raise_error, stored_answer
from karma8.ports import Appended, Loan
from karma8.store.diskio import storage_error
from karma8.store.groupsync import GroupSync, SyncGroups
from karma8.store.packed.loans import BorrowedVolume

log = logging.getLogger("karma8.loanwrites")

Handler = Callable[[dict[str, Any], bytes], Awaitable[dict[str, Any]]]
OK: dict[str, Any] = {"ok": True}
# A part a node would not adopt for a reason of its own (full, a disk error, the needle not
# whole): the worker has the parent store the body instead, which moves such a part.
AGAIN = (DiskFull, StorageFailure, IntegrityError, Unavailable)
LOANS_MAX = 16  # volumes one borrower may hold of one node at once
ABANDON_TIMEOUT = 10.0  # seconds a worker tries to have a failed upload cleaned up


# -- the parent's side ------------------------------------------------------------------------


class LoanDesk:
    """The parent's answers to its workers' ``place``, ``commit``, ``abandon``, ``lend`` and
    ``give_back`` frames, for :func:`karma8.net.writepipe.serve_writes`.

    Keeps each version it placed until its commit or abandon, or until ``keep_for`` seconds
    have passed (the worker died between the two: discovery's lease has expired by then).
    """

    def __init__(self, gateway: Gateway, *, keep_for: float) -> None:
        self._gateway = gateway
        self._keep_for = keep_for
        self._placed: dict[str, tuple[float, FileVersion]] = {}
        self._loans: dict[tuple[str, str], int] = {}  # (borrower, node id): volumes lent

    def ops(self) -> dict[str, Handler]:
        return {
            "place": self._guarded(self._place),
            "commit": self._guarded(self._commit),
            "abandon": self._guarded(self._abandon),
            "lend": self._guarded(self._lend),
            "give_back": self._guarded(self._give_back),
        }

    @property
    def placed(self) -> int:
        """Versions placed for workers and not yet committed or abandoned."""
        return len(self._placed)

    def _guarded(self, op: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]) -> Handler:
        async def handle(request: dict[str, Any], _: bytes) -> dict[str, Any]:
            given = request.get("request_id")
            token = requestlog.current.set(
                requestlog.accept_request_id(given if isinstance(given, str) else None)
            )
            try:
                return await op(request)
            except Karma8Error as exc:
                return error_body(exc)
            except Exception:  # as the HTTP routes answer it: a 500, and this process goes on
                log.exception("a gateway worker's %s failed", request.get("op"))
                return INTERNAL_ERROR
            finally:
                requestlog.current.reset(token)

        return handle

    async def _place(self, request: dict[str, Any]) -> dict[str, Any]:
        version = await self._gateway.place_held(
            _text(request, "namespace"),
            _text(request, "name"),
            _number(request, "size"),
            if_absent=request.get("if_absent") is True,
        )
        now = time.monotonic()
        for version_id, (at, _) in list(self._placed.items()):
            if now - at < self._keep_for:
                break  # in placing order: the rest are younger
            del self._placed[version_id]
        self._placed[version.version_id] = (now, version)
        return {"placed": encode(version)}

    def _take(self, request: dict[str, Any]) -> FileVersion:
        kept = self._placed.pop(_text(request, "id"), None)
        if kept is None:
            raise Unavailable("the upload's placement is unknown here, or expired")
        return kept[1]

    async def _commit(self, request: dict[str, Any]) -> dict[str, Any]:
        try:  # the whole frame read before the placement is taken
            borrower = _text(request, "borrower")
            size = _number(request, "size")
            raw = request.get("written")
            if not isinstance(raw, list):
                raise InvalidRequest("a commit without its needles")
            needles = [(_int(item, 0), _int(item, 1), _int(item, 2), _hex(item)) for item in raw]
        except InvalidRequest:
            with suppress(InvalidRequest):  # no id either: nothing to abandon
                await self._abandon(request)
            raise
        version = self._take(request)
        if len(needles) != len(version.parts):
            await self._gateway.abandon(version)
            raise InvalidRequest("a commit without a needle for every part placed")
        written = [
            Appended(volume=volume, offset=offset, key=placement.key, length=length, sha256=sha)
            for placement, (volume, offset, length, sha) in zip(version.parts, needles, strict=True)
        ]
        try:
            receipts = await self._gateway.adopt_written(
                version, written, borrower=borrower, size=size
            )
        except AGAIN as exc:  # cleaned up; the worker sends the body to be stored instead
            return {**error_body(exc), "again": True}
        stored = await self._gateway.commit_written(
            version, receipts, size=size, if_absent=request.get("if_absent") is True
        )
        return stored_answer(stored)

    async def _abandon(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            version = self._take(request)
        except Unavailable:
            return OK  # committed, abandoned or expired already
        await self._gateway.abandon(version)
        return OK

    async def _lend(self, request: dict[str, Any]) -> dict[str, Any]:
        node, borrower = _node(request), _text(request, "borrower")
        held = self._loans.get((borrower, node.node_id), 0)
        if held >= LOANS_MAX:
            raise Unavailable(f"{borrower} holds {held} volumes of node {node.node_id} already")
        loan = await self._gateway.lend_volume(node, borrower)
        self._loans[borrower, node.node_id] = held + 1
        return {
            "loan": {
                "volume": loan.volume,
                "salt": loan.salt.hex(),
                "path": str(loan.path),
                "start": loan.start,
            }
        }

    async def _give_back(self, request: dict[str, Any]) -> dict[str, Any]:
        node, borrower = _node(request), _text(request, "borrower")
        await self._gateway.give_back_volume(
            node, borrower, _number(request, "volume"), _number(request, "end")
        )
        self._loans[borrower, node.node_id] = max(
            0, self._loans.get((borrower, node.node_id), 1) - 1
        )
        return OK


def _text(request: dict[str, Any], field: str) -> str:
    value = request.get(field)
    if not isinstance(value, str):
        raise InvalidRequest(f"a frame without {field}")
    return value


def _number(request: dict[str, Any], field: str) -> int:
    value = request.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidRequest(f"a frame without {field}")
    return value


def _int(item: object, at: int) -> int:
    if not isinstance(item, list) or len(item) != 4:
        raise InvalidRequest("a needle is [volume, offset, length, sha256]")
    value = item[at]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidRequest("a needle's volume, offset and length are counts")
    return value


def _hex(item: list[Any]) -> str:
    value = item[3]
    if not isinstance(value, str) or len(value) != 64:
        raise InvalidRequest("a needle's sha256 is 64 hex digits")
    return value


def _node(request: dict[str, Any]) -> NodeRef:
    return NodeRef(node_id=_text(request, "node"), url=_text(request, "url"))


# -- the worker's side ------------------------------------------------------------------------


class WorkerWrites:
    """A gateway worker's small uploads, their parts written here (see the module).

    ``local``: the ids of the nodes whose volumes this process can write (its parent's, on
    this host); ``volume_size``: where a borrowed volume is full; ``stripe`` and
    ``part_max``: the stripe the parts are cut by and ``small_part_max``, past which a part
    is not packed (such an upload's body goes to the parent, as every large one's does).
    """

    def __init__(
        self,
        parent: ParentWrites,
        *,
        local: Collection[str],
        volume_size: int,
        stripe: StripeLayout,
        part_max: int,
    ) -> None:
        self._parent = parent
        self._stripe = stripe
        self._part_max = part_max
        self._local = frozenset(local)
        self._volume_size = volume_size
        self.borrower = f"gateway-worker-{os.getpid()}"
        self._volumes: dict[str, BorrowedVolume] = {}  # by node id: where parts go now
        self._full: list[tuple[NodeRef, BorrowedVolume]] = []  # to give back once idle
        self._lending: dict[str, trio.Lock] = {}
        self._groups = SyncGroups()
        self._sync_of: dict[str, GroupSync] = {}  # by node id: the rounds its volumes sync in
        self.written = 0  # uploads whose parts this process wrote

    async def put(
        self, namespace: str, name: str, data: bytes, *, if_absent: bool
    ) -> StoredVersion:
        """The version ``data`` was stored as; raises what storing it raised.

        Raises:
            ParentUnreachable: Nothing was sent (no parent): the caller may store it itself.
        """
        if max(self._stripe.part_sizes(len(data))) > self._part_max:
            # Parts a node would not pack (its file engine's): the parent stores the body.
            return await self._parent.put(namespace, name, data, if_absent=if_absent)
        request_id = requestlog.current.get()
        answer = await self._parent.call(
            {
                "op": "place",
                "namespace": namespace,
                "name": name,
                "size": len(data),
                "if_absent": if_absent,
                "request_id": request_id,
            }
        )
        raise_error(answer)
        version = decode(answer.get("placed"), FileVersion)
        if not {p.node.node_id for p in version.parts} <= self._local:
            await self._abandon(version.version_id)  # a node of another process
            return await self._parent.put(namespace, name, data, if_absent=if_absent)
        # An append stays in flight until its commit is answered: its volume is not given
        # back before the node has adopted (or given up) the needle.
        begun: list[BorrowedVolume] = []
        try:
            try:
                written = await self._write(version, data, begun)
            except Karma8Error as exc:  # no loan, or a write failed: the parent stores it
                await self._abandon(version.version_id)
                log.info("upload %s: %s; stored by the parent", version.version_id, exc)
                return await self._parent.put(namespace, name, data, if_absent=if_absent)
            except BaseException:
                await self._abandon(version.version_id)
                raise
            answer = await self._parent.call(
                {
                    "op": "commit",
                    "id": version.version_id,
                    "size": len(data),
                    "if_absent": if_absent,
                    "borrower": self.borrower,
                    "written": [[w.volume, w.offset, w.length, w.sha256] for w in written],
                    "request_id": request_id,
                }
            )
        finally:
            for volume in begun:
                volume.end_append()
            await self._give_back_idle()
        if answer.get("again") is True:  # a node would not take its part: moved by the parent
            log.info("upload %s: %s; stored by the parent", version.version_id, answer.get("error"))
            return await self._parent.put(namespace, name, data, if_absent=if_absent)
        self.written += 1
        return answered(answer)

    async def _write(
        self, version: FileVersion, data: bytes, begun: list[BorrowedVolume]
    ) -> list[Appended]:
        """Append each part's needle to its node's borrowed volume and wait until all are
        durable (one sync round per file system). Each volume appended to is added to
        ``begun``, whose appends the caller ends."""
        layout = version.layout
        pieces = held_pieces(layout, data)
        steps: list[tuple[GroupSync, Appended, Callable[[], None]]] = []
        for placement in version.parts:
            volume, group = await self._volume_for(placement.node)
            payload = b"".join(pieces[source_of(layout, placement.index)])
            appended, step = volume.begin_append(placement.key, payload)
            begun.append(volume)
            steps.append((group, appended, step))
        errors: list[BaseException | None] = []
        for group in {id(g): g for g, _, _ in steps}.values():
            try:
                errors += await group.run_steps([step for g, _, step in steps if g is group])
            except OSError as exc:  # the round failed: every write with it
                errors.append(exc)
        for error in errors:
            if isinstance(error, OSError):
                raise storage_error(error, "writing a part") from None
            if error is not None:
                raise StorageFailure(f"writing a part failed: {error!r}") from error
        return [appended for _, appended, _ in steps]

    async def _volume_for(self, node: NodeRef) -> tuple[BorrowedVolume, GroupSync]:
        volume = self._volumes.get(node.node_id)
        if volume is None or volume.full:
            lock = self._lending.setdefault(node.node_id, trio.Lock())
            async with lock:
                volume = self._volumes.get(node.node_id)
                if volume is None or volume.full:
                    volume = await self._borrow(node)
        return volume, self._sync_of[node.node_id]

    async def _borrow(self, node: NodeRef) -> BorrowedVolume:
        # Shielded: a loan whose answer was lost would stay lent to nobody until the end.
        with trio.move_on_after(ABANDON_TIMEOUT) as scope:
            scope.shield = True
            answer = await self._parent.call(
                {"op": "lend", "node": node.node_id, "url": node.url, "borrower": self.borrower}
            )
        if scope.cancelled_caught:
            raise Unavailable("the gateway did not lend a volume in time")
        raise_error(answer)
        try:
            raw = answer["loan"]
            loan = Loan(
                volume=int(raw["volume"]),
                salt=bytes.fromhex(str(raw["salt"])),
                path=Path(str(raw["path"])),
                borrower=self.borrower,
                start=int(raw["start"]),
            )
        except (KeyError, TypeError, ValueError):
            raise Unavailable("the gateway's answer to a loan is malformed") from None
        volume = BorrowedVolume(loan, limit=self._volume_size)
        group = self._groups.for_path(loan.path.parent)
        if group is None:  # no syncfs here: appends could not be made durable
            volume.close()
            raise Unavailable("this host cannot sync a borrowed volume")
        old = self._volumes.get(node.node_id)
        if old is not None:
            self._full.append((node, old))
        self._volumes[node.node_id] = volume
        self._sync_of[node.node_id] = group
        return volume

    async def _give_back_idle(self) -> None:
        """Give back the full volumes no append is in flight to any more."""
        idle = [(node, volume) for node, volume in self._full if not volume.in_flight]
        if not idle:
            return
        self._full = [(node, volume) for node, volume in self._full if volume.in_flight]
        with trio.CancelScope(shield=True):
            for node, volume in idle:
                await self._give_back(node, volume)

    async def _give_back(self, node: NodeRef, volume: BorrowedVolume) -> None:
        volume.close()
        try:
            answer = await self._parent.call(
                {
                    "op": "give_back",
                    "node": node.node_id,
                    "url": node.url,
                    "borrower": self.borrower,
                    "volume": volume.loan.volume,
                    "end": volume.end,
                }
            )
            raise_error(answer)
        except Exception as exc:  # the node takes it back at its next start
            log.warning("volume %d of node %s not given back: %s", volume.loan.volume, node, exc)

    async def _abandon(self, version_id: str) -> None:
        with trio.move_on_after(ABANDON_TIMEOUT) as scope:
            scope.shield = True
            try:
                raise_error(await self._parent.call({"op": "abandon", "id": version_id}))
            except Exception as exc:  # the lease expires and the sweeper does the rest
                log.warning("upload %s not abandoned at the gateway: %s", version_id, exc)
        if scope.cancelled_caught:
            log.warning("upload %s not abandoned at the gateway in time", version_id)

    async def samples(self) -> Iterable[Sample]:
        """For ``/metrics`` (each process counts its own)."""
        return [
            (
                "karma8_gateway_written_here",
                "counter",
                "Small uploads whose parts this gateway worker wrote itself, to volumes its"
                " parent's nodes lent it, and its parent committed",
                {},
                self.written,
            ),
            (
                "karma8_gateway_volumes_borrowed",
                "gauge",
                "Volumes this gateway worker holds on loan from its parent's nodes",
                {},
                len(self._volumes) + len(self._full),
            ),
        ]

    async def aclose(self) -> None:
        """Close the borrowed volumes' descriptors. They are not given back: this process
        ends with its parent, whose nodes take every loan back once it has exited."""
        for volume in [*self._volumes.values(), *(v for _, v in self._full)]:
            volume.close()
        self._volumes, self._full = {}, []
        await trio.lowlevel.checkpoint()
