"""The simulated network: endpoints, links with latency and bandwidth, partitions, crashes.

A remote call runs the target actor's handler *in the caller's task*, after a latency hop, and
pays another hop for the reply. There is no task per message: every hop is a sleep on the
world's :class:`~karma8.sim.pump.Pump`, one task waking sleepers from a (time, seq) heap.
Streams (part bodies in either direction) pay transfer time per chunk and fail as soon as
the link breaks or the peer crashes.

A crash cancels every handler the endpoint is running (each runs inside a cancel scope the
endpoint tracks) and its background task; callers see :class:`Unavailable`, just as a real
client sees a reset connection. Errors cross the network by code and message only, so the
caller gets a fresh instance of the same class, never the callee's object.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Generic, TypeVar

import attrs
import trio

from karma8.core.errors import Karma8Error, Unavailable, error_from_code
from karma8.sim.world import World

A = TypeVar("A")
T = TypeVar("T")


@attrs.frozen(kw_only=True)
class LinkConfig:
    latency: tuple[float, float] = (0.0002, 0.002)
    bandwidth: float = 1e9  # bytes per second per stream


@attrs.define
class LinkFault:
    """A degraded link between two endpoints (either direction) until ``until``."""

    a: str
    b: str
    until: float
    extra_latency: float = 0.0
    loss: float = 0.0  # probability that a call or a chunk is lost (the call fails)
    partitioned: bool = False

    def between(self, src: str, dst: str) -> bool:
        return {src, dst} == {self.a, self.b} or (self.b == "*" and self.a in (src, dst))


class Endpoint(Generic[A]):
    """A named actor on the network, which may be down."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.actor: A | None = None
        self.incarnation = 0
        self._handlers: dict[int, trio.CancelScope] = {}
        self._next_handler = 0
        self.background: trio.CancelScope | None = None

    @property
    def up(self) -> bool:
        return self.actor is not None

    def bring_up(self, actor: A) -> None:
        self.actor = actor
        self.incarnation += 1

    def crash(self) -> None:
        """Stop the endpoint at once: cancel its handlers and background task.

        Handlers are only tracked when the network is ``crashable``; set it before traffic.
        """
        self.actor = None
        for scope in list(self._handlers.values()):
            scope.cancel()
        if self.background is not None:
            self.background.cancel()
            self.background = None

    @contextmanager
    def handling(self) -> Iterator[trio.CancelScope]:
        handler_id = self._next_handler
        self._next_handler += 1
        with trio.CancelScope() as scope:
            self._handlers[handler_id] = scope
            try:
                yield scope
            finally:
                del self._handlers[handler_id]


_NOT_TRACKED = nullcontext(None)


class SimNetwork:
    """Routes calls between endpoints through simulated links."""

    def __init__(self, world: World, config: LinkConfig) -> None:
        self._world = world
        self._config = config
        self._rng: random.Random = world.rng("network")
        self._endpoints: dict[str, Endpoint[object]] = {}
        self.faults: list[LinkFault] = []
        self.calls = 0
        # Tracking handlers costs a cancel scope per call; only needed if endpoints can crash.
        self.crashable = False

    def endpoint(self, name: str) -> Endpoint[object]:
        if name not in self._endpoints:
            self._endpoints[name] = Endpoint(name)
        return self._endpoints[name]

    def _link_faults(self, src: str, dst: str) -> list[LinkFault]:
        if not self.faults:
            return []
        now = trio.current_time()
        self.faults = [f for f in self.faults if f.until > now]
        return [f for f in self.faults if f.between(src, dst)]

    async def hop(
        self, src: str, dst: str, what: str, nbytes: int = 0, *, latency: bool = True
    ) -> None:
        """One message from ``src`` to ``dst``: latency, transfer time, faults.

        Chunks of a stream pay only transfer time (``latency=False``): they are pipelined.
        """
        lo, hi = self._config.latency
        delay = nbytes / self._config.bandwidth
        if latency:
            delay += self._rng.uniform(lo, hi)
        for fault in self._link_faults(src, dst):
            if fault.partitioned:
                await self._world.sleep(delay)
                raise Unavailable(f"{dst} is unreachable from {src}")
            delay += fault.extra_latency
            if fault.loss and self._rng.random() < fault.loss:
                await self._world.sleep(delay)
                raise Unavailable(f"the connection from {src} to {dst} was lost")
        await self._world.sleep(delay)

    async def transfer(self, src: str, dst: str, nbytes: int) -> None:
        """A chunk of a stream: transfer time only (chunks are pipelined behind the first).

        A transfer shorter than the pump's tick costs no sleep at all unless the link is
        faulty: the consumer's channel receive is already a scheduling point, and skipping
        the sleep keeps small-file simulation fast.
        """
        if self.faults or nbytes / self._config.bandwidth >= self._world.pump.tick:
            await self.hop(src, dst, "chunk", nbytes, latency=False)

    async def call(self, src: str, dst: str, op: str, fn: Callable[[A], Awaitable[T]]) -> T:
        """Run ``fn(actor)`` on endpoint ``dst`` as a remote call from ``src``."""
        self.calls += 1
        self._world.record(f"{src}>{dst} {op}")
        caller = self._endpoints.get(src)
        if caller is not None and caller.incarnation and not caller.up:
            raise Unavailable(f"{src} is down")  # a dead process sends nothing
        await self.hop(src, dst, op)
        endpoint: Endpoint[A] = self.endpoint(dst)  # type: ignore[assignment]
        actor = endpoint.actor
        if actor is None:
            self._world.record(f"{src}>{dst} {op} refused")
            raise Unavailable(f"{dst} is down")
        error: Karma8Error | None = None
        result: T | None = None
        with endpoint.handling() if self.crashable else _NOT_TRACKED as scope:
            try:
                result = await fn(actor)
            except Karma8Error as exc:
                # Rebuilt from code and message, as if it came over the wire.
                error = error_from_code(exc.code, exc.message)
        if scope is not None and scope.cancelled_caught:
            self._world.record(f"{src}>{dst} {op} crashed")
            raise Unavailable(f"{dst} crashed during {op}")
        await self.hop(dst, src, f"{op} reply")
        self._world.record(f"{dst}>{src} {op} {'error ' + error.code if error else 'ok'}")
        if error is not None:
            raise error
        return result  # type: ignore[return-value]

    def stream(
        self, src: str, dst: str, source: AsyncIterable[bytes], *, peer: str | None = None
    ) -> AsyncIterator[bytes]:
        """``source`` as seen across the link; fails if the link or ``peer`` goes down."""
        return _LinkStream(self, src, dst, source, self.endpoint(peer or dst))


class _LinkStream:
    """An async iterator (not a generator: no finalisation surprises under cancellation)."""

    def __init__(
        self,
        network: SimNetwork,
        src: str,
        dst: str,
        source: AsyncIterable[bytes],
        watched: Endpoint[object],
    ) -> None:
        self._network = network
        self._src = src
        self._dst = dst
        self._source = aiter(source)
        self._watched = watched
        self._incarnation = watched.incarnation

    def __aiter__(self) -> _LinkStream:
        return self

    async def __anext__(self) -> bytes:
        chunk = await anext(self._source)
        await self._network.transfer(self._src, self._dst, len(chunk))
        if not self._watched.up or self._watched.incarnation != self._incarnation:
            raise Unavailable(f"{self._watched.name} went down mid-stream")
        return chunk
