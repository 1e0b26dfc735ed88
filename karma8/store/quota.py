"""Space accounting for a store: payload bytes held and promised, against a quota.

``used`` counts the payload bytes of committed parts, ``in_flight`` the bytes writers have
accepted but neither committed nor discarded. A write that would take their sum past
``capacity_bytes`` fails with :class:`DiskFull` before it touches the disk. The counters live
in memory; an engine computes ``used`` from its disk when it opens.
"""

from __future__ import annotations

from karma8.core.errors import DiskFull


class SpaceQuota:
    """The counters of one store. Event-loop only (no locking).

    Attributes:
        capacity_bytes: The quota on committed plus in-flight payload bytes.
    """

    def __init__(self, capacity_bytes: int, *, used_bytes: int = 0) -> None:
        self.capacity_bytes = capacity_bytes
        self._used = used_bytes
        self._in_flight = 0

    @property
    def used_bytes(self) -> int:
        """Payload bytes of committed parts."""
        return self._used

    @property
    def in_flight_bytes(self) -> int:
        """Bytes accepted by writers that have neither committed nor discarded."""
        return self._in_flight

    def reserve(self, nbytes: int) -> None:
        """Count ``nbytes`` more in flight.

        Raises:
            DiskFull: Committed plus in-flight bytes would exceed the quota (also for 0
                bytes once the store is over it).
        """
        self.check(nbytes)
        self._in_flight += nbytes

    def check(self, nbytes: int) -> None:
        """Raise DiskFull unless ``nbytes`` more would fit, in flight or committed."""
        if self._used + self._in_flight + nbytes > self.capacity_bytes:
            raise DiskFull("no space left on the node")

    def release(self, nbytes: int) -> None:
        """Stop counting ``nbytes`` in flight (committed or discarded)."""
        self._in_flight -= nbytes

    def add_used(self, nbytes: int) -> None:
        """Count a committed part's payload."""
        self._used += nbytes

    def remove_used(self, nbytes: int) -> None:
        """Stop counting a deleted part's payload (never below zero)."""
        self._used = max(0, self._used - nbytes)
