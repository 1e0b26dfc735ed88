"""The rebalancer: moves parts from nodes above their fill target to nodes below it.

It runs beside discovery (in its process, in the simulator on its endpoint, so it dies with
it) and talks to it through :class:`karma8.ports.RebalanceAPI`; parts travel through
:class:`karma8.ports.StorageAPI` like a gateway's. Every ``interval`` it asks for the fill
status and, when the node furthest from its target is more than ``start_pp`` off (or an
operator asked, :meth:`Rebalancer.request`), works through plans until none is left.

A move is: record it (a lease), stream the part from the source to the target, check the
copy's checksum, switch the metadata; discovery keeps the source's copy for readers until its
grace ends. A move that fails at any step is aborted and whatever reached the target is
deleted like garbage; one that dies with this process runs out of its lease and discovery
aborts it. So a crash at any point leaves the part readable where the metadata says, and the
next round plans again from what is. Copies share a byte budget (``bandwidth``, bytes/s), so
moving never takes a cluster's disks or network from its clients.
"""

from __future__ import annotations

import contextlib
import logging

import attrs
import trio

from karma8.actors.throttle import Throttle
from karma8.core.errors import IntegrityError, Karma8Error, MoveConflict, Unavailable
from karma8.core.model import MoveTicket, RebalanceStatus
from karma8.core.rebalance import Move, RebalancePlan
from karma8.core.tomlconf import TableReader
from karma8.ports import RebalanceAPI, StorageAPI

log = logging.getLogger("karma8.rebalancer")


@attrs.frozen(kw_only=True)
class RebalancerConfig:
    """The rebalancer's tunables (seconds, bytes, percentage points)."""

    enabled: bool = True
    interval: float = 10.0
    # Start on its own when a node is this far from its fill target ...
    start_pp: float = 1.0
    # ... and plan until every node is within this of it (more than a part's share of a node).
    tolerance_pp: float = 0.25
    bandwidth: float = 64 * 2**20  # bytes/s for all copies together; 0: unthrottled
    concurrency: int = 4
    # Parts of each over-filled node considered per plan, and bytes per plan.
    batch: int = 256
    round_bytes: int = 1 << 30
    # A move must finish within its lease, or discovery aborts it (its mover died).
    move_lease: float = 300.0


def read_rebalance(r: TableReader, defaults: RebalancerConfig) -> RebalancerConfig:
    """A ``[rebalance]`` TOML table (a scenario's or a net config's), checked strictly."""
    config = RebalancerConfig(
        enabled=r.boolean("enabled", defaults.enabled),
        interval=r.number("interval", defaults.interval, minimum=0.001),
        start_pp=r.number("start_pp", defaults.start_pp),
        tolerance_pp=r.number("tolerance_pp", defaults.tolerance_pp, minimum=0.001),
        bandwidth=float(r.size("bandwidth", int(defaults.bandwidth))),
        concurrency=r.integer("concurrency", defaults.concurrency, minimum=1),
        batch=r.integer("batch", defaults.batch, minimum=1),
        round_bytes=r.size("round_bytes", defaults.round_bytes, minimum=1),
        move_lease=r.number("move_lease", defaults.move_lease, minimum=0.001),
    )
    r.finish()
    return config


