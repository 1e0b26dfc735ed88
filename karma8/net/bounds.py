"""Bounds on what clients can hold in a gateway (docs/configuration.md, "Bounded resources").

- :class:`UploadGate`: at most ``max_uploads`` PUTs in flight; the next one is answered
  ``503`` with ``Retry-After`` at once, its body unread. Each admitted body is read through
  :class:`IdleBody`: a client that sends nothing for ``idle_timeout`` seconds fails its upload
  with :class:`ClientIdle`, and the gateway's failure path aborts the version (reservations
  released) and deletes its parts, as for any failed PUT.
- :func:`give_back_memory`: the memory of ended uploads goes back to the system (a garbage
  collection, then ``malloc_trim``, every few seconds while uploads end), rather than the
  process keeping the high-water mark; :func:`settle_heap` keeps start-up's objects out of
  every collection.
- :func:`raise_open_files_limit`: a server may hold ``max_connections`` sockets, beside its
  pools and files, and a descriptor it cannot get is a connection dropped unanswered (an
  ``accept`` that fails, a handed-over connection the kernel discards). So ``karma8 serve``
  raises its soft limit to the hard one, as Go's runtime does for every program, and says
  when even that is short of ``max_connections``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import resource
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable

import trio

from karma8.core.errors import InvalidRequest, Unavailable

log = logging.getLogger("karma8.gateway")
RETRY_AFTER = (b"retry-after", b"1")
WARN_EVERY = 10.0  # seconds between two warnings that uploads are refused
# Seconds between two malloc_trim calls in a gateway.
TRIM_EVERY = 5.0


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
        self.ended = 0  # uploads ended since start
        self.failed = 0  # of which failed (an error, a client gone, cancelled)
        self.refused = 0  # uploads refused at max_uploads since start
        self._warned = -WARN_EVERY

    def busy(self) -> Unavailable | None:
        """The error to answer if no upload may start now, else None (and one is counted:
        call :meth:`done` when it ends)."""
        if self.in_flight >= self.max_uploads:
            self.refused += 1
            now = trio.current_time()
            if now - self._warned >= WARN_EVERY:  # an operator should know, not every time
                self._warned = now
                log.warning("%d uploads in flight (max_uploads): refusing PUTs", self.in_flight)
            return Unavailable(f"{self.in_flight} uploads in flight, the limit; retry later")
        self.in_flight += 1
        return None

    def body(self, body: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        return IdleBody(body, self.idle_timeout)

    def done(self, *, failed: bool = False) -> None:
        self.in_flight -= 1
        self.count_end(failed=failed)

    def count_end(self, *, failed: bool) -> None:
        """Count an upload that ended: one admitted here, or one this process stored for a
        gateway worker (:mod:`karma8.net.writepipe`), for :func:`give_back_memory`."""
        self.ended += 1
        self.failed += failed


DESCRIPTORS_SPARE = 256  # beside connections: pools, volume and log files, pipes, listeners


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's soft limit of open files to its hard limit (children inherit
    it); the (soft, hard) limits then. Where the platform refuses, the soft one stays."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


def descriptors_short(max_connections: int, limit: int) -> str | None:
    """What to tell an operator whose ``max_connections`` (and the spare descriptors a
    server needs beside them) the open-files limit cannot hold; None if it can."""
    if limit == resource.RLIM_INFINITY or max_connections + DESCRIPTORS_SPARE <= limit:
        return None
    return (
        f"max_connections = {max_connections} but this process may open only {limit} files"
        f" (ulimit -n, raised to the hard limit where allowed): connections past about"
        f" {max(limit - DESCRIPTORS_SPARE, 0)} may be dropped unanswered; raise the hard"
        " limit (LimitNOFILE= under systemd) or lower max_connections"
    )


def settle_heap() -> None:
    """Once a server is up: what start-up built (modules, classes, apps, indexes) lives as
    long as the process, so the cyclic collector skips it from now on (``gc.freeze``). A
    full collection, Python's own or :func:`give_back_memory`'s, otherwise walks those
    ~75,000 objects on the event loop: ~40 ms in a gateway that has served nothing. A
    collection first, so that start-up's garbage is not kept; what a connection open at
    that moment holds stays too, should it become garbage in a cycle (a few objects)."""
    gc.collect()
    gc.freeze()


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim``, or None elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


async def give_back_memory(
    gate: UploadGate,
    *,
    every: float = TRIM_EVERY,
    collect: Callable[[], int] = gc.collect,
    trim: Callable[[], object] | None = None,
) -> None:
    """Until cancelled, every ``every`` seconds in which uploads ended, give their memory back.

    A failed upload's buffers can stay alive in reference cycles (an exception's traceback
    holds the frames that hold them) until Python's cyclic collector runs, which an idle
    process may not do for a long time: measured, 30 stalled 19 MiB uploads left the RSS at
    278 MiB after they were aborted instead of 64. So a full collection first if uploads
    failed (a successful one's buffers are freed as they go; a full collection holds the
    event loop for tens of milliseconds), then glibc's ``malloc_trim``, which hands the
    heap's free pages back (glibc keeps them otherwise: its mmap threshold grows with the
    largest block freed, so later megabyte buffers come from the heap)."""
    trim = trim or _malloc_trim()
    seen, seen_failed = gate.ended, gate.failed
    while True:
        await trio.sleep(every)
        if gate.ended == seen:
            continue
        seen = gate.ended
        started = time.perf_counter()
        collected = 0
        if gate.failed != seen_failed:
            seen_failed = gate.failed
            collected = collect()
        if trim is not None:
            trim()
        log.debug(
            "gave memory back: %d objects collected, %.1f ms",
            collected,
            (time.perf_counter() - started) * 1000,
        )
