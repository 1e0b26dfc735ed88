"""Volumes a storage node lends to another process, and that process's end of a loan.

A node's packed store (:class:`~karma8.store.packed.store.PackedStore`) is the only writer of
its volumes, so every small part's bytes pass through the node's event loop. A loan lets
another process on the same machine (a gateway worker that has a small upload's body in
hand) append needles itself, to a volume the node created for it and will not touch while it
is lent:

1. The node *lends* a new, salted volume (:meth:`PackedStore.lend`): a :class:`Loan` names
   its file and salt. The node never appends to, compacts or tombstones a lent volume.
2. The borrower appends needles to it (:class:`BorrowedVolume`: offsets taken in order, each
   write a step of the borrower's own group-sync rounds) and makes them durable.
3. The node *adopts* each durable needle (:meth:`PackedStore.adopt`): it reads the needle
   back, checks its header, key, length, CRC and sha256, and indexes it. Only then is it a
   part.
4. The borrower *gives the volume back* (:meth:`PackedStore.give_back`) once it is full and
   no append of its own is in flight; from then on it is one of the node's sealed volumes.
   :meth:`PackedStore.end_loans` ends every loan still out once the borrowers have exited
   (a borrower is a process that ends with the node's). Which volumes are lent is recorded
   (``volumes/lent``), so that a node restarted after a crash neither appends to one nor
   lends it again until that run's loans end cleanly.

What each step may leave behind, and who collects it:

- A needle appended and never adopted (its upload failed or was cancelled) is garbage: the
  node's index does not name it, so compaction drops it once the volume is back.
- A part deleted while its volume is lent leaves the index at once; its tombstone is
  appended when the volume comes back, or when the loans end (the node does not append to
  a volume a borrower may be appending to).
- A restart ends every loan. Opening scans lent volumes like any other, so needles never
  adopted, and parts deleted before their tombstone was written, are found again as parts
  no committed version names: orphans, which the orphan check collects after its grace, as
  it does a crashed upload's parts today.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import attrs
import trio

from karma8.core.errors import IntegrityError, NotFound
from karma8.ports import Appended, Loan
from karma8.store.diskio import (
    FILE_MODE,
    O_CLOEXEC,
    BlockingIO,
    close_quietly,
    fsync_dir,
    pwrite_all,
)
from karma8.store.packed.format import LIVE, Needle, decode_header, encode, needle_size

log = logging.getLogger("karma8.store.packed")


class BorrowedVolume:
    """The borrower's end of a :class:`Loan`: appends needles to the lent volume.

    Event-loop state; the writes themselves are steps for a sync round
    (:class:`karma8.store.groupsync.GroupSync` on the volume's file system), which runs them
    in its thread and returns once they are durable. Offsets are taken in call order, so
    appends never overlap; a failed or cancelled step leaves a hole or bytes nobody adopts.

    Attributes:
        loan: What the node lent.
        end: Where the next append goes.
        in_flight: Appends begun and not yet ended.
    """

    def __init__(self, loan: Loan, *, limit: int) -> None:
        """Open the lent volume for writing; ``limit`` is the size past which it is full."""
        self.loan = loan
        self.limit = limit
        self.end = loan.start
        self.in_flight = 0
        self._fd = os.open(loan.path, os.O_WRONLY | O_CLOEXEC)

    @property
    def full(self) -> bool:
        """No more appends should start here: the borrower asks for another loan."""
        return self.end >= self.limit

    def begin_append(self, key: str, payload: bytes) -> tuple[Appended, Callable[[], None]]:
        """Take a needle's place at the end: what the node will be asked to adopt, and the
        blocking step that writes it. :meth:`end_append` must follow, whatever the step did.
        """
        sha256 = hashlib.sha256(payload).digest()
        needle = encode(key, payload, sha256=sha256, salt=self.loan.salt, crc=zlib.crc32(payload))
        offset = self.end
        self.end += len(needle)
        self.in_flight += 1
        fd = self._fd

        def write() -> None:
            pwrite_all(fd, needle, offset)

        appended = Appended(
            volume=self.loan.volume,
            offset=offset,
            key=key,
            length=len(payload),
            sha256=sha256.hex(),
        )
        return appended, write

    def end_append(self) -> None:
        self.in_flight -= 1

    def close(self) -> None:
        """Close the descriptor (after the last append ended, before giving it back)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            close_quietly(fd)


def adopted_size(appended: Appended) -> int:
    """Bytes the needle a borrower says it appended takes: what adoption reads back."""
    return needle_size(len(appended.key.encode()), appended.length)


def adopted_needle(data: bytes, appended: Appended, salt: bytes) -> Needle:
    """The needle in ``data`` (the :func:`adopted_size` bytes read at ``appended.offset``
    of the lent volume), if it is the one the borrower says it appended there, whole.

    Raises:
        IntegrityError: The header does not check out under the volume's salt, or names
            another key, length, checksum or a tombstone, or the payload does not match its
            CRC and sha256.
    """
    needle = decode_header(data, appended.offset, salt)
    if needle is not None and len(data) == adopted_size(appended):
        start = needle.data_offset - appended.offset
        payload = data[start : start + needle.length]
        if (
            needle.flags == LIVE
            and needle.key == appended.key
            and needle.length == appended.length
            and needle.sha256.hex() == appended.sha256
            and zlib.crc32(payload) == needle.crc
            and hashlib.sha256(payload).digest() == needle.sha256
        ):
            return needle
    raise IntegrityError(f"part {appended.key} is not whole at the place given for it")


LENT = "lent"  # under volumes/: the ids of the volumes lent now, one per line


def read_record(directory: Path) -> set[int]:
    """The volumes the record in ``directory`` names as lent (none if there is no record).

    Raises:
        OSError, ValueError: The record is there but cannot be read, or is not only ids.
    """
    try:
        text = (directory / LENT).read_text()
    except FileNotFoundError:
        return set()
    ids = text.split()
    if not all(i.isascii() and i.isdigit() for i in ids):
        raise ValueError(f"{directory / LENT} is not a list of volume ids")
    return {int(i) for i in ids}


def write_record(directory: Path, volumes: set[int]) -> None:
    """Name ``volumes`` as lent in ``directory``'s record, durably (blocking): written
    aside, synced, renamed into place (a ``.tmp`` left by a crash is deleted on open)."""
    path = directory / LENT
    tmp = path.with_name(LENT + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_CLOEXEC, FILE_MODE)
    try:
        pwrite_all(fd, "".join(f"{v}\n" for v in sorted(volumes)).encode(), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(directory)


@attrs.define
class Lent:
    """A lent volume's state at the node: its borrower, and the parts deleted from it whose
    tombstones wait for its return."""

    borrower: str
    deleted: list[str] = attrs.Factory(list)


class LoanBook:
    """A node's account of its loans: the volumes lent now and to whom, the keys deleted
    from them whose tombstones wait, and the volumes the record (:data:`LENT`) named as
    lent when the store last ran (neither appended to nor lent again until the loans of
    this run end cleanly: a borrower of before may still have been appending).

    Attributes:
        out: The volumes lent now, by id.
        was_lent: The volumes lent when the store last ran.
        deferred: Keys deleted from lent volumes, their tombstones to come.
    """

    def __init__(self, directory: Path, io: BlockingIO, volumes: Iterable[int]) -> None:
        """Read the record in ``directory``; if it cannot be read, every one of ``volumes``
        counts as lent before."""
        self._directory = directory
        self._io = io
        self._lock = trio.Lock()  # one write of the record at a time
        self.out: dict[int, Lent] = {}
        self.deferred: set[str] = set()
        try:
            self.was_lent = read_record(directory)
        except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
            log.warning("%s unreadable (%s): no volume is lent or appended to again", LENT, exc)
            self.was_lent = set(volumes)

    def lendable(self, volume: int) -> bool:
        """Neither lent now nor when the store last ran."""
        return volume not in self.out and volume not in self.was_lent

    def held(self, volume: int, borrower: str) -> Lent:
        """The loan of ``volume`` to ``borrower``.

        Raises:
            NotFound: The volume is not lent to ``borrower``.
        """
        lent = self.out.get(volume)
        if lent is None or lent.borrower != borrower:
            raise NotFound(f"volume {volume} is not lent to {borrower}")
        return lent

    async def record(self) -> None:
        """:meth:`write` in a thread, one at a time."""
        async with self._lock:
            await self._io.run(self.write)

    def write(self) -> None:
        """Record the volumes lent now (and those of before, still) in :data:`LENT`,
        durably (blocking): a restart after a crash then knows which volumes another process
        may have been appending to."""
        write_record(self._directory, {*self.out, *self.was_lent})

    def end_all(self) -> None:
        """End every loan (the borrowers gone) and record that none is out, nor any of
        before (a whole run later, no writer of before is left)."""
        loans, self.out = self.out, {}
        self.deferred.clear()
        if loans or self.was_lent:
            self.was_lent = set()
            try:
                self.write()
            except OSError:  # still named there: a restart starts a new volume, nothing lost
                log.warning("the end of %d loans not recorded", len(loans), exc_info=True)
