"""Bounds on what clients can hold in a gateway (docs/configuration.md, "Bounded resources").

- :class:`UploadGate`: at most ``max_uploads`` PUTs in flight; the next one is answered
  ``503`` with ``Retry-After`` at once, its body unread. Each admitted body is read through
  :class:`IdleBody`: a client that sends nothing for ``idle_timeout`` seconds fails its upload
  with :class:`ClientIdle`, and the gateway's failure path aborts the version (reservations
  released) and deletes its parts, as for any failed PUT.
- :func:`give_back_memory`: once uploads end, the C allocator returns the freed pages of
  their buffers to the system (``malloc_trim``), rather than keeping the high-water mark.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
from collections.abc import AsyncIterable, AsyncIterator, Callable

import trio

from karma8.core.errors import InvalidRequest, Unavailable

RETRY_AFTER = (b"retry-after", b"1")
# At most one malloc_trim per this many seconds (it walks the heap).
TRIM_EVERY = 1.0


class ClientIdle(InvalidRequest):
    """The client sent no body bytes for longer than the idle limit."""


class IdleBody:
    """A request body whose next chunk must come within ``timeout`` seconds."""

    def __init__(self, body: AsyncIterable[bytes], timeout: float) -> None:
        self._body = aiter(body)
        self._timeout = timeout

    def __aiter__(self) -> IdleBody:
        return self

    async def __anext__(self) -> bytes:
        with trio.move_on_after(self._timeout) as scope:
            return await anext(self._body)
        assert scope.cancelled_caught
        raise ClientIdle(f"the client sent nothing for {self._timeout:g} s; upload aborted")


class UploadGate:
    """Counts the uploads in flight; see the module's docstring."""

    def __init__(self, *, max_uploads: int, idle_timeout: float) -> None:
        self.max_uploads = max_uploads
        self.idle_timeout = idle_timeout
        self.in_flight = 0
        self._trim = _malloc_trim()
        self._last_trim = -math.inf

    def busy(self) -> Unavailable | None:
        """The error to answer if no upload may start now, else None (and one is counted:
        call :meth:`done` when it ends)."""
        if self.in_flight >= self.max_uploads:
            return Unavailable(f"{self.in_flight} uploads in flight, the limit; retry later")
        self.in_flight += 1
        return None

    def body(self, body: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        return IdleBody(body, self.idle_timeout)

    def done(self) -> None:
        self.in_flight -= 1
        now = trio.current_time()
        if self._trim is not None and now - self._last_trim >= TRIM_EVERY:
            self._last_trim = now
            self._trim()


def _malloc_trim() -> Callable[[], None] | None:
    """``malloc_trim(0)`` of glibc, or None elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = libc.malloc_trim if libc is not None else None
    except (OSError, AttributeError):
        return None
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]

    def call() -> None:
        trim(0)

    return call


def give_back_memory() -> None:
    """Trim the C heap now (tests and benchmarks)."""
    trim = _malloc_trim()
    if trim is not None:
        trim()
