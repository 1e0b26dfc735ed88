"""Discovery's namespaces and their tokens: the share of :class:`karma8.ports.DiscoveryAPI`
that creates, lists and disables namespaces, issues and revokes tokens, and checks a request's
access (rules in :mod:`karma8.core.access`). Part of :class:`karma8.actors.discovery.Discovery`,
as the metadata store's parts make up its store.

A token's secret is shown once, when it is created; discovery keeps only its hash.
"""

from __future__ import annotations

import logging

from karma8.core.access import (
    NamespaceInfo,
    Right,
    TokenInfo,
    format_token,
    hash_secret,
    parse_token,
)
from karma8.core.errors import InvalidRequest
from karma8.core.layout import engine_redundancy
from karma8.core.names import check_namespace
from karma8.ports import Clock, IdSource, MetadataRunner, MetadataStore

log = logging.getLogger("karma8.discovery")


class NamespaceDesk:
    """Namespaces and tokens over the discovery's store; the attributes below are set by
    :class:`karma8.actors.discovery.Discovery`."""

    _store: MetadataStore
    _blocking: MetadataRunner
    _clock: Clock
    _ids: IdSource

    async def create_namespace(
        self,
        *,
        namespace: str,
        public: bool = False,
        engine: str = "raid0",
        copies: int | None = None,
        parity: int | None = None,
    ) -> NamespaceInfo:
        check_namespace(namespace)
        try:
            chosen = engine_redundancy(engine, copies=copies, parity=parity)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        now = self._clock.now()
        return await self._blocking(
            lambda: self._store.add_namespace(
                namespace, now, public=public, copies=chosen[0], parity=chosen[1]
            )
        )

    async def list_namespaces(self) -> list[NamespaceInfo]:
        return await self._blocking(self._store.list_namespaces)

    async def disable_namespace(self, *, namespace: str) -> NamespaceInfo:
        check_namespace(namespace)
        return await self._blocking(lambda: self._store.disable_namespace(namespace))

    async def create_token(
        self, *, namespace: str, read: bool, write: bool
    ) -> tuple[str, TokenInfo]:
        check_namespace(namespace)
        token_id = self._ids.new_id()
        secret = self._ids.new_id() + self._ids.new_id()
        now = self._clock.now()
        info = await self._blocking(
            lambda: self._store.add_token(
                token_id=token_id,
                namespace=namespace,
                read=read,
                write=write,
                secret_hash=hash_secret(secret),
                now=now,
            )
        )
        log.info("token %s created for namespace %s (%s)", token_id, namespace, info.rights)
        return format_token(token_id, secret), info

    async def list_tokens(self, *, namespace: str | None = None) -> list[TokenInfo]:
        if namespace is not None:
            check_namespace(namespace)
        return await self._blocking(lambda: self._store.list_tokens(namespace))

    async def revoke_token(self, *, token_id: str) -> TokenInfo:
        now = self._clock.now()
        info = await self._blocking(lambda: self._store.revoke_token(token_id, now))
        log.info("token %s of namespace %s revoked", token_id, info.namespace)
        return info

    async def check_access(self, *, namespace: str, token: str | None, right: Right) -> None:
        check_namespace(namespace)
        token_id: str | None = None
        secret_hash: str | None = None
        if token is not None:
            parsed = parse_token(token)
            # A malformed token is looked up as the empty id, which no token has: 401.
            token_id, secret = parsed if parsed is not None else ("", "")
            secret_hash = hash_secret(secret)
        await self._blocking(
            lambda: self._store.check_access(namespace, token_id, secret_hash, right)
        )
