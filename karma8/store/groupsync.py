"""Group commit: one ``syncfs(2)`` (or ``fdatasync``) makes many writers' changes durable.

A committing writer calls :meth:`GroupSync.sync`, which returns once a sync that *started
after the call* has completed. Writers that arrive while a round runs share the next round, so
N concurrent commits cost about two syncs, not one or two each. What a writer must do first
(finish its file and link it into place, without syncing) it hands over as a step: the next
round's worker thread runs every step it took, then syncs, as a database's group-commit leader
writes its followers' records, so N commits also share one thread trip.

``syncfs`` flushes every dirty file of the file system (data, inodes and directory entries)
and the device cache. Errors are fail-stop, as PostgreSQL treats a failed fsync: a failed
write-back cannot be retried (the kernel may have dropped the dirty pages) nor attributed to
one writer, so after a failed round every later sync fails too, and the node must be
restarted (it rechecks its parts). The descriptor ``syncfs`` reports write-back errors through
is opened with the store, so an error of any write since then is seen.

Early rounds. A disk may complete writes into a cache that only a flush empties (a virtual
disk into its host's), so a large upload's commit would pay for all of its bytes at once.
Writers therefore report what they write (:meth:`GroupSync.written`), and once
:data:`EARLY_SYNC_BYTES` have been written since the last round began, a round starts that
nobody waits for: the disk persists an upload while it arrives, and the round its commit waits
for has about that much left. Small parts never trigger one, and gain from them next to large
uploads: a round then flushes at most that much of someone else's bytes.

Linux only (``syncfs`` via libc); elsewhere :meth:`GroupSync.open` returns None and the store
fsyncs every part and directory itself. The storage nodes of one process that share a file
system share one syncer (:class:`SyncGroups`). The same rounds make discovery's SQLite commits
durable with one ``fdatasync`` of the write-ahead log for many transactions
(:mod:`karma8.net.metasync`). Measurements: docs/benchmarks.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import sys
import weakref
from collections.abc import Callable, Sequence
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from outcome import Outcome

log = logging.getLogger("karma8.groupsync")

_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _linux_libc(name: str, *argtypes: type) -> ctypes._NamedFuncPointer | None:
    """libc's ``name`` with its argument types, or None off Linux or where it is missing."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn: ctypes._NamedFuncPointer = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


_SYNCFS = _linux_libc("syncfs", ctypes.c_int)
_SYNC_FILE_RANGE = _linux_libc(
    "sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint
)
_SYNC_FILE_RANGE_WRITE = 2
# A round starts on its own once this many bytes were written since the last one began.
EARLY_SYNC_BYTES = 32 << 20


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``[offset, offset + length)`` of ``fd`` to disk now,
    without waiting (``sync_file_range(SYNC_FILE_RANGE_WRITE)``; Linux, else a no-op).

    A large part then reaches the disk while it is still arriving, and the sync round at its
    commit has little left to write, instead of all of it. Durability still comes only from
    the round (this call neither flushes metadata nor the device cache); an error here is
    ignored, as the round reports write-back errors.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def can_sync_file_systems() -> bool:
    """Whether this host has ``syncfs`` (:meth:`GroupSync.open` gives None where not)."""
    return _SYNCFS is not None


