"""Namespaces and their tokens in discovery's database: each method one transaction.

A token row keeps the sha256 of the token's secret, never the secret; :meth:`check_access`
compares hashes in constant time. A disabled namespace is as if it did not exist (its files
and tokens stay, and come back if it is enabled again). See :mod:`karma8.core.access`.
"""

from __future__ import annotations

import hmac

from karma8.core.access import NamespaceInfo, Right, TokenInfo
from karma8.core.errors import Forbidden, InvalidRequest, NotFound, Unauthorized
from karma8.core.layout import StripeLayout
from karma8.metadata.sql import Connection, Database, Row


class NamespaceStore(Database):
    """The namespace and token half of :class:`karma8.ports.MetadataStore`."""

    def create_namespace(self, namespace: str, now: float, *, public: bool = False) -> None:
        """Make sure ``namespace`` exists (as configured at start-up): created if missing, made
        public if ``public``; a disabled one stays disabled, a public one stays public."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO namespaces(name, created_at, public) VALUES (?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (namespace, now, int(public)),
            )
            if public:
                db.execute("UPDATE namespaces SET public = 1 WHERE name = ?", (namespace,))

    def add_namespace(
        self, namespace: str, now: float, *, public: bool, copies: int = 1, parity: int = 0
    ) -> NamespaceInfo:
        """Create ``namespace`` (an operator's command) with an engine (``copies`` of each part
        or ``parity`` parts; see :func:`karma8.core.layout.engine_redundancy`). Idempotent; a
        disabled namespace is enabled again. Raises InvalidRequest, naming what differs and
        what to ask for, if it exists and is public where ``public`` says private, or the
        other way round, or has another engine or count (none is changed silently: files
        keep the engine they were written with, and a mistyped name must not enable a public
        namespace someone asked for as private)."""
        with self._tx() as db:
            row = _namespace_row(db, namespace)
            if row is None:
                db.execute(
                    "INSERT INTO namespaces(name, created_at, public, copies, parity)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (namespace, now, int(public), copies, parity),
                )
            elif (bool(row["public"]), row["copies"], row["parity"]) != (public, copies, parity):
                raise InvalidRequest(_not_as_asked(_namespace(row), public, copies, parity))
            else:
                db.execute("UPDATE namespaces SET enabled = 1 WHERE name = ?", (namespace,))
            info = _namespace_row(db, namespace)
        assert info is not None
        return _namespace(info)

    def disable_namespace(self, namespace: str) -> NamespaceInfo:
        """No more reads or writes in ``namespace`` (404, as if it did not exist); its files and
        tokens are kept. Raises NotFound for an unknown namespace."""
        with self._tx() as db:
            if _namespace_row(db, namespace) is None:
                raise NotFound(f"namespace {namespace!r} does not exist")
            db.execute("UPDATE namespaces SET enabled = 0 WHERE name = ?", (namespace,))
            row = _namespace_row(db, namespace)
        assert row is not None
        return _namespace(row)

    def list_namespaces(self) -> list[NamespaceInfo]:
        with self._read() as db:
            rows = db.execute("SELECT * FROM namespaces ORDER BY name").fetchall()
        return [_namespace(r) for r in rows]

    def namespace_info(self, namespace: str) -> NamespaceInfo:
        """An enabled namespace; raises NotFound for an unknown or disabled one."""
        with self._read() as db:
            row = _namespace_row(db, namespace)
        if row is None or not row["enabled"]:
            raise NotFound(f"namespace {namespace!r} does not exist or is disabled")
        return _namespace(row)

    def namespace_exists(self, namespace: str) -> bool:
        with self._read() as db:
            row = _namespace_row(db, namespace)
        return row is not None and bool(row["enabled"])

    def _require_namespace(self, db: Connection, namespace: str) -> None:
        row = _namespace_row(db, namespace)
        if row is None or not row["enabled"]:
            raise NotFound(f"namespace {namespace!r} does not exist or is disabled")

    # -- tokens ---------------------------------------------------------------------------

    def add_token(
        self,
        *,
        token_id: str,
        namespace: str,
        read: bool,
        write: bool,
        secret_hash: str,
        now: float,
    ) -> TokenInfo:
        """Record a token of an enabled namespace. Raises NotFound, InvalidRequest (no right)."""
        if not (read or write):
            raise InvalidRequest("a token needs the read right, the write right or both")
        with self._tx() as db:
            self._require_namespace(db, namespace)
            db.execute(
                "INSERT INTO tokens(token_id, namespace, can_read, can_write, secret_hash,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (token_id, namespace, int(read), int(write), secret_hash, now),
            )
            row = db.execute("SELECT * FROM tokens WHERE token_id = ?", (token_id,)).fetchone()
        return _token(row)

    def list_tokens(self, namespace: str | None = None) -> list[TokenInfo]:
        """Every token, or ``namespace``'s (a disabled one's too). Raises NotFound for a
        namespace that was never created."""
        with self._read() as db:
            if namespace is None:
                rows = db.execute("SELECT * FROM tokens ORDER BY namespace, created_at")
            else:
                if _namespace_row(db, namespace) is None:
                    raise NotFound(f"namespace {namespace!r} does not exist")
                rows = db.execute(
                    "SELECT * FROM tokens WHERE namespace = ? ORDER BY created_at", (namespace,)
                )
            return [_token(r) for r in rows.fetchall()]

    def revoke_token(self, token_id: str, now: float) -> TokenInfo:
        """Revoke a token (idempotent: the first revocation's time stays). Raises NotFound."""
        with self._tx() as db:
            db.execute(
                "UPDATE tokens SET revoked_at = ? WHERE token_id = ? AND revoked_at IS NULL",
                (now, token_id),
            )
            row = db.execute("SELECT * FROM tokens WHERE token_id = ?", (token_id,)).fetchone()
        if row is None:
            raise NotFound(f"token {token_id!r} does not exist")
        return _token(row)

    def check_access(
        self, namespace: str, token_id: str | None, secret_hash: str | None, right: Right
    ) -> None:
        """Raise unless the token (or anyone, in a public namespace) may ``right`` there.

        NotFound: the namespace does not exist or is disabled. Unauthorized: no token, or an
        unknown, wrong or revoked one. Forbidden: a token of another namespace or without
        the right.
        """
        with self._read() as db:
            row = db.execute(
                "SELECT n.enabled, n.public, t.namespace, t.can_read, t.can_write,"
                " t.secret_hash, t.revoked_at FROM namespaces n"
                " LEFT JOIN tokens t ON t.token_id = ? WHERE n.name = ?",
                (token_id, namespace),
            ).fetchone()
        if row is None or not row["enabled"]:
            raise NotFound(f"namespace {namespace!r} does not exist or is disabled")
        if row["public"]:
            return
        if token_id is None or secret_hash is None:
            raise Unauthorized(f"namespace {namespace!r} needs a token (Authorization: Bearer)")
        stored = row["secret_hash"]
        if stored is None or not hmac.compare_digest(stored.encode(), secret_hash.encode()):
            raise Unauthorized("the token is not valid")
        if row["revoked_at"] is not None:
            raise Unauthorized("the token was revoked")
        if row["namespace"] != namespace:
            raise Forbidden(f"the token is not for namespace {namespace!r}")
        if not row["can_read" if right is Right.READ else "can_write"]:
            raise Forbidden(f"the token may not {right.value} in namespace {namespace!r}")


def _namespace_row(db: Connection, namespace: str) -> Row | None:
    row: Row | None = db.execute("SELECT * FROM namespaces WHERE name = ?", (namespace,)).fetchone()
    return row


def _namespace(row: Row) -> NamespaceInfo:
    return NamespaceInfo(
        name=row["name"],
        public=bool(row["public"]),
        enabled=bool(row["enabled"]),
        created_at=row["created_at"],
        engine=StripeLayout(copies=row["copies"], parity=row["parity"]).engine,
        copies=row["copies"],
        parity=row["parity"],
    )


def _not_as_asked(info: NamespaceInfo, public: bool, copies: int, parity: int) -> str:
    """Why a namespace that exists was not created (enabled) as asked: what it is and what
    was asked, where they differ, and what to ask for (the options of ``karma8 namespace
    create``)."""
    access = {True: "public", False: "private"}
    has = StripeLayout(copies=info.copies, parity=info.parity).label
    asked = StripeLayout(copies=copies, parity=parity).label
    if info.public != public and has != asked:
        differs = (
            f"as {access[info.public]} with engine {has}, not {access[public]} with engine {asked}"
        )
    elif info.public != public:
        differs = f"as {access[info.public]}, not {access[public]}"
    else:
        differs = f"with engine {has}, not {asked}"
    if info.enabled:
        return (
            f"namespace {info.name!r} already exists {differs}; its access and engine never change"
        )
    options = ["--public"] if info.public else []
    if info.engine != "raid0":
        options += ["--engine", info.engine]
    if info.engine == "raid1":
        options += ["--copies", str(info.copies)]
    if info.engine == "parity":
        options += ["--parity", str(info.parity)]
    same = f"ask for the same ({' '.join(options)})" if options else "ask for the same (no options)"
    return f"namespace {info.name!r} already exists {differs}; {same} to enable it again"


def _token(row: Row) -> TokenInfo:
    return TokenInfo(
        token_id=row["token_id"],
        namespace=row["namespace"],
        read=bool(row["can_read"]),
        write=bool(row["can_write"]),
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )
