"""A storage node's small parts packed into volume files: :class:`PackedStore`.

The theory of operation (format, appends, recovery, compaction) is in
:mod:`karma8.store.packed`. The routing store in front of it and the file engine is
:class:`karma8.store.tiered.TieredPartStore`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from karma8.core.errors import IntegrityError, InvalidRequest, NotFound, UploadConflict
from karma8.ports import Appended, Loan, PendingWrite, StepRunner, StoredPart
from karma8.store.diskio import (
    DIR_MODE,
    FILE_MODE,
    O_CLOEXEC,
    BlockingIO,
    close_quietly,
    fsync_dir,
    pread_exact,
    pwrite_all,
    storage_error,
)
from karma8.store.groupsync import GroupSync
from karma8.store.packed import volumes as volume_files
from karma8.store.packed.compaction import Compactions
from karma8.store.packed.format import (
    HEADER_SIZE,
    aligned,
    encode,
    encode_tombstone,
    needle_size,
    new_salt,
)
from karma8.store.packed.index import NeedleRef, PackedIndex
from karma8.store.packed.loans import Lent, LoanBook, adopted_needle, adopted_size
from karma8.store.packed.volumes import (
    VolumeFile,
    volume_name,
)
from karma8.store.quota import SpaceQuota

log = logging.getLogger("karma8.store.packed")

DEFAULT_VOLUME_SIZE = 1 << 30
DEFAULT_COMPACT_RATIO = 0.5
# How far past ``volume_size`` a borrower's last append may reach (it stops at the size).
LOAN_SLACK = 2 << 20


class PackedStore:
    """Small parts as needles in append-only volume files (see :mod:`karma8.store.packed`).

    Not a full :class:`karma8.ports.PartStore`: writers buffer in
    :class:`karma8.store.tiered.TieredPartStore`, which hands a whole part to :meth:`put`.

    Attributes:
        directory: Where the volumes are (``root/volumes``).
        index: The live parts.
    """

    def __init__(
        self,
        root: Path,
        *,
        quota: SpaceQuota,
        io: BlockingIO,
        group_sync: GroupSync | None,
        volume_size: int = DEFAULT_VOLUME_SIZE,
        compact_ratio: float = DEFAULT_COMPACT_RATIO,
    ) -> None:
        """Open (creating if needed) the volumes under ``root`` and rebuild the index.

        Blocks: reads every needle's header (one ``pread`` each), truncates a torn tail,
        removes leftovers of an interrupted compaction. Adds the live payload to ``quota``.
        """
        if volume_size <= 0 or not 0 < compact_ratio <= 1:
            raise ValueError("volume_size must be positive and compact_ratio in (0, 1]")
        self.directory = Path(root) / "volumes"
        self.directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        self.quarantine_dir = Path(root) / "quarantine"
        self.volume_size = volume_size
        self.index = PackedIndex()
        self._quota = quota
        self._io = io
        self._group = group_sync
        # Where appends' steps run: the shared sync rounds, or each alone with its own sync.
        self._runner: StepRunner = group_sync or _AloneRunner(io)
        self._pending: set[str] = set()
        self._roll_lock = trio.Lock()
        self._files, self.truncated_bytes = volume_files.open_volumes(self.directory, self.index)
        # Appends go to the highest volume, so that a key written again lands above any
        # earlier copy (of two live needles of a key, the later volume's wins at the next
        # open): the last one, unless it was written before salts or was lent when the node
        # stopped (another process may still have been appending to it), then a new one.
        # Volumes lent when the node stopped are neither appended to nor lent again in this
        # run, and stay in the record until the loans end cleanly (end_loans).
        self._loans = LoanBook(self.directory, io, self._files)
        last = max(self._files, default=0)
        reuse = (
            bool(last) and self._files[last].salt is not None and last not in self._loans.was_lent
        )
        self._drop_empty(keep=last if reuse else None)
        if not reuse:
            last = max(self._files, default=0)
            self._files[last + 1] = self._create(last + 1, 0)
        self._active = max(self._files)
        self._compactions = Compactions(
            directory=self.directory,
            files=self._files,
            index=self.index,
            ratio=compact_ratio,
            sealed=lambda volume: volume != self._active and volume not in self._loans.out,
        )
        quota.add_used(self.index.payload_bytes)

    # -- opening ----------------------------------------------------------------------------

    def _drop_empty(self, *, keep: int | None) -> None:
        """Delete the salted volumes that hold nothing (an active one never written to, one
        lent and never used) but ``keep``, so that restarts do not pile them up."""
        empty = [
            v for v, f in self._files.items() if f.salt is not None and f.end == 0 and v != keep
        ]
        for volume in empty:
            file = self._files.pop(volume)
            close_quietly(file.fd)
            file.path.unlink()
        if empty:
            fsync_dir(self.directory)

    def _create(self, volume: int, generation: int) -> VolumeFile:
        salt = new_salt()
        path = self.directory / volume_name(volume, generation, salt)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | O_CLOEXEC, FILE_MODE)
        if self._group is None:
            try:
                fsync_dir(self.directory)  # else the next round's syncfs makes the name durable
            except OSError:  # not left behind: the next try creates it again
                close_quietly(fd)
                path.unlink(missing_ok=True)
                raise
        return VolumeFile(volume, generation, salt, path, fd, 0)

    def end_loans(self) -> None:
        """End every loan, the borrowers gone (their processes have exited): the tombstones
        of parts deleted from a lent volume are written, blocking, after every byte in it.
        (A borrower still appending could at worst write over them: those parts would come
        back after a restart as orphans, as after a crash.)"""
        for volume, lent in self._loans.out.items():
            if lent.deleted:
                self._write_tombstones(self._files[volume], lent.deleted)
        self._loans.end_all()

    def close(self) -> None:
        """Close the volumes' descriptors (the store is unusable afterwards); every loan
        ends first (:meth:`end_loans`)."""
        self.end_loans()
        for file in self._files.values():
            close_quietly(file.fd)
        self._files.clear()

    def _write_tombstones(self, file: VolumeFile, keys: list[str]) -> None:
        """Append tombstones of ``keys`` to a volume taken back from its borrower, blocking,
        after every byte it holds."""
        data = b"".join(encode_tombstone(key, salt=file.salt) for key in keys)
        try:
            end = aligned(os.fstat(file.fd).st_size)
            pwrite_all(file.fd, data, end)
            os.fdatasync(file.fd)
            file.end = end + len(data)
        except OSError as exc:
            log.warning(
                "volume %d: %d tombstones not written (%s); the parts come back as orphans"
                " after a restart",
                file.volume,
                len(keys),
                exc,
            )

    # -- what the routing store calls -------------------------------------------------------

    @property
    def group_sync(self) -> GroupSync | None:
        """The rounds its appends are written and synced in (None: each syncs alone)."""
        return self._group

    @property
    def volumes(self) -> dict[int, VolumeFile]:
        """The current generation of every volume, by id."""
        return dict(self._files)

    @property
    def compacting(self) -> frozenset[int]:
        """The volumes being compacted now (in the background, or by :meth:`compact`)."""
        return self._compactions.running

    @property
    def compact_ratio(self) -> float:
        """The share of garbage past which a sealed volume is compacted."""
        return self._compactions.ratio

    @compact_ratio.setter
    def compact_ratio(self, ratio: float) -> None:
        self._compactions.ratio = ratio

    @property
    def compactions(self) -> int:
        """How many volumes compaction has rewritten since the store opened."""
        return self._compactions.done

    def garbage_ratio(self, volume: int) -> float:
        """The share of a volume's bytes that no live part uses."""
        return self._compactions.garbage_ratio(volume)

    async def compact(self) -> int:
        """Compact every sealed volume whose garbage passes ``compact_ratio``, now, and wait
        for the compactions running in the background; how many this call ran."""
        return await self._compactions.run_due()

    def has(self, key: str) -> bool:
        """The part is committed here, or a commit of it is in flight."""
        return key in self.index or key in self._pending

    async def put(
        self, key: str, payload: bytes, *, held_elsewhere: Callable[[], bool] | None = None
    ) -> StoredPart:
        """Append a part and return once it is durable (shared sync rounds).

        ``held_elsewhere`` is a blocking check run just before the write, in the sync
        round's thread (off the event loop): if it says the key is stored elsewhere (the
        file engine), nothing is written and the put is refused.

        Raises:
            UploadConflict: The key is here already, or being committed, or held elsewhere.
            DiskFull, StorageFailure: The disk failed (the part is not stored).
        """
        pending = await self.begin_put(key, payload, held_elsewhere=held_elsewhere)
        try:
            error = await self._run_step(pending.step)
        except BaseException as exc:  # the round failed, or this was cancelled
            error = exc
        return pending.end(error)

    async def begin_put(
        self, key: str, payload: bytes, *, held_elsewhere: Callable[[], bool] | None = None
    ) -> PendingWrite:
        """:meth:`put` up to its write: the needle's place in a volume is taken and its
        write is the returned step, which a sync round runs with other puts' (group sync),
        or which writes and syncs it alone; then its ``end`` indexes the part (see
        :class:`karma8.ports.PendingWrite`). Raises UploadConflict as :meth:`put` does."""
        if self.has(key):
            raise UploadConflict(f"part {key} already exists")
        self._pending.add(key)
        try:
            sha256 = hashlib.sha256(payload).digest()
            crc = zlib.crc32(payload)
            file = await self._active_for(needle_size(len(key.encode()), len(payload)))
            assert file.salt is not None  # parts are never appended to an unsalted volume
            needle = encode(key, payload, sha256=sha256, salt=file.salt, crc=crc)
        except BaseException:
            self._pending.discard(key)
            raise
        refuse = None
        if held_elsewhere is not None:

            def refuse() -> None:
                if held_elsewhere():
                    raise UploadConflict(f"part {key} already exists")

        offset, step = self._begin_append(file, needle, before=refuse)

        def end(error: BaseException | None) -> StoredPart:
            self._end_append(file)
            self._pending.discard(key)
            if isinstance(error, OSError):
                raise storage_error(error, "committing a part") from None
            if error is not None:
                raise error
            self.index.add(
                NeedleRef(
                    key=key,
                    volume=file.volume,
                    generation=file.generation,
                    offset=offset,
                    size=len(needle),
                    length=len(payload),
                    data_offset=offset + HEADER_SIZE + len(key.encode()),
                    crc=crc,
                    sha256=sha256,
                )
            )
            self._quota.add_used(len(payload))
            return StoredPart(key=key, size=len(payload), checksum=sha256.hex())

        return PendingWrite(step=step, end=end, runner=self._runner)

    async def _active_for(self, nbytes: int) -> VolumeFile:
        """The volume to append ``nbytes`` to, rolling over to a new one past the size."""
        file = self._files[self._active]
        # Above every other volume (none was lent since): of two live needles of a key, the
        # later volume's wins at the next open, so a key written again must land above
        # every earlier copy, a lent volume's included.
        highest = self._active == max(self._files)
        if highest and (file.end == 0 or file.end + nbytes <= self.volume_size):
            return file
        async with self._roll_lock:
            file = self._files[self._active]
            highest = self._active == max(self._files)
            if not highest or (file.end and file.end + nbytes > self.volume_size):
                sealed, new = file.volume, max(self._files) + 1  # past any lent volume
                try:
                    file = await self._io.run(lambda: self._create(new, 0))
                except OSError as exc:
                    raise storage_error(exc, "starting a volume") from None
                self._files[file.volume] = file
                self._active = file.volume
                self._compactions.maybe_start(sealed)
        return file

    async def _append(
        self,
        file: VolumeFile,
        data: bytes,
        doing: str,
        *,
        before: Callable[[], None] | None = None,
    ) -> int:
        """Write ``data`` at the end of ``file`` and wait until it is durable; its offset.
        ``before`` runs first in the same thread; what it raises is raised here, and
        nothing is written."""
        offset, step = self._begin_append(file, data, before=before)
        try:
            error = await self._run_step(step)
        finally:
            self._end_append(file)
        if isinstance(error, OSError):
            raise storage_error(error, doing) from None
        if error is not None:
            raise error
        return offset

    def _begin_append(
        self, file: VolumeFile, data: bytes, *, before: Callable[[], None] | None
    ) -> tuple[int, Callable[[], None]]:
        """Take ``data``'s place at the end of ``file``: its offset, and the blocking step
        that writes it (and, without group sync, syncs it). :meth:`_end_append` follows.

        The offset is taken here, on the event loop, so appends to one volume never overlap;
        the step runs in the next sync round (one thread trip and one ``syncfs`` for every
        commit waiting), or alone with an ``fdatasync`` without group sync. A cancelled or
        failed append leaves a hole, or bytes nothing indexes: garbage. ``before`` runs
        first in the same thread; if it raises, nothing is written.
        """
        offset = file.end
        file.end += len(data)
        file.appends += 1
        file.pin()

        def write() -> None:
            if before is not None:
                before()
            pwrite_all(file.fd, data, offset)

        if self._group is not None:
            return offset, write

        def write_and_sync() -> None:
            write()
            os.fdatasync(file.fd)

        return offset, write_and_sync

    def _end_append(self, file: VolumeFile) -> None:
        file.unpin()
        file.append_done()

    async def _run_step(self, step: Callable[[], None]) -> BaseException | None:
        """Run one append's step; what it raised (an OSError of the round too)."""
        try:
            (error,) = await self._runner.run_steps([step])
        except OSError as exc:
            return exc
        return error

    def stat(self, key: str) -> StoredPart | None:
        ref = self.index.get(key)
        if ref is None:
            return None
        return StoredPart(key=key, size=ref.length, checksum=ref.sha256.hex())

    async def read(self, key: str) -> bytes | None:
        """The part's whole payload, checked against its CRC; None if not here.

        Raises:
            IntegrityError: The bytes do not match the needle's CRC.
        """
        ref = self.index.get(key)
        if ref is None:
            return None
        data = await self._read_raw(ref)
        if len(data) != ref.length or zlib.crc32(data) != ref.crc:
            raise IntegrityError(f"part {key} does not match its checksum")
        return data

    async def _read_raw(self, ref: NeedleRef) -> bytes:
        # Pinned: compaction may retire this generation meanwhile; its descriptor stays open
        # (and the file readable, though unlinked) until the read ends.
        file = self._files[ref.volume]
        assert file.generation == ref.generation
        file.pin()
        try:
            return await self._io.run_small(
                lambda: pread_exact(file.fd, ref.length, ref.data_offset), ref.length
            )
        except OSError as exc:
            raise storage_error(exc, "reading a part") from None
        finally:
            file.unpin()

    async def verify(self, key: str) -> bool:
        """True if the part's bytes match its CRC and sha256.

        Raises:
            NotFound: Not here.
        """
        ref = self.index.get(key)
        if ref is None:
            raise NotFound(f"part {key} is not on this node")
        data = await self._read_raw(ref)
        return (
            len(data) == ref.length
            and zlib.crc32(data) == ref.crc
            and secrets.compare_digest(hashlib.sha256(data).digest(), ref.sha256)
        )

    async def delete(self, key: str) -> bool:
        """Append a tombstone to the part's volume; once durable, the part is gone. False if
        it was not here."""
        while True:
            ref = self.index.get(key)
            if ref is None:
                await trio.lowlevel.checkpoint()
                return False
            lent = self._loans.out.get(ref.volume)
            if lent is not None:  # its tombstone waits for the volume to come back
                lent.deleted.append(key)
                self._loans.deferred.add(key)  # all before the checkpoint: no delete or return
                self.index.remove(key)  # between, so a second delete finds nothing here
                self._quota.remove_used(ref.length)
                await trio.lowlevel.checkpoint()
                return True
            file = self._files[ref.volume]
            if file.closing is None:
                break
            await file.closing.wait()  # compaction is switching the volume: look again
        await self._append(file, encode_tombstone(key, salt=file.salt), "deleting a part")
        if not self.index.is_current(ref):  # a concurrent delete of the same key won
            return False
        self.index.remove(key)
        self._quota.remove_used(ref.length)
        self._compactions.maybe_start(ref.volume)
        return True

    async def quarantine(self, key: str) -> bool:
        """Copy the part's bytes to ``root/quarantine/KEY`` (durably), then delete it here."""
        ref = self.index.get(key)
        if ref is None:
            await trio.lowlevel.checkpoint()
            return False
        data = await self._read_raw(ref)
        target = self.quarantine_dir / key

        def keep() -> None:
            self.quarantine_dir.mkdir(mode=DIR_MODE, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_CLOEXEC, FILE_MODE)
            try:
                pwrite_all(fd, data, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(self.quarantine_dir)

        try:
            await self._io.run(keep)
        except OSError as exc:
            raise storage_error(exc, "quarantining a part") from None
        return await self.delete(key)

    # -- volumes lent to other processes (karma8.store.packed.loans) -----------------------

    async def lend(self, borrower: str) -> Loan:
        """A volume for ``borrower`` to append needles to, after what it holds: a sealed one
        with room (the lowest; an earlier loan's, or the node's active one before a
        restart), else a new one. The node leaves it alone (no appends, tombstones or
        compaction of its own) until :meth:`give_back`."""
        async with self._roll_lock:
            file = self._room_to_lend()
            if file is None:
                volume = max(self._files) + 1
                try:
                    file = await self._io.run(lambda: self._create(volume, 0))
                except OSError as exc:
                    raise storage_error(exc, "lending a volume") from None
                self._files[volume] = file
            self._loans.out[file.volume] = Lent(borrower)
            try:
                await self._loans.record()
            except BaseException as exc:  # cancelled too: else lent to nobody
                del self._loans.out[file.volume]
                if isinstance(exc, OSError):
                    raise storage_error(exc, "lending a volume") from None
                raise
        assert file.salt is not None
        return Loan(
            volume=file.volume, salt=file.salt, path=file.path, borrower=borrower, start=file.end
        )

    def _room_to_lend(self) -> VolumeFile | None:
        """The lowest sealed volume with room for a loan (at least an eighth of a volume),
        that nothing appends to or compacts now."""
        for volume in sorted(self._files):
            file = self._files[volume]
            if (
                volume != self._active
                and self._loans.lendable(volume)
                and volume not in self._compactions.running
                and file.salt is not None
                and file.closing is None
                and not file.appends
                and file.end + max(self.volume_size // 8, LOAN_SLACK) <= self.volume_size
            ):
                return file
        return None

    def adopt(self, borrower: str, appended: Appended) -> StoredPart:
        """Index a needle ``borrower`` appended to a volume lent to it and made durable.

        A borrower writes new keys only (a new version's parts): a lent volume may be lower
        than one that held an earlier copy of a key written again, which would win on open.

        The needle is read back first, on the calling thread (a few KiB just written, so in
        the page cache: no thread trip or scheduler pass per part): its header must check out
        under the volume's salt and name the key, the length, the checksum and a live part,
        and its payload must match the CRC in it; else nothing is indexed.

        Raises:
            NotFound: The volume is not lent to ``borrower``.
            UploadConflict: The key is here already, or being committed.
            IntegrityError: The bytes at that place are not that needle, whole.
            DiskFull: The part would take the node past its quota.
            StorageFailure: The read failed.
        """
        self._loans.held(appended.volume, borrower)
        key = appended.key
        if self.has(key) or key in self._loans.deferred:
            # A borrower writes new keys only; one whose delete waits for its tombstone must
            # not come back in a lower volume, where the old copy would win on open.
            raise UploadConflict(f"part {key} already exists")
        self._quota.check(appended.length)
        file = self._files[appended.volume]
        try:
            data = pread_exact(file.fd, adopted_size(appended), appended.offset)
        except OSError as exc:
            raise storage_error(exc, "adopting a part") from None
        assert file.salt is not None  # a lent volume is created salted
        needle = adopted_needle(data, appended, file.salt)
        self.index.add(NeedleRef.of(needle, appended.volume, file.generation))
        self._quota.add_used(appended.length)
        return StoredPart(key=key, size=appended.length, checksum=appended.sha256)

    async def give_back(self, borrower: str, volume: int, end: int) -> None:
        """End a loan: the volume becomes one of the node's sealed ones. The borrower must
        have no append to it in flight; ``end`` is where its next one would have gone, so
        that nothing the node appends lands inside a needle it began. Tombstones of parts
        deleted meanwhile are appended now; if that fails they come back after a restart as
        orphans (logged).

        Raises:
            NotFound: The volume is not lent to ``borrower``.
        """
        lent = self._loans.held(volume, borrower)
        file = self._files[volume]
        try:
            size = await self._io.run_small(lambda: os.fstat(file.fd).st_size)
        except OSError as exc:
            raise storage_error(exc, "taking a volume back") from None
        if self._loans.out.get(volume) is not lent:  # given back meanwhile
            raise NotFound(f"volume {volume} is not lent to {borrower}")
        if end > max(size, self.volume_size) + LOAN_SLACK:  # a borrower stops at the size
            raise InvalidRequest(f"volume {volume} ends at {size}, not {end}")
        del self._loans.out[volume]
        file.end = max(aligned(size), aligned(end))  # past all the borrower wrote, or began
        if lent.deleted:
            # Their offset is taken before anything yields: no loan of this volume again
            # (it has room) may start where they go.
            tombstones = b"".join(encode_tombstone(key, salt=file.salt) for key in lent.deleted)
            try:
                with trio.CancelScope(shield=True):  # else no one writes them
                    await self._append(file, tombstones, "deleting parts")
            except Exception:
                log.warning(
                    "volume %d: %d tombstones not written; the parts come back as orphans"
                    " after a restart",
                    volume,
                    len(lent.deleted),
                    exc_info=True,
                )
            self._loans.deferred.difference_update(lent.deleted)
        try:
            with trio.CancelScope(shield=True):
                await self._loans.record()
        except OSError:  # still named there: a restart starts a new volume, nothing lost
            log.warning("volume %d: its return not recorded", volume, exc_info=True)
        self._compactions.maybe_start(volume)

    @property
    def lent(self) -> dict[int, str]:
        """The volumes lent now, and to whom."""
        return {volume: lent.borrower for volume, lent in self._loans.out.items()}


class _AloneRunner:
    """Steps without group sync: each in a thread trip of its own (a write and its
    ``fdatasync``), one after the other."""

    def __init__(self, io: BlockingIO) -> None:
        self._io = io

    async def run_steps(self, fns: Sequence[Callable[[], None]]) -> list[BaseException | None]:
        errors: list[BaseException | None] = []
        for fn in fns:
            try:
                await self._io.run(fn)
            except Exception as exc:
                errors.append(exc)
            else:
                errors.append(None)
        return errors