class GroupSync:
    """Shared rounds of one sync call: many writers, one ``syncfs`` (or ``fdatasync``) each round.

    ``sync`` is the blocking call a round makes (in a worker thread); it raises OSError on a
    write-back error.
    """

    def __init__(
        self,
        sync: Callable[[], None],
        *,
        name: str = "sync",
        prepare: Callable[[], None] | None = None,
    ) -> None:
        self._sync = sync
        # Run on the event loop as each round starts, before its thread: finishes what the
        # round is to make durable (discovery's batch of transactions is committed there).
        # An OSError from it fails the round, fail-stop, as a failed sync does.
        self._prepare = prepare
        self._name = name
        self._running: trio.Event | None = None  # set when the round in progress has ended
        self._started = 0
        self._finished = 0
        self._failure: OSError | None = None
        self._unsynced = 0  # bytes reported by written() since the last round started
        self._steps: list[_Step] = []  # to run in the next round's thread, before its sync

    @classmethod
    def open(cls, path: Path) -> GroupSync | None:
        """A syncer for ``path``'s whole file system, or None where ``syncfs`` is missing."""
        if _SYNCFS is None:
            return None
        fd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
        group = cls(partial(_syncfs, fd), name=f"syncfs {path}")
        weakref.finalize(group, os.close, fd)
        return group

    @property
    def rounds(self) -> int:
        """How many sync calls have completed."""
        return self._finished

    def ticket(self) -> int:
        """The round that makes everything written so far durable: the next one to start."""
        return self._started + 1

    def is_durable(self, ticket: int) -> bool:
        return self._finished >= ticket

    @property
    def failed(self) -> bool:
        """Whether a round (or another sync path, :meth:`fail`) has failed: fail-stop."""
        return self._failure is not None

    async def sync(
        self, ticket: int | None = None, *, before: Callable[[], None] | None = None
    ) -> None:
        """Return once everything written before this call (or before ``ticket`` was taken)
        is durable, running a round if none that started late enough has finished.

        ``before`` is a blocking step (writing and linking a file) to run first, in the
        thread of the next round, before its sync: one thread trip per round for every
        writer instead of one each (:meth:`run_steps`, for one step).
        If the step raises, that exception is raised here, and the round goes on for the
        others.

        Raises:
            OSError: This round or an earlier one failed (fail-stop, see the module doc), or
                the round could not run the step.
            Exception: Whatever ``before`` raised.
        """
        assert ticket is None or before is None, "a step takes the next round's ticket"
        if before is not None:
            (error,) = await self.run_steps([before])
            if error is not None:
                raise error
            return
        await self._until(self.ticket() if ticket is None else ticket)

    async def run_steps(self, fns: Sequence[Callable[[], None]]) -> list[BaseException | None]:
        """Run blocking steps in the thread of the next round, in order, before its sync, and
        return once that round has ended, sync included: what each step raised, None for one
        that ran through (a writer of several parts hands them over together, and waits once).

        The steps go to one round. Cancelled before a round took them, none runs; cancelled
        after, this waits (shielded) until that round has ended, so that the caller can undo
        what they did. Once a round has taken steps it runs them, whatever happens to the
        task that runs the round.

        Raises:
            OSError: This round or an earlier one failed (fail-stop, see the module doc), or
                the round could not run the steps.
        """
        if not fns:
            await trio.lowlevel.checkpoint()
            return []
        steps = [_Step(fn) for fn in fns]
        self._steps += steps
        try:
            await self._until(self.ticket())  # the next round to start takes them all
        except BaseException:
            if steps and not steps[0].done.is_set():
                if steps[0] in self._steps:
                    for step in steps:  # no round took them: they never run
                        self._steps.remove(step)
                else:
                    with trio.CancelScope(shield=True):
                        await steps[0].done.wait()
            raise
        # A round that started after they were added took them, and ended: each ran, or
        # has the error that says why not.
        assert all(step.done.is_set() and (step.ran or step.error) for step in steps)
        return [step.error for step in steps]

    async def _until(self, ticket: int) -> None:
        # A checkpoint first, unless a round is running (then this waits for it, a
        # checkpoint itself): the writers scheduled with this one add their steps before
        # a round starts. Whoever then finds no round running runs the next; the others
        # wait for it to end, all woken at once, and look again. (Under load a round is
        # nearly always running: a pass of the scheduler less for every writer.)
        if self._running is None:
            await trio.lowlevel.checkpoint()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            self._check()
            if self._finished >= ticket:
                return
            if self._running is None:
                await self._run_round()
            else:
                await self._running.wait()

    async def _run_round(self) -> None:
        self._running = trio.Event()
        self._started += 1
        self._unsynced = 0
        steps, self._steps = self._steps, []
        try:
            # Shielded: the steps are taken, and their writers count on this round to run
            # them (a cancellation before the thread started would skip them).
            with trio.CancelScope(shield=True):
                if self._prepare is not None:
                    self._prepare()
                await _in_thread(partial(_round, steps, self._sync))
        except OSError as exc:
            self._failure = exc
            raise
        finally:
            for taken in steps:
                if not taken.ran:  # no thread could be started (only a run sets an error)
                    taken.error = OSError(errno.EAGAIN, "the sync round could not run")
                taken.done.set()
            running, self._running = self._running, None
            assert running is not None
            running.set()
        self._finished = self._started

    def written(self, nbytes: int) -> None:
        """Count bytes written to the file system; once :data:`EARLY_SYNC_BYTES` have been
        written since the last round began, and no round is running, start one that nobody
        waits for (see "Early rounds" in the module doc)."""
        self._unsynced += nbytes
        if self._unsynced < EARLY_SYNC_BYTES or self._running is not None:
            return
        self._unsynced = 0
        with suppress(RuntimeError):  # the run is shutting down: no round is needed
            trio.lowlevel.spawn_system_task(
                self._early_round, self.ticket(), name=f"early {self._name}"
            )

    async def _early_round(self, ticket: int) -> None:
        # A system task, as nothing waits for it: it holds no resource but the round lock.
        # Its ticket is taken when it is asked for, so a round that starts in between (a
        # commit's) makes it a no-op. An exception must not escape a system task (trio
        # would crash the process): a write-back error is already recorded by sync() for
        # every later sync, which raises it to a writer that waits; anything else is
        # recorded here the same way, fail-stop, since durability is then unknown.
        try:
            await self.sync(ticket)
        except OSError:
            pass
        except Exception as exc:
            log.exception("early %s round failed", self._name)
            self.fail(OSError(errno.EIO, f"a sync round failed: {exc!r}"))

    def fail(self, failure: OSError) -> None:
        """Fail-stop from now on, as after a failed round (another sync path failed)."""
        if self._failure is None:
            self._failure = failure

    def _check(self) -> None:
        if self._failure is not None:
            raise OSError(
                self._failure.errno, f"an earlier write-back failed: {self._failure.strerror}"
            )


