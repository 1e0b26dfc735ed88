"""Access to namespaces: rights, tokens and the gateway's cache of positive answers.

Theory of operation
-------------------
A namespace is either *public* (anyone may read and write it, with or without a token) or
private: every request then carries ``Authorization: Bearer <token>``. A token belongs to one
namespace and grants ``read``, ``write`` or both. Its text is ``k8t_<id>_<secret>``: discovery
looks the token up by ``id`` and compares the sha256 of ``secret`` with the stored one (the
secret is random and long, so a plain hash is enough; it is never stored in clear).

The gateway remembers positive answers for a few seconds (:class:`AccessCache`) so that small
requests do not each pay a discovery round trip; a revoked token or a disabled namespace is
refused once the answers about it have expired. Refusals are never cached.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Hashable

import attrs

from karma8.core.errors import InvalidRequest

TOKEN_PREFIX = "k8t_"


class Right(enum.Enum):
    READ = "read"
    WRITE = "write"


@attrs.frozen(kw_only=True)
class NamespaceInfo:
    name: str
    public: bool
    enabled: bool
    created_at: float
    # The engine new files are written with (see karma8.core.layout.engine_redundancy).
    engine: str = "raid0"
    copies: int = 1
    parity: int = 0


@attrs.frozen(kw_only=True)
class TokenInfo:
    """A token as discovery lists it: never its secret."""

    token_id: str
    namespace: str
    read: bool
    write: bool
    created_at: float
    revoked_at: float | None = None

    @property
    def rights(self) -> str:
        return "+".join(r for r, on in (("read", self.read), ("write", self.write)) if on)

    def grants(self, right: Right) -> bool:
        return self.read if right is Right.READ else self.write


def parse_right(raw: str) -> Right:
    try:
        return Right(raw)
    except ValueError:
        raise InvalidRequest(f"right must be 'read' or 'write', got {raw!r}") from None


def format_token(token_id: str, secret: str) -> str:
    return f"{TOKEN_PREFIX}{token_id}_{secret}"


def parse_token(token: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a well-formed token, else None (a refusal, not a bad request)."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    token_id, sep, secret = token[len(TOKEN_PREFIX) :].partition("_")
    if not (sep and token_id.isalnum() and secret.isalnum()):
        return None
    return token_id, secret


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None without one (or with
    another scheme): the request is anonymous."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def cache_key(namespace: str, token: str | None, right: Right) -> tuple[str, str, str]:
    """What :class:`AccessCache` keeps for an answer: the token only as its hash."""
    digest = hashlib.sha256(token.encode()).hexdigest() if token is not None else ""
    return namespace, digest, right.value


class AccessCache:
    """Positive access answers, each kept for ``ttl`` seconds (``now`` is passed in)."""

    def __init__(self, ttl: float, *, max_entries: int = 10_000) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._until: dict[Hashable, float] = {}

    def allows(self, key: Hashable, now: float) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if now < until:
            return True
        del self._until[key]
        return False

    def remember(self, key: Hashable, now: float) -> None:
        if self._ttl <= 0:
            return
        if len(self._until) >= self._max:
            self._until = {k: u for k, u in self._until.items() if u > now}
            if len(self._until) >= self._max:
                self._until.clear()
        self._until[key] = now + self._ttl