class Rebalancer:
    """Evens out the nodes' fill by moving parts; see the module docstring."""

    def __init__(
        self, *, discovery: RebalanceAPI, storage: StorageAPI, config: RebalancerConfig
    ) -> None:
        self._discovery = discovery
        self._storage = storage
        self.config = config
        self._requested = trio.Event()
        self._active = False
        self._throttle = Throttle(config.bandwidth)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check the fill every ``interval`` (or when asked) and rebalance; until cancelled."""
        task_status.started()
        while True:
            with trio.move_on_after(self.config.interval):
                await self._requested.wait()
            forced = self._requested.is_set()
            self._requested = trio.Event()
            if not (self.config.enabled or forced):
                continue
            try:
                status = await self._discovery.rebalance_status()
                if forced or status.imbalance_pp > self.config.start_pp:
                    await self.rebalance()
            except Karma8Error as exc:
                log.warning("rebalancing stopped: %s", exc)

    def request(self) -> None:
        """Rebalance now, whatever the threshold (``karma8 rebalance``)."""
        self._requested.set()

    async def plan(
        self, *, gave: frozenset[str] = frozenset(), took: frozenset[str] = frozenset()
    ) -> RebalancePlan:
        """The next round's moves, without making them (``karma8 rebalance --dry-run``);
        nodes that ``gave`` parts in earlier rounds only give, those that ``took`` only take."""
        return await self._discovery.plan_rebalance(
            tolerance_pp=self.config.tolerance_pp,
            batch=self.config.batch,
            max_bytes=self.round_bytes,
            no_donors=took,
            no_receivers=gave,
        )

    async def rebalance(self) -> int:
        """Plan and move until a plan comes back empty or moves nothing; returns bytes moved.

        A node keeps the role it had in the first round it moved in (giving or taking), so
        writes landing meanwhile never make a byte move back within one rebalancing."""
        moved = 0
        gave: set[str] = set()
        took: set[str] = set()
        self._active = True
        try:
            while True:
                plan = await self.plan(gave=frozenset(gave), took=frozenset(took))
                if not plan.moves:
                    return moved
                gave.update(m.source for m in plan.moves)
                took.update(m.target for m in plan.moves)
                done = await self._move_all(plan.moves)
                if done == 0:
                    return moved  # nothing could move (every target refused): try next time
                moved += done
        finally:
            self._active = False

    @property
    def round_bytes(self) -> int:
        """Bytes per round: about one ``interval`` of copying, so each plan starts from
        targets that writes have not moved far, and at most ``round_bytes``."""
        if self.config.bandwidth <= 0:
            return self.config.round_bytes
        return max(
            1, min(self.config.round_bytes, int(self.config.bandwidth * self.config.interval))
        )

    async def status(self) -> RebalanceStatus:
        """Discovery's view of the fill, with this mover's rate and an estimate of the rest:
        only while parts move (the rate of past moves decays, but is not 0 for long after
        them: an estimate from it then would be a number about nothing)."""
        status = await self._discovery.rebalance_status()
        rate = self._throttle.rate()
        moving = self._active or status.moving_parts > 0
        eta = status.remaining_bytes / rate if rate > 0 and moving else None
        if status.remaining_bytes == 0:
            eta = 0.0
        return attrs.evolve(status, rate_bytes_per_s=rate, eta_seconds=eta, active=self._active)

    async def _move_all(self, moves: tuple[Move, ...]) -> int:
        """Record every move of a round first (placement then sees the bytes coming to each
        target and sends new files elsewhere), then copy them, ``concurrency`` at a time."""
        tickets = []
        for move in moves:
            try:
                tickets.append(await self._discovery.begin_move(move, lease=self.config.move_lease))
            except Karma8Error as exc:
                log.info("not moving %s: %s", move.key, exc)
        moved = 0
        limit = trio.Semaphore(max(1, self.config.concurrency))

        async def one(ticket: MoveTicket) -> None:
            nonlocal moved
            async with limit:
                if await self._carry_out(ticket):
                    moved += ticket.size

        async with trio.open_nursery() as nursery:
            for ticket in tickets:
                nursery.start_soon(one, ticket)
        return moved

    async def _carry_out(self, ticket: MoveTicket) -> bool:
        """Copy a recorded move's part and switch to it; abort the move on any failure."""
        target = ticket.target.node_id
        try:
            await self._throttle.wait(ticket.size)
            checksum = await self._copy(ticket)
            await self._discovery.finish_move(key=ticket.key, target=target, checksum=checksum)
        except Karma8Error as exc:
            # A file overwritten or deleted while its part moved is an expected race.
            log.log(
                logging.INFO if isinstance(exc, MoveConflict) else logging.WARNING,
                "moving %s from %s to %s failed: %s",
                ticket.key,
                ticket.source.node_id,
                target,
                exc,
            )
            with trio.CancelScope(shield=True), contextlib.suppress(Karma8Error):
                await self._discovery.abort_move(key=ticket.key)  # else its lease ends it
            return False
        self._throttle.done(ticket.size)
        return True

    async def _copy(self, ticket: MoveTicket) -> str:
        """Stream the part from its source to the target; the checksum of what landed."""
        with trio.move_on_after(self.config.move_lease / 2) as deadline:
            async with self._storage.read_part(
                ticket.source, ticket.key, offset=0, length=ticket.size, checksum=ticket.checksum
            ) as chunks:
                stored = await self._storage.put_part(
                    ticket.target, ticket.key, chunks, size=ticket.size
                )
        if deadline.cancelled_caught:
            raise Unavailable(f"copying {ticket.key} took longer than half its lease")
        if stored.size != ticket.size or stored.checksum != ticket.checksum:
            raise IntegrityError(f"the copy of {ticket.key} on {ticket.target.node_id} differs")
        return stored.checksum
