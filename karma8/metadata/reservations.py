"""Reservations that grow with the bytes an upload has received (one transaction each).

At begin, discovery reserves each part's share of at most ``reserve_step`` bytes of the
size hint (``SqlMetadataStore.begin_version``'s ``reserve_size``); the gateway asks for
more as the body passes what is reserved. Releasing them is unchanged: commit, abort and
expiry release what each part row holds.
"""

from __future__ import annotations

from karma8.core.errors import DiskFull, UploadConflict
from karma8.core.model import VersionState
from karma8.metadata.rows import layout_of
from karma8.metadata.sql import Connection


def extend(db: Connection, version_id: str, size: int) -> None:
    """Reserve, for every part of a pending version, its share of a ``size``-byte file
    (a part already holding at least that keeps its reservation).

    Raises:
        UploadConflict: The version is not pending.
        DiskFull: A part's node has no room for the extra bytes (nothing is reserved).
    """
    row = db.execute(
        "SELECT state, k, unit, copies, parity FROM versions WHERE version_id = ?", (version_id,)
    ).fetchone()
    if row is None or row["state"] != VersionState.PENDING.value:
        state = "unknown" if row is None else row["state"]
        raise UploadConflict(f"upload {version_id} is {state}, not pending")
    wanted = layout_of(row).slot_sizes(size)
    parts = db.execute(
        "SELECT p.idx, p.node_id, p.reserved, n.capacity_bytes - n.used_bytes"
        " - n.reserved_bytes AS free FROM parts p JOIN nodes n USING (node_id)"
        " WHERE p.version_id = ? ORDER BY p.idx",
        (version_id,),
    ).fetchall()
    grow = [(wanted[p["idx"]] - p["reserved"], p) for p in parts]
    for extra, part in grow:
        if extra > 0 and extra > part["free"]:
            raise DiskFull(
                f"node {part['node_id']} has no room for {extra} more bytes of part"
                f" {part['idx']} of upload {version_id}"
            )
    for extra, part in grow:
        if extra > 0:
            db.execute(
                "UPDATE parts SET reserved = reserved + ? WHERE version_id = ? AND idx = ?",
                (extra, version_id, part["idx"]),
            )
            db.execute(
                "UPDATE nodes SET reserved_bytes = reserved_bytes + ? WHERE node_id = ?",
                (extra, part["node_id"]),
            )
