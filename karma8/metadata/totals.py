"""Cluster-wide counts for the status view (``karma8 status``, discovery's status page)."""

from __future__ import annotations

from karma8.core.model import ClusterTotals
from karma8.metadata.repairs import LOST
from karma8.metadata.sql import Connection


def totals(db: Connection) -> ClusterTotals:
    """Committed files and their bytes (one index scan: ``one_committed`` holds exactly
    them), and pending versions (``versions_pending``)."""
    files, size = db.execute(
        "SELECT count(*), coalesce(sum(size), 0) FROM versions INDEXED BY one_committed"
        " WHERE state = 'committed'"
    ).fetchone()
    (pending,) = db.execute(
        "SELECT count(*) FROM versions INDEXED BY versions_pending WHERE state = 'pending'"
    ).fetchone()
    (degraded,) = db.execute(f"SELECT count(DISTINCT version_id) FROM ({LOST}) lost").fetchone()
    return ClusterTotals(
        files=int(files),
        bytes=int(size),
        pending_uploads=int(pending),
        degraded_files=int(degraded),
    )