@trio.lowlevel.enable_ki_protection  # a Ctrl-C between the start and the wait: a lost wake-up
async def _in_thread(fn: Callable[[], None]) -> None:
    """Run ``fn`` in a worker thread started at once, and return (or raise) what it did.

    Rounds run one at a time, each its own thread trip, and never queue behind the reads and
    opens that share ``trio.to_thread``'s default limiter. Taking a limiter would also cost
    a pass of the scheduler before the thread starts: under load a whole batch of other
    tasks, which every commit waiting for the round would wait through. Not cancellable:
    the caller shields the round.
    """
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()

    def deliver(result: Outcome[None]) -> None:  # in the worker thread
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    trio.lowlevel.start_thread_soon(fn, deliver)
    await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)


def _round(steps: list[_Step], sync: Callable[[], None]) -> None:
    """A round, in a worker thread: the steps (a failure is kept for its writer, and the
    round goes on), then the sync."""
    for step in steps:
        step.ran = True
        try:
            step.fn()
        except BaseException as exc:  # whatever it is, it is that writer's, not the round's
            step.error = exc
    sync()


class _Step:
    """A writer's blocking step, run by a round before its sync."""

    __slots__ = ("done", "error", "fn", "ran")

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.done = trio.Event()  # set once the round that took it has ended
        self.error: BaseException | None = None
        self.ran = False  # set by the round's thread as it runs it


def _syncfs(fd: int) -> None:
    assert _SYNCFS is not None
    if _SYNCFS(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class SyncGroups:
    """One :class:`GroupSync` per file system, for the stores of one process."""

    def __init__(self) -> None:
        self._by_device: dict[int, GroupSync | None] = {}

    def for_path(self, path: Path) -> GroupSync | None:
        device = os.stat(path).st_dev
        if device not in self._by_device:
            self._by_device[device] = GroupSync.open(path)
        return self._by_device[device]
