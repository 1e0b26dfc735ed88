"""Repair: rebuilds lost parts of redundant files on other nodes, through the mover.

A part is lost when its node reported it corrupt (the scrubber) or missing (its parts
check), a reader found it so, or its node has been unavailable for ``repair_after`` seconds.
Every ``interval`` (or when asked) the repairer asks discovery to record moves for the lost
parts it may repair now (:meth:`karma8.ports.RebalanceAPI.begin_repairs`): each onto the
emptiest available node that holds no part of its version. It then rebuilds each part from
the version's other parts, exactly as a degraded read does (another copy for raid1, a
Reed-Solomon rebuild for parity: :mod:`karma8.actors.reads`), streams it to the target,
and finishes the move, which checks the target's checksum against the one recorded at
upload and switches the part row in one transaction. A part whose version has too few
readable parts to rebuild it from is not tried (discovery does not count it due): the
repairer says so once, again when their number changes, and every ``REMIND`` seconds while
it stays, until a node holding parts of their files returns. A rebuild that fails is
aborted and its bytes on the target are deleted like any failed move's; one that dies with
this process runs out of its lease. Rebuilds share a byte budget (``bandwidth``) with each other.

It runs beside discovery and the rebalancer (one process: the rebalancer's moves and
repair's never take the same part at once, discovery refuses the second).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter

import attrs
import trio

from karma8.actors.reads import PartCursor, RebuiltPart, RedundantCursor, Sources, file_of
from karma8.actors.throttle import Throttle
from karma8.core.errors import IntegrityError, Karma8Error, MoveConflict, Unavailable
from karma8.core.model import Repair, RepairStatus
from karma8.core.tomlconf import TableReader
from karma8.ports import RebalanceAPI, StorageAPI

log = logging.getLogger("karma8.repair")

# Seconds between reminders that the same lost parts still cannot be rebuilt.
REMIND = 3600.0


@attrs.frozen(kw_only=True)
class RepairConfig:
    """Repair's tunables (seconds, bytes)."""

    enabled: bool = True
    interval: float = 10.0
    # A node unavailable this long has its parts rebuilt elsewhere (reported losses go at
    # once). Long enough that a restart or a short network cut moves nothing.
    repair_after: float = 900.0
    bandwidth: float = 64 * 2**20  # bytes/s for all rebuilds together; 0: unthrottled
    concurrency: int = 4
    batch: int = 64  # parts recorded per round
    move_lease: float = 300.0
    # A source part's node that does not answer within this is read around, as in a GET.
    read_deadline: float = 5.0


def read_repair(r: TableReader, defaults: RepairConfig) -> RepairConfig:
    """A ``[repair]`` TOML table (a scenario's or a net config's), checked strictly."""
    config = RepairConfig(
        enabled=r.boolean("enabled", defaults.enabled),
        interval=r.number("interval", defaults.interval, minimum=0.001),
        repair_after=r.number("repair_after", defaults.repair_after, minimum=0.0),
        bandwidth=float(r.size("bandwidth", int(defaults.bandwidth))),
        concurrency=r.integer("concurrency", defaults.concurrency, minimum=1),
        batch=r.integer("batch", defaults.batch, minimum=1),
        move_lease=r.number("move_lease", defaults.move_lease, minimum=0.001),
        read_deadline=r.number("read_deadline", defaults.read_deadline, minimum=0.001),
    )
    r.finish()
    return config


