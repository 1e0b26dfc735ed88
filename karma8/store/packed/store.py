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

import attrs
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
from karma8.store.packed.format import (
    HEADER_SIZE,
    aligned,
    encode,
    encode_tombstone,
    holds_whole_needles,
    needle_size,
    new_salt,
    scan,
)
from karma8.store.packed.index import NeedleRef, PackedIndex
from karma8.store.packed.loans import (
    LENT,
    adopted_needle,
    adopted_size,
    read_record,
    write_record,
)
from karma8.store.packed.volumes import (
    VolumeFile,
    WindowReader,
    plan_volumes,
    volume_name,
)
from karma8.store.quota import SpaceQuota

log = logging.getLogger("karma8.store.packed")

DEFAULT_VOLUME_SIZE = 1 << 30
DEFAULT_COMPACT_RATIO = 0.5
# How far past ``volume_size`` a borrower's last append may reach (it stops at the size).
LOAN_SLACK = 2 << 20
REFUSED = "refused"  # under volumes/: volumes set aside on open, nothing cut (see _set_aside)


class PackedStore:
    """Small parts as needles in append-only volume files (see :mod:`karma8.store.packed`).

    Not a full :class:`karma8.ports.PartStore`: writers buffer in
    :class:`karma8.store.tiered.TieredPartStore`, which hands a whole part to :meth:`put`.

    Attributes:
        directory: Where the volumes are (``root/volumes``).
        index: The live parts.
        compactions: How many volumes compaction has rewritten since opening.
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
        self.compact_ratio = compact_ratio
        self.index = PackedIndex()
        self.compactions = 0
        self._quota = quota
        self._io = io
        self._group = group_sync
        # Where appends' steps run: the shared sync rounds, or each alone with its own sync.
        self._runner: StepRunner = group_sync or _AloneRunner(io)
        self._files: dict[int, VolumeFile] = {}
        self._pending: set[str] = set()
        self._compacting: set[int] = set()
        self._compactions_idle: trio.Event | None = None
        self._roll_lock = trio.Lock()
        self._loans: dict[int, _Lent] = {}  # volumes lent to other processes, by id
        self._lent_lock = trio.Lock()  # one write of the LENT record at a time
        self._deferred: set[str] = set()  # keys deleted from lent volumes, tombstones to come
        self.truncated_bytes = self._recover()
        # Appends go to the highest volume, so that a key written again lands above any
        # earlier copy (of two live needles of a key, the later volume's wins at the next
        # open): the last one, unless it was written before salts or was lent when the node
        # stopped (another process may still have been appending to it), then a new one.
        # Volumes lent when the node stopped are neither appended to nor lent again in this
        # run, and stay in the record until the loans end cleanly (end_loans).
        self._was_lent = self._read_lent()
        last = max(self._files, default=0)
        reuse = bool(last) and self._files[last].salt is not None and last not in self._was_lent
        self._drop_empty(keep=last if reuse else None)
        if not reuse:
            last = max(self._files, default=0)
            self._files[last + 1] = self._create(last + 1, 0)
        self._active = max(self._files)
        quota.add_used(self.index.payload_bytes)

    # -- opening ----------------------------------------------------------------------------

    def _recover(self) -> int:
        """Load every volume's newest generation; returns the torn bytes truncated.

        A volume in which no needle checks out under the salt its name gives, though whole
        needles are in it, is set aside (:meth:`_set_aside`), not cut to nothing.
        """
        names = os.listdir(self.directory)
        for name in names:
            if name.endswith(".tmp"):  # an interrupted compaction's output
                (self.directory / name).unlink(missing_ok=True)
        plan = plan_volumes(names)
        for name in plan.unknown:
            log.warning("%s: not a volume's name; left alone", self.directory / name)
        for name in plan.superseded:
            (self.directory / name).unlink()
        for name, volume in plan.renumber:
            generation, salt = plan.current[volume]
            target = self.directory / volume_name(volume, generation, salt)
            log.warning(
                "%s: another volume has its id (an earlier karma8 ran on this directory);"
                " renamed %s",
                self.directory / name,
                target.name,
            )
            os.rename(self.directory / name, target)
        if plan.renumber:
            fsync_dir(self.directory)
        truncated = 0
        for volume in sorted(plan.current):
            generation, salt = plan.current[volume]
            path = self.directory / volume_name(volume, generation, salt)
            fd = os.open(path, os.O_RDWR | O_CLOEXEC)
            size = os.fstat(fd).st_size
            reader = WindowReader(fd)
            found = scan(reader.read, size, salt)
            if found.end == 0 < size and holds_whole_needles(reader.read, size):
                os.close(fd)
                self._set_aside(path)
                continue
            if found.end < size:
                log.warning(
                    "%s: %d bytes after the last intact needle cut off (never acknowledged)",
                    path,
                    size - found.end,
                )
                os.ftruncate(fd, found.end)
                os.fsync(fd)
                truncated += size - found.end
            self.index.load(volume, generation, found.needles)
            self._files[volume] = VolumeFile(volume, generation, salt, path, fd, found.end)
        return truncated

    def _read_lent(self) -> set[int]:
        """The volumes :data:`LENT` says were lent when the store last ran (every volume,
        if the record cannot be read)."""
        try:
            return read_record(self.directory)
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("%s unreadable (%s): no volume is lent or appended to again", LENT, exc)
            return set(self._files)

    async def _record_loans(self) -> None:
        """:meth:`_write_lent` in a thread, one at a time."""
        async with self._lent_lock:
            await self._io.run(self._write_lent)

    def _write_lent(self) -> None:
        """Record the volumes lent now in :data:`LENT`, durably (blocking): a restart after
        a crash then knows which volumes another process may have been appending to."""
        write_record(self.directory, {*self._loans, *self._was_lent})

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

    def _set_aside(self, path: Path) -> None:
        """Move a volume none of whose needles checks out under its salt, though whole ones
        are in it, to ``volumes/refused/``: not cut as a torn tail, and out of the way."""
        aside = self.directory / REFUSED
        aside.mkdir(mode=DIR_MODE, exist_ok=True)
        os.rename(path, aside / path.name)
        fsync_dir(aside)
        fsync_dir(self.directory)
        log.error(
            "%s: no needle checks out under the salt its name gives, yet whole needles are"
            " in it (renamed, copied under another name, or every header damaged): moved to"
            " %s, nothing cut; its parts are missing here until it is back under its own name",
            path,
            aside / path.name,
        )

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
        loans, self._loans = self._loans, {}
        for volume, lent in loans.items():
            if lent.deleted:
                self._write_tombstones(self._files[volume], lent.deleted)
        self._deferred.clear()
        if loans or self._was_lent:
            self._was_lent = set()  # a whole run later: no writer of before is left
            try:
                self._write_lent()
            except OSError:  # still named there: a restart starts a new volume, nothing lost
                log.warning("the end of %d loans not recorded", len(loans), exc_info=True)

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
        return frozenset(self._compacting)

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
                self._maybe_compact(sealed)
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
            lent = self._loans.get(ref.volume)
            if lent is not None:  # its tombstone waits for the volume to come back
                lent.deleted.append(key)
                self._deferred.add(key)  # all before the checkpoint: no delete or return
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
        self._maybe_compact(ref.volume)
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
            self._loans[file.volume] = _Lent(borrower)
            try:
                await self._record_loans()
            except BaseException as exc:  # cancelled too: else lent to nobody
                del self._loans[file.volume]
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
                and volume not in self._loans
                and volume not in self._was_lent
                and volume not in self._compacting
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
        lent = self._loans.get(appended.volume)
        if lent is None or lent.borrower != borrower:
            raise NotFound(f"volume {appended.volume} is not lent to {borrower}")
        key = appended.key
        if self.has(key) or key in self._deferred:
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
        lent = self._loans.get(volume)
        if lent is None or lent.borrower != borrower:
            raise NotFound(f"volume {volume} is not lent to {borrower}")
        file = self._files[volume]
        try:
            size = await self._io.run_small(lambda: os.fstat(file.fd).st_size)
        except OSError as exc:
            raise storage_error(exc, "taking a volume back") from None
        if self._loans.get(volume) is not lent:  # given back meanwhile
            raise NotFound(f"volume {volume} is not lent to {borrower}")
        if end > max(size, self.volume_size) + LOAN_SLACK:  # a borrower stops at the size
            raise InvalidRequest(f"volume {volume} ends at {size}, not {end}")
        del self._loans[volume]
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
            self._deferred.difference_update(lent.deleted)
        try:
            with trio.CancelScope(shield=True):
                await self._record_loans()
        except OSError:  # still named there: a restart starts a new volume, nothing lost
            log.warning("volume %d: its return not recorded", volume, exc_info=True)
        self._maybe_compact(volume)

    @property
    def lent(self) -> dict[int, str]:
        """The volumes lent now, and to whom."""
        return {volume: lent.borrower for volume, lent in self._loans.items()}

    # -- compaction -------------------------------------------------------------------------

    def garbage_ratio(self, volume: int) -> float:
        """The share of a volume's bytes that no live part uses."""
        end = self._files[volume].end
        return 1 - self.index.live_bytes(volume) / end if end else 0.0

    def _should_compact(self, volume: int) -> bool:
        return (
            volume != self._active
            and volume not in self._compacting
            and volume not in self._loans
            and volume in self._files
            and self.garbage_ratio(volume) >= self.compact_ratio
        )

    def _maybe_compact(self, volume: int) -> None:
        """Start compacting a sealed volume in the background once its garbage passes the
        ratio (a system task: the store owns no nursery, as the group sync's early rounds)."""
        if self._should_compact(volume):
            self._compacting.add(volume)
            try:
                trio.lowlevel.spawn_system_task(
                    self._compact_in_background, volume, name=f"compact volume {volume}"
                )
            except RuntimeError:  # the run is shutting down
                self._compacting.discard(volume)

    async def _compact_in_background(self, volume: int) -> None:
        try:
            await self._compact(volume)
        except Exception:  # nothing may escape a system task; the volume stays as it was
            log.exception("compacting volume %d failed", volume)

    async def compact(self) -> int:
        """Compact every sealed volume whose garbage passes the ratio, now, and wait for the
        compactions running in the background; how many this call ran."""
        done = 0
        for volume in sorted(self._files):
            if self._should_compact(volume):
                self._compacting.add(volume)
                await self._compact(volume)
                done += 1
        while self._compacting:
            self._compactions_idle = self._compactions_idle or trio.Event()
            await self._compactions_idle.wait()
        return done

    async def _compact(self, volume: int) -> None:
        """Rewrite a sealed volume with its live needles only, as its next generation.

        Appends never go to a sealed volume except tombstones, so writes carry on in the
        active one. Readers keep reading the old generation until the switch, which is
        atomic on the event loop; one that started before it holds the old descriptor open.
        Parts deleted while the copy ran get their tombstones again in the new file.
        """
        old = self._files[volume]
        generation = old.generation + 1
        final = self.directory / volume_name(volume, generation, old.salt)
        tmp = final.with_name(final.name + ".tmp")
        old.pin()
        try:
            await old.wait_idle()  # a commit that took its offset before the volume sealed
            snapshot = self.index.refs_in(volume)
            offsets, end = await trio.to_thread.run_sync(
                lambda: volume_files.copy_needles(old.fd, snapshot, tmp)
            )
            old.closing = trio.Event()
            await old.wait_idle()
            dead = [ref for ref in snapshot if not self.index.is_current(ref)]
            fd = await trio.to_thread.run_sync(
                lambda: volume_files.finish_generation(
                    tmp, final, end, [r.key for r in dead], old.salt
                )
            )
            # The switch: no checkpoint until the index names only the new file.
            for ref, offset in zip(snapshot, offsets, strict=True):
                self.index.move(ref, ref.moved(generation, offset))
            end += sum(needle_size(len(r.key.encode()), 0) for r in dead)  # their tombstones
            self._files[volume] = VolumeFile(volume, generation, old.salt, final, fd, end)
            old.retired = True
            self.compactions += 1
            gone = [old.path]
            if end == 0:  # nothing left: the volume goes, and its inode with it
                del self._files[volume]
                close_quietly(fd)
                gone.append(final)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(lambda: volume_files.unlink_all(gone))
        finally:
            closing, old.closing = old.closing, None
            if closing is not None:
                closing.set()
            old.unpin()
            self._compacting.discard(volume)
            if not self._compacting and self._compactions_idle is not None:
                self._compactions_idle.set()
                self._compactions_idle = None
            if not old.retired:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(lambda: tmp.unlink(missing_ok=True))


@attrs.define
class _Lent:
    """A lent volume's state at the node: its borrower, and the parts deleted from it whose
    tombstones wait for its return."""

    borrower: str
    deleted: list[str] = attrs.Factory(list)


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
