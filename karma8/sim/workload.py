"""Simulated clients and the reference model of what they were told.

Clients pick operations from the scenario's mix on a shared pool of names, so PUTs, GETs and
DELETEs of one name overlap. File contents are derived from the client's random stream and are
identified by their SHA-256; a read is judged by its digest, so a torn or mixed file (bytes of
two versions, or a part missing) can never pass for a stored one.

The history records, per operation, its start and end in virtual time and its outcome. The
checker judges every read against that history (see :func:`read_violation`): a read may return
the value of any write that could have taken effect and was not already superseded by a write
that completed before the read began.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import attrs
import trio

from karma8.actors.gateway import Gateway
from karma8.core.errors import Karma8Error, NotFound, Unavailable
from karma8.sim.network import SimNetwork
from karma8.sim.scenario import WorkloadSpec
from karma8.sim.world import World

NAMESPACE = "default"
GATEWAY = "gateway"


@attrs.define(kw_only=True)
class Op:
    """One client operation as the reference model saw it."""

    kind: str  # "put", "delete" or "get"
    name: str
    start: float
    end: float = 0.0
    value: str | None = None  # put: digest written; get: digest read (None = not found)
    ok: bool = False
    maybe: bool = False  # failed with an unknown outcome (could have taken effect)
    error: str | None = None
    size: int = 0

    @property
    def could_apply(self) -> bool:
        return self.kind in ("put", "delete") and (self.ok or self.maybe)


@attrs.define
class History:
    ops: list[Op] = attrs.Factory(list)
    by_name: dict[str, list[Op]] = attrs.Factory(dict)
    # Told of each operation as it starts and as it ends (karma8.sim.monitor watches them).
    on_start: Callable[[Op], None] | None = None
    on_end: Callable[[Op], None] | None = None

    def add(self, op: Op) -> Op:
        """Record ``op`` as started now."""
        self.ops.append(op)
        self.by_name.setdefault(op.name, []).append(op)
        if self.on_start is not None:
            self.on_start(op)
        return op

    def end(self, op: Op) -> None:
        """Record ``op`` as answered now (its outcome fields set)."""
        op.end = trio.current_time()
        if self.on_end is not None:
            self.on_end(op)

    def failures(self) -> Counter[str]:
        return Counter(f"{op.kind}:{op.error}" for op in self.ops if op.error)


def read_violation(history: History, read: Op) -> str | None:
    """Why ``read`` is not a value the register could have held, or None if it is fine."""
    writes = [w for w in history.by_name.get(read.name, []) if w.could_apply]
    completed_before = [w for w in writes if w.ok and w.end < read.start]
    candidates: set[str | None] = set()
    if not completed_before:
        candidates.add(None)  # nothing certainly written yet: not found is possible
    for w in writes:
        if w.start >= read.end:
            continue  # began after the read ended
        superseded = any(y.start > w.end and y.end < read.start for y in completed_before)
        if not superseded:
            candidates.add(w.value)
    if read.value in candidates:
        return None
    got = "not found" if read.value is None else f"sha256 {read.value[:12]}"
    return (
        f"read of {read.name} at t={read.start:.6f}..{read.end:.6f} returned {got},"
        f" which no write could have left there ({len(writes)} writes to the name)"
    )


async def collect(stream: AsyncIterator[bytes]) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    async for chunk in stream:
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


async def read_file(network: SimNetwork, client: str, name: str) -> tuple[str | None, int]:
    """GET ``name`` through the simulated network; (digest, size) or (None, 0) if absent."""

    async def op(gw: Gateway) -> tuple[str | None, int]:
        try:
            version = await gw.stat(NAMESPACE, name)
        except NotFound:
            return None, 0
        async with gw.open_read(version) as stream:
            return await collect(network.stream(GATEWAY, client, stream, peer=GATEWAY))

    return await network.call(client, GATEWAY, f"get {name}", op)


class Client:
    """One simulated HTTP client."""

    def __init__(
        self,
        *,
        index: int,
        world: World,
        network: SimNetwork,
        spec: WorkloadSpec,
        history: History,
    ) -> None:
        self.name = f"client-{index}"
        self._world = world
        self._net = network
        self._spec = spec
        self._history = history
        self._rng: random.Random = world.rng(self.name)

    def _pick(self) -> str:
        spec = self._spec
        return self._rng.choices(
            ("put", "get", "delete"), weights=(spec.put, spec.get, spec.delete)
        )[0]

    def _file_name(self) -> str:
        i = self._rng.randrange(self._spec.names)
        return f"dir{i % 7}/file-{i:05d}"

    async def run(self, until: float) -> None:
        lo, hi = self._spec.think_time
        while trio.current_time() < until:
            await self._world.sleep(self._rng.uniform(lo, hi))
            if trio.current_time() >= until:
                break
            kind = self._pick()
            name = self._file_name()
            if kind == "put":
                await self.put(name)
            elif kind == "get":
                await self.get(name)
            else:
                await self.delete(name)

    async def put(self, name: str) -> Op:
        size = self._rng.randint(*self._spec.file_size)
        data = self._rng.randbytes(size)
        op = self._history.add(
            Op(
                kind="put",
                name=name,
                start=trio.current_time(),
                size=size,
                value=hashlib.sha256(data).hexdigest(),
            )
        )
        body = self._net.stream(self.name, GATEWAY, BytesChunks(data))

        async def call(gw: Gateway) -> None:
            await gw.put(NAMESPACE, name, body, content_length=size)

        await self._finish(op, call)
        return op

    async def get(self, name: str) -> Op:
        op = self._history.add(Op(kind="get", name=name, start=trio.current_time()))
        try:
            op.value, op.size = await read_file(self._net, self.name, name)
            op.ok = True
        except Karma8Error as exc:
            op.error = exc.code
        self._history.end(op)
        return op

    async def delete(self, name: str) -> Op:
        op = self._history.add(Op(kind="delete", name=name, start=trio.current_time()))

        async def call(gw: Gateway) -> None:
            await gw.delete(NAMESPACE, name)

        await self._finish(op, call)
        return op

    async def _finish(self, op: Op, call: Callable[[Gateway], Awaitable[None]]) -> None:
        try:
            await self._net.call(self.name, GATEWAY, f"{op.kind} {op.name}", call)
            op.ok = True
        except Unavailable as exc:
            op.error = exc.code
            op.maybe = True  # the request may have been carried out; the answer was lost
        except Karma8Error as exc:
            op.error = exc.code
        self._history.end(op)


class BytesChunks:
    """``data`` as an async stream of ``size``-byte chunks.

    A class rather than an async generator: a PUT that fails leaves it unfinished, and an
    abandoned generator would need a finaliser task (and trio warns about it).
    """

    def __init__(self, data: bytes, size: int = 64 * 1024) -> None:
        self._data = data
        self._size = size
        self._pos = 0

    def __aiter__(self) -> BytesChunks:
        return self

    async def __anext__(self) -> bytes:
        if self._pos >= len(self._data):
            raise StopAsyncIteration
        await trio.lowlevel.checkpoint()
        start, self._pos = self._pos, self._pos + self._size
        return self._data[start : self._pos]
