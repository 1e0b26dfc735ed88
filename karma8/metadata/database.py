"""Discovery's SQLite database: the connection, its schema and the durability of commits.

Every public method of :class:`karma8.metadata.sqlite.SqliteMetadataStore` is one transaction
(:meth:`SqliteDatabase._tx`: ``BEGIN IMMEDIATE`` … ``COMMIT``), so each is atomic and
concurrent callers serialise on SQLite's write lock; reads run on the same connection, outside
transactions (or inside the open batch, below, which they see). Opening a database brings
its schema up to date (:func:`~.schema.upgrade`). The simulator opens ``:memory:`` and calls
methods inline. A file is opened in WAL mode, either with ``synchronous=FULL`` (a commit is
durable when it returns) or, with ``sync_on_commit=False``, as net mode runs it: methods run
inline on the event loop with ``synchronous=NORMAL``; the caller may defer their commits so
that many transactions share one (:attr:`SqliteDatabase.defer_commits`: each later one is a
savepoint in the first, :meth:`SqliteDatabase.commit_batch` commits them), makes commits
durable in groups with :meth:`SqliteDatabase.sync_wal` (one ``fdatasync`` of the log, in a
worker thread, for every commit before it) and, holding writers back, moves the log into the
database with :meth:`SqliteDatabase.checkpoint` (:mod:`karma8.net.metasync`). A commit's
frames are in the log, checksummed, before ``COMMIT`` returns; once the log is synced,
recovery after a power loss replays them, exactly as if the commit had synced the log itself.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from karma8.metadata.schema import upgrade
from karma8.metadata.sql import SQLITE, Database


def _owner_only(path: Path) -> None:
    """Create the database file readable by its owner only (SQLite gives its -wal and -shm
    files the database's mode), or narrow an existing one and its companions to that."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    os.close(fd)
    for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        with contextlib.suppress(FileNotFoundError):
            if file.stat().st_mode & 0o777 != 0o600:
                os.chmod(file, 0o600)


class SqliteDatabase(Database):
    """A connection to discovery's database and the durability of its commits."""

    dialect = SQLITE

    def __init__(self, path: str | Path = ":memory:", *, sync_on_commit: bool = True) -> None:
        """Open (creating if needed) the store at ``path``, or in memory.

        Args:
            sync_on_commit: Each commit syncs the log (``synchronous=FULL``). False: commits
                only write it, and the caller syncs with :meth:`sync_wal` before it acts on
                them and calls :meth:`checkpoint` when :meth:`log_bytes` says the log is long
                enough (no automatic checkpoints).
        """
        self._path = str(path)
        self._wal = None if self._path == ":memory:" else Path(self._path + "-wal")
        # The log, opened once (sync_wal): a write-back error of any write since then is
        # reported to this descriptor, even if another one (a checkpoint's fsync) saw it first.
        self._wal_fd: int | None = None
        self._wal_inode: int | None = None
        self._checkpointer: sqlite3.Connection | None = None
        # What of the log is durable, for readers in other processes (karma8/net/direct.py).
        durable_later = self._wal is not None and not sync_on_commit
        self._mark = DurableMark(Path(self._path + MARK_SUFFIX)) if durable_later else None
        self._mark_lock = threading.Lock()  # sync rounds and checkpoints run in threads
        self._epoch = 0  # checkpoints so far: a sync measured before one must not publish
        # While set, a transaction's COMMIT is deferred: it stays open, later ones join it as
        # savepoints, and commit_batch() commits them all (group commit: karma8.net.metasync).
        self.defer_commits = False
        self._batch_from = 0  # total_changes when the open batch began
        self._batch_lost = False  # SQLite rolled back a batch: fail-stop (commit_batch)
        self._mark_held = False  # a checkpoint could not empty the log (see checkpoint())
        if self._wal is not None:
            _owner_only(Path(self._path))
        # Calls may come from a worker thread (one at a time), hence check_same_thread=False.
        self._db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA foreign_keys = ON")
        if self._wal is not None:
            self._db.execute("PRAGMA journal_mode = WAL")
            if sync_on_commit:
                self._db.execute("PRAGMA synchronous = FULL")
            else:
                self._db.execute("PRAGMA synchronous = NORMAL")
                self._db.execute("PRAGMA wal_autocheckpoint = 0")
                # A transaction's pages reach the log only at its COMMIT: one rolled back
                # after spilling would leave frames past the last commit, inside the size
                # DurableMark publishes as durable, for later commits to overwrite.
                self._db.execute("PRAGMA cache_spill = OFF")
        with self._tx() as db:
            upgrade(db, SQLITE)
        self._reading = nullcontext(self._db)  # _read(): the connection itself, no layer
        if self._wal is not None and not sync_on_commit:
            self.checkpoint()  # start with an empty log: what recovery or the schema left
            self._open_wal()

    def close(self) -> None:
        if self._db.in_transaction:  # a batch no round committed: acknowledged to no one
            self._db.execute("ROLLBACK")
        if self._mark is not None:
            self._mark.close()
        if self._checkpointer is not None:
            self._checkpointer.close()
        self._db.close()
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None

    def _open_wal(self) -> None:
        """(Re)open the log if it is not the file our descriptor holds; sync a new name."""
        assert self._wal is not None
        try:
            inode = os.stat(self._wal).st_ino
        except FileNotFoundError:
            return  # no log: everything is in the database file, synced by the checkpoint
        if inode == self._wal_inode:
            return
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None
        self._wal_fd = os.open(self._wal, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._wal_inode = os.fstat(self._wal_fd).st_ino
        # As SQLite does for a log it created: the name must survive a crash too.
        directory = os.open(self._wal.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    @property
    def changes(self) -> int:
        """Rows changed through this store so far (grows with every write)."""
        return self._db.total_changes

    def sync_wal(self) -> None:
        """Make every commit so far durable: ``fdatasync`` the write-ahead log (and, for a
        new log file, its directory), then publish how much of it is durable
        (:class:`DurableMark`). Safe from any one thread at a time; does not touch the
        connection.

        Raises:
            OSError: The sync failed (the caller must treat it as fail-stop).
        """
        if self._wal is None:
            return
        self._open_wal()
        if self._wal_fd is not None:
            with self._mark_lock:
                epoch, log = self._epoch, os.fstat(self._wal_fd)
            os.fdatasync(self._wal_fd)
            with self._mark_lock:
                # Not if a checkpoint began meanwhile, nor while the last one left the log
                # full: its next writer may start it over inside its old size.
                if epoch == self._epoch and not self._mark_held and self._mark is not None:
                    self._mark.publish(log.st_ino, log.st_size)

    def log_bytes(self) -> int:
        """Size of the write-ahead log now (0 in memory or right after a checkpoint)."""
        if self._wal is None:
            return 0
        try:
            return os.stat(self._wal).st_size
        except FileNotFoundError:
            return 0

    def checkpoint(self) -> bool:
        """Copy the log into the database and empty it (``TRUNCATE``); True if it completed.

        Uses a connection of its own, so it may run in a worker thread, one caller at a time;
        it completes only if nobody writes meanwhile (the caller holds writers back), else
        the log keeps what was not copied and the next checkpoint goes on.

        Raises:
            sqlite3.Error: The checkpoint failed (an I/O error must be treated as fail-stop).
        """
        if self._wal is None:
            return True
        with self._mark_lock:  # the log is about to be emptied: no offset in it holds
            self._epoch += 1
            if self._mark is not None:
                self._mark.publish(0, 0)
        if self._checkpointer is None:
            self._checkpointer = sqlite3.connect(
                self._path, isolation_level=None, check_same_thread=False, timeout=0
            )
            self._checkpointer.execute("PRAGMA synchronous = NORMAL")
        busy, _, _ = self._checkpointer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        with self._mark_lock:
            # A checkpoint that copied the log but could not empty it (a reader in another
            # process held it) lets the next writer start the log over from its beginning,
            # inside its old size, where the mark's "no longer than" would pass commits not
            # synced yet. So the mark stays at zero (readers ask discovery) until one
            # completes, and the log grows from empty again.
            self._mark_held = bool(busy)
        return not busy

    def _read(self) -> nullcontext[sqlite3.Connection]:
        return self._reading

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db
        if db.in_transaction:
            # A batch is open (defer_commits): this transaction is a savepoint in it, undone
            # alone if it fails, committed with the others by commit_batch().
            db.execute("SAVEPOINT tx")
            try:
                yield db
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK TO tx")
                    db.execute("RELEASE tx")
                else:
                    # SQLite rolled back the whole transaction (a full disk, an I/O error):
                    # the batch's earlier transactions too, whose callers wait for it.
                    self._batch_lost = True
                raise
            db.execute("RELEASE tx")
            return
        db.execute("BEGIN IMMEDIATE")
        self._batch_from = db.total_changes
        try:
            yield db
        except BaseException:
            if db.in_transaction:  # else SQLite rolled it back itself
                db.execute("ROLLBACK")
            raise
        if not self.defer_commits:
            db.execute("COMMIT")

    def commit_batch(self) -> None:
        """Commit the transactions run since the last call while :attr:`defer_commits` was
        set (one ``COMMIT``: their pages are written to the log once, not once each).

        Raises:
            sqlite3.Error: The commit failed, or SQLite had rolled the batch back after an
                error in one of its transactions (none of them is in the log; and from then
                on every call raises: the caller must treat it as fail-stop).
        """
        if self._batch_lost:
            raise sqlite3.OperationalError(
                "SQLite rolled back a batch of transactions after an error in one of them"
            )
        if self._db.in_transaction:
            try:
                self._db.execute("COMMIT")
            finally:
                if self._db.in_transaction:  # what SQLite did not roll back itself
                    self._db.execute("ROLLBACK")

    def commit_if_unwritten(self) -> None:
        """Commit an open batch in which nothing was written (a call that changed nothing
        opened it): no round is coming for it, and an open transaction holds the write
        lock and keeps checkpoints from emptying the log."""
        if self._db.in_transaction and self._db.total_changes == self._batch_from:
            self._db.execute("COMMIT")


MARK_SUFFIX = "-durable"  # beside the database: discovery.sqlite3-durable
_MARK = struct.Struct("<QQ")  # the log's inode, and how many of its bytes are durable


class DurableMark:
    """How much of a SQLite write-ahead log is durable, published for other processes.

    Commits are visible in the log before its ``fdatasync``; a process that reads the
    database directly (a gateway worker) must not act on one that a power loss could take
    back. The writer publishes, after each sync, the log's inode and the size it had when the
    sync began, and (inode 0, size 0) before a checkpoint empties it. A reader that finished
    its read transaction when the log was at most that size (same inode) read only durable
    commits: the log only grows between checkpoints that empty it (the store's connection
    never spills a transaction's pages before its commit; after a checkpoint that could not
    empty the log, nothing is published until one does), and a checkpoint that emptied it had
    first copied every commit into the database file and synced it. The record is written
    twice; a reader that sees two different copies (a write in progress) treats it as not
    durable. The file is not synced: it describes a log that a restart recovers anyway.
    """

    def __init__(self, path: Path, *, writer: bool = True) -> None:
        flags = os.O_RDWR | os.O_CREAT if writer else os.O_RDONLY
        self._fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o600)
        if writer:
            self.publish(0, 0)

    def publish(self, inode: int, size: int) -> None:
        record = _MARK.pack(inode, size)
        os.pwrite(self._fd, record + record, 0)

    def durable(self, log: Path) -> bool:
        """Whether every commit in ``log`` as it is now is durable."""
        data = os.pread(self._fd, 2 * _MARK.size, 0)
        if len(data) != 2 * _MARK.size or data[: _MARK.size] != data[_MARK.size :]:
            return False
        inode, size = _MARK.unpack_from(data)
        try:
            now = os.stat(log)
        except FileNotFoundError:
            return False
        return now.st_size == 0 or (now.st_ino == inode and now.st_size <= size)

    def close(self) -> None:
        os.close(self._fd)
