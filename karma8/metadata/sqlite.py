"""Discovery's metadata in SQLite (stdlib ``sqlite3``), the embedded default: the store's
logic (:mod:`karma8.metadata.store`) on :class:`~karma8.metadata.database.SqliteDatabase`."""

from __future__ import annotations

from karma8.metadata.database import SqliteDatabase
from karma8.metadata.store import SqlMetadataStore


class SqliteMetadataStore(SqliteDatabase, SqlMetadataStore):
    """The :class:`karma8.ports.MetadataStore` on SQLite: a file, or ``:memory:``."""

    def hold_leadership(self, role: str, holder: str, *, now: float, until: float) -> bool:
        """Always: one discovery process owns a SQLite file, so it leads every role (no
        lease to wait out after a restart, no write)."""
        return True
