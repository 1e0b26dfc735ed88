"""A byte budget shared by background copies (the rebalancer's moves, repair's rebuilds), and
the rate they reach: copies never take a cluster's disks or network from its clients."""

from __future__ import annotations

import collections

import trio


class Throttle:
    """Lets ``bandwidth`` bytes per second through, all copies together (0: unthrottled),
    and measures the rate of the copies done."""

    def __init__(self, bandwidth: float) -> None:
        self.bandwidth = bandwidth
        self._next = 0.0  # when the next byte may go
        self._recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=64)

    async def wait(self, size: int) -> None:
        """Wait until ``size`` more bytes fit in the budget."""
        if self.bandwidth <= 0:
            return
        start = max(trio.current_time(), self._next)
        self._next = start + size / self.bandwidth
        await trio.sleep_until(start)

    def done(self, size: int) -> None:
        """A copy of ``size`` bytes finished."""
        self._recent.append((trio.current_time(), size))

    def rate(self) -> float:
        """Bytes per second over the recent copies, decaying while none are made."""
        if len(self._recent) < 2:
            return 0.0
        window = trio.current_time() - self._recent[0][0]
        return sum(size for _, size in list(self._recent)[1:]) / window if window > 0 else 0.0
