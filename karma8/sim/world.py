"""The simulated world's shared services: seed, random streams, time, ids and the trace.

One root seed drives everything. Each subsystem draws from its own named stream
(``world.rng("network")``), so adding a draw in one subsystem does not shift the numbers
another one sees. Every observable step is appended to the trace; the trace's SHA-256 is the
run's fingerprint (same scenario and seed, same fingerprint, in any process).
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from collections.abc import Callable
from typing import TypeVar

import trio

from karma8.sim.pump import Pump

T = TypeVar("T")

# Virtual wall-clock time starts at a fixed instant so that timestamps in metadata are
# deterministic too (2026-01-01T00:00:00Z).
EPOCH = 1_767_225_600.0


class SimClock:
    """:class:`karma8.ports.Clock` on trio's (mock) clock."""

    def now(self) -> float:
        return EPOCH + trio.current_time()


class SimIds:
    """:class:`karma8.ports.IdSource` from a seeded stream."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._versions = 0

    def new_id(self) -> str:
        return f"{self._rng.getrandbits(64):016x}"

    def new_version_id(self) -> str:
        self._versions += 1  # in creation order, as in net mode (no wall clock here)
        return f"{self._versions:013x}{self._rng.getrandbits(32):08x}"


class InlineRunner:
    """:class:`karma8.ports.MetadataRunner` for the simulator: no threads, call inline.

    SQLite on ``:memory:`` answers in microseconds. Every call reaches discovery through a
    network hop, which is already a scheduling point, so no checkpoint is added here.
    """

    async def __call__(self, fn: Callable[[], T]) -> T:
        return fn()

    async def read_ahead(self, fn: Callable[[], T]) -> T:
        return fn()


class World:
    """Seed, random streams, clock, ids and the trace of one simulated run."""

    def __init__(self, seed: int, *, keep_trace: int = 0) -> None:
        self.seed = seed
        self.clock = SimClock()
        self.ids = SimIds(self.rng("ids"))
        self.blocking = InlineRunner()
        self.pump = Pump()
        self.sleep = self.pump.sleep
        self._trace = hashlib.sha256()
        self.trace_events = 0
        self.recent: deque[str] = (
            deque(maxlen=keep_trace or None) if keep_trace else deque(maxlen=0)
        )

    def rng(self, stream: str) -> random.Random:
        """An independent random stream for one subsystem."""
        return random.Random(f"karma8/{self.seed}/{stream}")

    def record(self, event: str) -> None:
        """Append one step to the trace."""
        line = f"{trio.current_time():.6f} {event}\n"
        self._trace.update(line.encode())
        self.trace_events += 1
        if self.recent.maxlen:
            self.recent.append(line)

    @property
    def trace_sha256(self) -> str:
        return self._trace.hexdigest()