class Repairer:
    """Rebuilds lost parts of redundant files; see the module docstring."""

    def __init__(self, *, discovery: RebalanceAPI, storage: StorageAPI, config: RepairConfig):
        self._discovery = discovery
        self._storage = storage
        self.config = config
        self._requested = trio.Event()
        self._active = False
        # The last pass found due parts but recorded no repair: no node may take them.
        self._unplaced = False
        self._throttle = Throttle(config.bandwidth)
        # Reads of source parts that failed, by node: (node id, "read") -> count.
        self.source_failures: Counter[tuple[str, str]] = Counter()
        # Lost parts that could not be rebuilt when last told, and when (trio time).
        self._unrebuildable = 0
        self._told_at = 0.0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Repair every ``interval`` (or when asked) until cancelled."""
        task_status.started()
        while True:
            with trio.move_on_after(self.config.interval):
                await self._requested.wait()
            forced = self._requested.is_set()
            self._requested = trio.Event()
            if not (self.config.enabled or forced):
                continue
            try:
                await self.repair()
            except Karma8Error as exc:
                log.warning("repair stopped: %s", exc)

    def request(self) -> None:
        """Look for lost parts now."""
        self._requested.set()

    async def repair(self) -> int:
        """Record and carry out rounds of repairs until none is due or none succeeds;
        returns the bytes rebuilt."""
        rebuilt = 0
        self._active = True
        try:
            await self._tell_unrebuildable()
            while True:
                repairs = await self._discovery.begin_repairs(
                    repair_after=self.config.repair_after,
                    limit=self.config.batch,
                    lease=self.config.move_lease,
                )
                self._unplaced = not repairs
                if not repairs:
                    return rebuilt
                done = await self._carry_out_all(repairs)
                if not done:
                    return rebuilt  # every rebuild failed (too many sources lost): try later
                rebuilt += sum(repair.ticket.size for repair in done)
        finally:
            self._active = False

    async def status(self) -> RepairStatus:
        status = await self._discovery.repair_status(repair_after=self.config.repair_after)
        waiting = status.due_parts if self._unplaced and not self._active else 0
        return attrs.evolve(
            status,
            active=self._active,
            rate_bytes_per_s=self._throttle.rate(),
            waiting_parts=waiting,
        )

    async def _tell_unrebuildable(self) -> None:
        """Log the lost parts that cannot be rebuilt now when their number changes (and
        every ``REMIND`` seconds while it stays): not one warning per part and pass."""
        status = await self._discovery.repair_status(repair_after=self.config.repair_after)
        count, now = status.unrebuildable_parts, trio.current_time()
        if count == self._unrebuildable and not (count and now - self._told_at >= REMIND):
            return
        if count:
            log.warning(
                "%d lost part%s cannot be rebuilt: too few readable parts of their file;"
                " they wait for a node to return",
                count,
                "" if count == 1 else "s",
            )
        else:
            log.info("no lost part is left that cannot be rebuilt")
        self._unrebuildable, self._told_at = count, now

    async def _carry_out_all(self, repairs: list[Repair]) -> list[Repair]:
        """The repairs that succeeded, ``concurrency`` at a time."""
        done: list[Repair] = []
        limit = trio.Semaphore(self.config.concurrency)

        async def one(repair: Repair) -> None:
            async with limit:
                if await self._carry_out(repair):
                    done.append(repair)

        async with trio.open_nursery() as nursery:
            for repair in repairs:
                nursery.start_soon(one, repair)
        return done

    async def _carry_out(self, repair: Repair) -> bool:
        """Rebuild one part on its target and switch to it; abort the move on any failure."""
        ticket = repair.ticket
        try:
            await self._throttle.wait(ticket.size)
            with trio.move_on_after(self.config.move_lease / 2) as deadline:
                checksum = await self._rebuild(repair)
            if deadline.cancelled_caught:
                raise Unavailable(f"rebuilding {ticket.key} took longer than half its lease")
            await self._discovery.finish_move(
                key=ticket.key, target=ticket.target.node_id, checksum=checksum
            )
        except Karma8Error as exc:
            log.log(
                logging.INFO if isinstance(exc, MoveConflict) else logging.WARNING,
                "repairing %s on %s failed: %s",
                ticket.key,
                ticket.target.node_id,
                exc,
            )
            with trio.CancelScope(shield=True), contextlib.suppress(Karma8Error):
                await self._discovery.abort_move(key=ticket.key)  # else its lease ends it
            return False
        self._throttle.done(ticket.size)
        log.info("repaired %s on %s", ticket.key, ticket.target.node_id)
        return True

    async def _rebuild(self, repair: Repair) -> str:
        """Stream the lost part, read around or rebuilt, to the target; the checksum of
        what landed there."""
        ticket, version, slot = repair.ticket, repair.version, repair.slot
        size = ticket.size
        sources = Sources(self._storage, version, self.config.read_deadline, self.source_failures)
        sources.failed.add(slot)  # never read from the copy that is lost
        try:
            part = version.layout.data_part(slot)
            cursor: PartCursor | RedundantCursor
            if part is None:  # a parity part: coded again from the data
                rebuilt = RebuiltPart(sources, slot, 0, size)
                cursor = PartCursor(version.parts[slot], rebuilt, size, file_of(version))
            else:
                cursor = await RedundantCursor.open(sources, part, 0, size)
            stored = await self._storage.put_part(
                ticket.target, ticket.key, _Chunks(cursor, size), size=size
            )
        finally:
            await sources.aclose()
        if stored.size != size or stored.checksum != ticket.checksum:
            raise IntegrityError(f"the rebuilt {ticket.key} on {ticket.target.node_id} differs")
        return stored.checksum


class _Chunks:
    """A cursor's ``size`` bytes as chunks (an iterator class, not a generator: a write given
    up half-way leaves nothing for a finaliser)."""

    def __init__(self, cursor: PartCursor | RedundantCursor, size: int) -> None:
        self._cursor = cursor
        self._left = size

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        if self._left == 0:
            raise StopAsyncIteration
        piece = await self._cursor.read(min(self._left, RebuiltPart.BLOCK))
        self._left -= len(piece)
        return piece
