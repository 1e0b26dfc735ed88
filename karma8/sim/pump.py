"""The message pump: one task that wakes sleepers from a (time, seq) heap.

Every simulated hop, chunk transfer and fsync is a short sleep. ``trio.sleep`` costs a cancel
scope and a deadline registration per call; here a sleeper costs one heap push and one
reschedule, and the single pump task is the only one that waits on trio's clock. Deadlines are
rounded up to a ``tick`` so that sleepers due at nearly the same moment wake in one scheduler
batch, which is where most of the speed comes from (trio then orders the batch with its
seeded scheduler RNG, so the run stays deterministic).

Cancellation works as for ``trio.sleep``: a cancelled sleeper's heap entry is marked dead and
skipped.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable

import attrs
import trio


@attrs.define(order=False)
class _Sleeper:
    task: trio.lowlevel.Task
    alive: bool = True


class Pump:
    def __init__(self, *, tick: float = 1e-3) -> None:
        self.tick = tick
        self._heap: list[tuple[float, int, _Sleeper]] = []
        self._seq = 0
        self._scope: trio.CancelScope | None = None
        self.wakeups = 0
        # Called with the time at each wake-up, before any sleeper is woken: an observer that
        # only reads (karma8.sim.fillseries) sees the world without adding a scheduling point.
        self.on_wake: Callable[[float], None] | None = None

    def _quantize(self, deadline: float) -> float:
        return math.ceil(deadline / self.tick) * self.tick

    async def sleep(self, delay: float) -> None:
        """Sleep ``delay`` virtual seconds (at least one tick)."""
        deadline = self._quantize(trio.current_time() + max(delay, 0.0))
        sleeper = _Sleeper(trio.lowlevel.current_task())
        self._seq += 1
        heapq.heappush(self._heap, (deadline, self._seq, sleeper))
        if self._scope is not None and deadline < self._scope.deadline:
            self._scope.deadline = deadline

        def abort(_: object) -> trio.lowlevel.Abort:
            sleeper.alive = False
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The pump task: run it in the simulation's nursery."""
        task_status.started()
        while True:
            head = self._heap[0][0] if self._heap else math.inf
            with trio.CancelScope(deadline=head) as scope:
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None
            now = trio.current_time()
            self.wakeups += 1
            if self.on_wake is not None:
                self.on_wake(now)
            while self._heap and self._heap[0][0] <= now:
                _, _, sleeper = heapq.heappop(self._heap)
                if sleeper.alive:
                    sleeper.alive = False
                    trio.lowlevel.reschedule(sleeper.task)
