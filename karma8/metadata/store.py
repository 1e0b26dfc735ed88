"""Discovery's metadata: the store's logic, one code for SQLite and PostgreSQL.

Theory of operation
-------------------
Every public method is one transaction (or, for reads, runs outside any); the SQL is
SQLite's, run as it is by :mod:`karma8.metadata.sqlite` and rewritten once per statement by
:mod:`karma8.metadata.postgres` (:mod:`karma8.metadata.sql` says what each must provide).
Write transactions never interleave: each reads what it decides on (node load, the current
version of a name) and writes in the same transaction.

Node load is kept as counters on the node row, updated in the same transaction as the part
rows they summarise, so placement and the rebalancer never scan parts:

* ``reserved_bytes``: bytes promised to parts of PENDING versions (from the size hint) and
  to part copies under way;
* ``used_bytes``: bytes on the node's disk as discovery knows them: parts whose size is known
  (committed once) and copies a move left behind, until the node reports them deleted;
* ``live_bytes``: bytes of its parts of COMMITTED versions (what the rebalancer evens out);
* ``parts`` counts part rows on the node.

The partial unique index ``one_committed`` makes "at most one committed version per name" a
property of the schema, not of the code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from karma8.core.errors import (
    DiskFull,
    IntegrityError,
    NotFound,
    PreconditionFailed,
    UploadConflict,
)
from karma8.core.layout import StripeLayout
from karma8.core.model import (
    FileEntry,
    FileVersion,
    NodeRef,
    PartPlacement,
    PartReceipt,
    VersionState,
    etag_of,
    part_key,
)
from karma8.core.placement import NodeLoad
from karma8.metadata import reservations
from karma8.metadata.access import NamespaceStore
from karma8.metadata.movestore import MoveStore
from karma8.metadata.nodeparts import NodePartsStore
from karma8.metadata.nodes import NodeStore
from karma8.metadata.rows import committed_id, layout_of, load_version, node_load
from karma8.metadata.sql import Connection, Row


class SqlMetadataStore(NamespaceStore, NodeStore, MoveStore, NodePartsStore):
    """The :class:`karma8.ports.MetadataStore` on a :class:`~karma8.metadata.sql.Database`
    (namespaces and tokens: :class:`karma8.metadata.access.NamespaceStore`; nodes:
    :class:`karma8.metadata.nodes.NodeStore`)."""

    # -- leadership -----------------------------------------------------------------------

    def hold_leadership(self, role: str, holder: str, *, now: float, until: float) -> bool:
        """Take or renew the lease of ``role`` (the sweeper, the rebalancer) for ``holder``
        until ``until``: True if ``holder`` holds it now (it was free, expired at ``now``, or
        its own). Discovery instances sharing a database run a role only while they hold it.
        """
        with self._tx() as db:
            db.execute(
                "INSERT INTO leaders(role, holder, expires_at) VALUES (:role, :holder, :until)"
                " ON CONFLICT(role) DO UPDATE SET holder = excluded.holder,"
                " expires_at = excluded.expires_at"
                " WHERE leaders.holder = excluded.holder OR leaders.expires_at <= :now",
                {"role": role, "holder": holder, "until": until, "now": now},
            )
            row = db.execute("SELECT holder FROM leaders WHERE role = ?", (role,)).fetchone()
        return bool(row["holder"] == holder)

    # -- versions -------------------------------------------------------------------------

    def begin_version(
        self,
        *,
        version_id: str,
        namespace: str,
        name: str,
        layout: StripeLayout,
        size_hint: int | None,
        now: float,
        expires_at: float,
        if_absent: bool,
        place: Callable[[Sequence[NodeLoad]], Sequence[str]],
        reserve_size: int | None = None,
    ) -> FileVersion:
        # Bytes reserved now: for ``reserve_size`` bytes of the file (default: the hint); the
        # rest is reserved as it arrives (:meth:`extend_reservation`).
        reserved_for = size_hint if reserve_size is None else min(reserve_size, size_hint or 0)
        reserve = (
            layout.slot_sizes(reserved_for) if reserved_for is not None else (0,) * layout.slots
        )
        with self._tx() as db:
            self._require_namespace(db, namespace)
            if if_absent and committed_id(db, namespace, name) is not None:
                raise PreconditionFailed(f"{namespace}/{name} already exists")
            rows = db.execute("SELECT * FROM nodes ORDER BY node_id").fetchall()
            urls = {r["node_id"]: r["url"] for r in rows}
            loads = [node_load(r) for r in rows]
            chosen = list(place(loads))
            db.execute(
                """
                INSERT INTO versions(version_id, namespace, name, state, size_hint, k, unit,
                                     copies, parity, created_at, expires_at)
                VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?)
                """,
                (
                    version_id,
                    namespace,
                    name,
                    size_hint,
                    layout.parts,
                    layout.unit,
                    layout.copies,
                    layout.parity,
                    now,
                    expires_at,
                ),
            )
            db.executemany(
                "INSERT INTO parts(version_id, idx, part_key, node_id, reserved)"
                " VALUES (?, ?, ?, ?, ?)",
                [
                    (version_id, index, part_key(version_id, index), node_id, reserve[index])
                    for index, node_id in enumerate(chosen)
                ],
            )
            db.executemany(
                "UPDATE nodes SET reserved_bytes = reserved_bytes + ?, parts = parts + 1"
                " WHERE node_id = ?",
                [(reserve[index], node_id) for index, node_id in enumerate(chosen)],
            )
        return FileVersion(
            version_id=version_id,
            namespace=namespace,
            name=name,
            state=VersionState.PENDING,
            size=None,
            layout=layout,
            parts=tuple(
                PartPlacement(
                    index=index,
                    key=part_key(version_id, index),
                    node=NodeRef(node_id=node_id, url=urls[node_id]),
                )
                for index, node_id in enumerate(chosen)
            ),
            created_at=now,
        )

    def commit_version(
        self,
        *,
        version_id: str,
        size: int,
        receipts: Sequence[PartReceipt],
        now: float,
        if_absent: bool,
    ) -> FileVersion:
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM versions WHERE version_id = ?", (version_id,)
            ).fetchone()
            if row is None:
                raise UploadConflict(f"upload {version_id} is unknown")
            if _same_commit(db, row, size, receipts):
                # A commit sent again (its answer was lost, or another discovery instance
                # got it first): it happened, so it succeeds again, changing nothing.
                return load_version(db, version_id)
            if row["state"] != VersionState.PENDING.value:
                raise UploadConflict(f"upload {version_id} is {row['state']}, not pending")
            if row["expires_at"] <= now:
                raise UploadConflict(f"upload {version_id} expired")
            layout = layout_of(row)
            by_index = _check_receipts(version_id, layout, size, receipts)
            previous = committed_id(db, row["namespace"], row["name"])
            if previous is not None:
                if if_absent:
                    raise PreconditionFailed(f"{row['namespace']}/{row['name']} already exists")
                _retire(db, previous, now)
            for receipt in receipts:
                db.execute(
                    "UPDATE parts SET size = ?, checksum = ? WHERE version_id = ? AND idx = ?",
                    (receipt.size, receipt.checksum, version_id, receipt.index),
                )
            self._release_reservations(db, version_id, count_size=True)
            _count_live(db, version_id, +1)
            checksums = [by_index[i].checksum for i in range(layout.parts)]
            db.execute(
                "UPDATE versions SET state = 'committed', size = ?, committed_at = ?, etag = ?"
                " WHERE version_id = ?",
                (size, now, etag_of(checksums), version_id),
            )
            return load_version(db, version_id)

    def placement_view(
        self, namespace: str, name: str, *, if_absent: bool
    ) -> list[tuple[NodeLoad, str]]:
        """What placing a small upload needs, read without a transaction: every node's load
        and url. Raises NotFound (namespace), PreconditionFailed (``if_absent`` and the name
        exists), so an upload that cannot commit fails before its parts are written."""
        with self._read() as db:
            self._require_namespace(db, namespace)
            if if_absent and committed_id(db, namespace, name) is not None:
                raise PreconditionFailed(f"{namespace}/{name} already exists")
            rows = db.execute("SELECT * FROM nodes ORDER BY node_id").fetchall()
        return [(node_load(r), r["url"]) for r in rows]

    def commit_placed(
        self,
        *,
        version_id: str,
        namespace: str,
        name: str,
        layout: StripeLayout,
        nodes: Sequence[str],
        size: int,
        receipts: Sequence[PartReceipt],
        created_at: float,
        now: float,
        if_absent: bool,
    ) -> FileVersion:
        """Commit a version whose parts were written without a pending row (a placement
        lease): in one transaction, insert it COMMITTED with its part rows, count their bytes
        as used and live on ``nodes``, and retire the previous version of the name.

        A node's room is checked again here: the lease reserved it only in the memory of the
        discovery that granted it, and others sharing the database do not see it.

        Raises NotFound (namespace), PreconditionFailed (``if_absent`` and the name exists),
        IntegrityError (receipts that do not match the layout), UploadConflict (the version
        id is taken), DiskFull (a node has no room left for its part).
        """
        by_index = _check_receipts(version_id, layout, size, receipts)
        etag = etag_of([by_index[i].checksum for i in range(layout.parts)])
        with self._tx() as db:
            self._require_namespace(db, namespace)
            if db.execute("SELECT 1 FROM versions WHERE version_id = ?", (version_id,)).fetchone():
                raise UploadConflict(f"upload {version_id} exists already")
            previous = committed_id(db, namespace, name)
            if previous is not None:
                if if_absent:
                    raise PreconditionFailed(f"{namespace}/{name} already exists")
                _retire(db, previous, now)
            db.execute(
                """
                INSERT INTO versions(version_id, namespace, name, state, size_hint, k, unit,
                                     copies, parity, created_at, expires_at, size,
                                     committed_at, etag)
                VALUES (?, ?, ?, 'committed', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                """,
                (
                    version_id,
                    namespace,
                    name,
                    size,
                    layout.parts,
                    layout.unit,
                    layout.copies,
                    layout.parity,
                    created_at,
                    now,
                    size,
                    now,
                    etag,
                ),
            )
            db.executemany(
                "INSERT INTO parts(version_id, idx, part_key, node_id, reserved, size, checksum)"
                " VALUES (?, ?, ?, ?, 0, ?, ?)",
                [
                    (
                        version_id,
                        index,
                        part_key(version_id, index),
                        node_id,
                        by_index[index].size,
                        by_index[index].checksum,
                    )
                    for index, node_id in enumerate(nodes)
                ],
            )
            counted = db.executemany(
                "UPDATE nodes SET used_bytes = used_bytes + :size, live_bytes = live_bytes + :size,"
                " parts = parts + 1"
                " WHERE node_id = :node AND capacity_bytes - used_bytes - reserved_bytes >= :size",
                sorted(
                    (
                        {"size": by_index[index].size, "node": node_id}
                        for index, node_id in enumerate(nodes)
                    ),
                    key=lambda update: update["node"],
                ),
            ).rowcount
            if counted != len(nodes):
                raise DiskFull(f"upload {version_id}: a node has no room left for its part")
            # The version as load_version would read it back, from what was just written (a
            # new version's parts have no loss reports): reading it costs a fifth of the commit.
            wanted = sorted(set(nodes))
            urls = dict(
                db.execute(
                    "SELECT node_id, url FROM nodes WHERE node_id IN"
                    f" ({', '.join('?' * len(wanted))})",
                    wanted,
                ).fetchall()
            )
        return FileVersion(
            version_id=version_id,
            namespace=namespace,
            name=name,
            state=VersionState.COMMITTED,
            size=size,
            layout=layout,
            parts=tuple(
                PartPlacement(
                    index=index,
                    key=part_key(version_id, index),
                    node=NodeRef(node_id=node_id, url=urls[node_id]),
                    size=by_index[index].size,
                    checksum=by_index[index].checksum,
                )
                for index, node_id in enumerate(nodes)
            ),
            created_at=created_at,
            committed_at=now,
            etag=etag,
        )

    def abort_version(self, version_id: str, now: float) -> FileVersion:
        with self._tx() as db:
            row = db.execute(
                "SELECT state FROM versions WHERE version_id = ?", (version_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"upload {version_id} is unknown")
            if row["state"] == VersionState.PENDING.value:
                self._release_reservations(db, version_id, count_size=False)
                db.execute(
                    "UPDATE versions SET state = 'aborted', retired_at = ? WHERE version_id = ?",
                    (now, version_id),
                )
            return load_version(db, version_id)

    def replace_part(
        self,
        *,
        version_id: str,
        index: int,
        failed_node_id: str,
        place: Callable[[Sequence[NodeLoad], int], Sequence[str]],
    ) -> PartPlacement:
        """Move part ``index`` of a pending version, and its reservation, off a node that
        failed writing it (see :meth:`karma8.ports.DiscoveryAPI.replace_part`), to the node
        ``place(loads, reserved bytes)`` picks among those that hold no part of the version.

        Raises:
            UploadConflict: The version is not pending, or the part is not on that node.
            NotEnoughNodes: (from ``place``) no other node can take it.
        """
        with self._tx() as db:
            row = db.execute(
                "SELECT state FROM versions WHERE version_id = ?", (version_id,)
            ).fetchone()
            if row is None or row["state"] != VersionState.PENDING.value:
                state = "unknown" if row is None else row["state"]
                raise UploadConflict(f"upload {version_id} is {state}, not pending")
            part = db.execute(
                "SELECT part_key, node_id, reserved FROM parts WHERE version_id = ? AND idx = ?",
                (version_id, index),
            ).fetchone()
            if part is None or part["node_id"] != failed_node_id:
                raise UploadConflict(
                    f"part {index} of upload {version_id} is not on node {failed_node_id}"
                )
            holding = {
                r["node_id"]
                for r in db.execute("SELECT node_id FROM parts WHERE version_id = ?", (version_id,))
            }
            rows = db.execute("SELECT * FROM nodes ORDER BY node_id").fetchall()
            loads = [node_load(r) for r in rows if r["node_id"] not in holding]
            (node_id,) = place(loads, part["reserved"])
            url = next(r["url"] for r in rows if r["node_id"] == node_id)
            db.execute(
                "UPDATE parts SET node_id = ? WHERE version_id = ? AND idx = ?",
                (node_id, version_id, index),
            )
            db.executemany(
                "UPDATE nodes SET reserved_bytes = reserved_bytes + ?, parts = parts + ?"
                " WHERE node_id = ?",
                [(-part["reserved"], -1, failed_node_id), (part["reserved"], 1, node_id)],
            )
        return PartPlacement(
            index=index, key=part["part_key"], node=NodeRef(node_id=node_id, url=url)
        )

    def extend_reservation(self, *, version_id: str, size: int) -> None:
        with self._tx() as db:
            reservations.extend(db, version_id, size)

    def expire_pending(self, now: float) -> int:
        with self._tx() as db:
            expired = [
                r["version_id"]
                for r in db.execute(
                    "SELECT version_id FROM versions WHERE state = 'pending' AND expires_at <= ?"
                    " ORDER BY version_id",
                    (now,),
                )
            ]
            for version_id in expired:
                self._release_reservations(db, version_id, count_size=False)
                db.execute(
                    "UPDATE versions SET state = 'aborted', retired_at = ? WHERE version_id = ?",
                    (now, version_id),
                )
        return len(expired)

    def _release_reservations(self, db: Connection, version_id: str, *, count_size: bool) -> None:
        for part in db.execute(
            "SELECT node_id, reserved, size FROM parts WHERE version_id = ?", (version_id,)
        ).fetchall():
            used = (part["size"] or 0) if count_size else 0
            db.execute(
                "UPDATE nodes SET reserved_bytes = reserved_bytes - ?,"
                " used_bytes = used_bytes + ? WHERE node_id = ?",
                (part["reserved"], used, part["node_id"]),
            )
        db.execute("UPDATE parts SET reserved = 0 WHERE version_id = ?", (version_id,))

    def current_version(self, namespace: str, name: str) -> FileVersion | None:
        with self._read() as db:
            version_id = committed_id(db, namespace, name)
            if version_id is None:
                self._require_namespace(db, namespace)
                return None
            return load_version(db, version_id)

    def retire_current(self, namespace: str, name: str, now: float) -> bool:
        with self._tx() as db:
            self._require_namespace(db, namespace)
            version_id = committed_id(db, namespace, name)
            if version_id is None:
                return False
            _retire(db, version_id, now)
            return True

    def list_files(self, namespace: str, *, prefix: str, after: str, limit: int) -> list[FileEntry]:
        with self._read() as db:
            self._require_namespace(db, namespace)
            rows = db.execute(
                """
                SELECT name, size, etag, committed_at FROM versions
                WHERE namespace = ? AND state = 'committed' AND name > ?
                  AND name >= ? AND name < ?
                ORDER BY name LIMIT ?
                """,
                (namespace, after, prefix, prefix + "\U0010ffff", limit),
            ).fetchall()
        return [
            FileEntry(
                name=r["name"], size=r["size"], etag=r["etag"], committed_at=r["committed_at"]
            )
            for r in rows
        ]

    def part_row(self, key: str) -> PartPlacement | None:
        """A part by its key, wherever it is (for checkers and admin tools)."""
        with self._read() as db:
            row = db.execute(
                "SELECT p.*, n.url FROM parts p JOIN nodes n USING (node_id) WHERE p.part_key = ?",
                (key,),
            ).fetchone()
        if row is None:
            return None
        return PartPlacement(
            index=row["idx"],
            key=key,
            node=NodeRef(node_id=row["node_id"], url=row["url"]),
            size=row["size"],
            checksum=row["checksum"],
        )

    def versions(self, state: VersionState | None = None) -> list[FileVersion]:
        """Every version (or those in ``state``), for checkers and admin tools."""
        with self._read() as db:
            if state is None:
                rows = db.execute("SELECT version_id FROM versions ORDER BY version_id")
            else:
                rows = db.execute(
                    "SELECT version_id FROM versions WHERE state = ? ORDER BY version_id",
                    (state.value,),
                )
            return [load_version(db, r["version_id"]) for r in rows.fetchall()]


def _check_receipts(
    version_id: str, layout: StripeLayout, size: int, receipts: Sequence[PartReceipt]
) -> dict[int, PartReceipt]:
    """The receipts by slot, once they are one per stored part with the layout's sizes and
    every copy of a data part has the same checksum."""
    by_index = {r.index: r for r in receipts}
    if sorted(by_index) != list(range(layout.slots)) or len(receipts) != layout.slots:
        raise IntegrityError(f"upload {version_id}: need one receipt per part")
    for part in range(layout.parts):
        if len({by_index[slot].checksum for slot in layout.copies_of(part)}) > 1:
            raise IntegrityError(f"upload {version_id}: the copies of part {part} differ")
    for index, want in enumerate(layout.slot_sizes(size)):
        if by_index[index].size != want:
            raise IntegrityError(
                f"upload {version_id}: part {index} has {by_index[index].size} bytes,"
                f" the layout says {want}"
            )
    return by_index


def _same_commit(db: Connection, row: Row, size: int, receipts: Sequence[PartReceipt]) -> bool:
    """Whether the version of ``row`` was committed (it may be retired since) with this size
    and these receipts."""
    if row["committed_at"] is None or row["size"] != size:
        return False
    stored = {
        r["idx"]: (r["size"], r["checksum"])
        for r in db.execute(
            "SELECT idx, size, checksum FROM parts WHERE version_id = ?", (row["version_id"],)
        ).fetchall()
    }
    given = {r.index: (r.size, r.checksum) for r in receipts}
    return len(given) == len(receipts) and given == stored


def _retire(db: Connection, version_id: str, now: float) -> None:
    """A committed version stops being current: its parts become garbage after the grace."""
    db.execute(
        "UPDATE versions SET state = 'retired', retired_at = ? WHERE version_id = ?",
        (now, version_id),
    )
    _count_live(db, version_id, -1)


def _count_live(db: Connection, version_id: str, sign: int) -> None:
    """Add (``sign`` +1) or remove (-1) a committed version's parts in their nodes' live bytes."""
    db.execute(
        """
        UPDATE nodes SET live_bytes = live_bytes + :sign * (
            SELECT coalesce(sum(p.size), 0) FROM parts p
            WHERE p.version_id = :version AND +p.node_id = nodes.node_id)
        WHERE node_id IN (SELECT node_id FROM parts WHERE version_id = :version)
        """,
        {"sign": sign, "version": version_id},
    )
