"""Reading discovery's rows back as the model's records (karma8.core.model)."""

from __future__ import annotations

from karma8.core.errors import NotFound
from karma8.core.layout import StripeLayout
from karma8.core.model import (
    FileVersion,
    NodeRef,
    NodeState,
    NodeStatus,
    PartPlacement,
    VersionState,
)
from karma8.core.placement import NodeLoad
from karma8.metadata.sql import Connection, Row


def committed_id(db: Connection, namespace: str, name: str) -> str | None:
    """The id of the committed version of ``namespace/name``, if any."""
    row = db.execute(
        "SELECT version_id FROM versions WHERE namespace = ? AND name = ? AND state = 'committed'",
        (namespace, name),
    ).fetchone()
    return None if row is None else str(row["version_id"])


def load_version(db: Connection, version_id: str) -> FileVersion:
    """A version with its parts, in index order. Raises NotFound."""
    row = db.execute("SELECT * FROM versions WHERE version_id = ?", (version_id,)).fetchone()
    if row is None:
        raise NotFound(f"version {version_id} is unknown")
    parts = db.execute(
        """
        SELECT p.idx, p.part_key, p.size, p.checksum, n.node_id, n.url, d.reason
        FROM parts p JOIN nodes n USING (node_id)
        LEFT JOIN damaged_parts d ON d.part_key = p.part_key AND d.node_id = p.node_id
        WHERE p.version_id = ? ORDER BY p.idx
        """,
        (version_id,),
    ).fetchall()
    return FileVersion(
        version_id=row["version_id"],
        namespace=row["namespace"],
        name=row["name"],
        state=VersionState(row["state"]),
        size=row["size"],
        layout=layout_of(row),
        parts=tuple(
            PartPlacement(
                index=p["idx"],
                key=p["part_key"],
                node=NodeRef(node_id=p["node_id"], url=p["url"]),
                size=p["size"],
                checksum=p["checksum"],
                reported_lost=p["reason"],
            )
            for p in parts
        ),
        created_at=row["created_at"],
        committed_at=row["committed_at"],
        etag=row["etag"],
    )


def node_status(row: Row) -> NodeStatus:
    """A node row as discovery reports it."""
    return NodeStatus(
        node_id=row["node_id"],
        url=row["url"],
        state=NodeState(row["state"]),
        capacity_bytes=row["capacity_bytes"],
        used_bytes=row["used_bytes"],
        reserved_bytes=row["reserved_bytes"],
        parts=row["parts"],
        last_seen=row["last_seen"],
        failed_at=row["failed_at"],
        forgotten_at=row["forgotten_at"],
    )


def node_load(row: Row) -> NodeLoad:
    """What placement needs to know of a node row (only AVAILABLE nodes are candidates)."""
    return NodeLoad(
        node_id=row["node_id"],
        capacity=row["capacity_bytes"],
        used=row["used_bytes"],
        reserved=row["reserved_bytes"],
        available=row["state"] == NodeState.AVAILABLE.value,
        live=row["live_bytes"],
    )


def layout_of(row: Row) -> StripeLayout:
    """The layout a version row was written with."""
    return StripeLayout(
        parts=row["k"], unit=row["unit"], copies=row["copies"], parity=row["parity"]
    )
