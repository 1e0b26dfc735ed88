"""Discovery's role in net mode: its database (SQLite or PostgreSQL), the discovery actor,
and the rebalancer and repair beside it, each run while this instance leads it."""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import trio

from karma8.actors.discovery import Discovery, DiscoveryConfig
from karma8.actors.rebalancer import Rebalancer
from karma8.actors.repair import Repairer
from karma8.core.errors import Unavailable
from karma8.core.layout import StripeLayout
from karma8.core.tomlconf import ConfigError
from karma8.metadata.sqlite import SqliteMetadataStore
from karma8.metadata.store import SqlMetadataStore
from karma8.net.discovery_app import discovery_app
from karma8.net.metasync import GroupCommitRunner
from karma8.net.metrics import METRICS
from karma8.net.netconfig import NetConfig
from karma8.net.requestlog import RecentErrors
from karma8.net.serving import (
    RandomIds,
    ThreadRunner,
    WallClock,
    data_pool,
    serving,
    storage_client,
)
from karma8.net.sources import discovery_source
from karma8.ports import MetadataRunner, StorageAPI
from karma8.store.diskio import hold_lock, private_dir

log = logging.getLogger("karma8.serve")


def open_metadata(config: NetConfig, path: Path) -> SqlMetadataStore:
    """Discovery's database as net mode runs it: PostgreSQL at ``metadata_url``, else SQLite
    at ``path`` with commits made durable in groups.

    Raises:
        SchemaError: PostgreSQL's schema is not this karma8's (``karma8 db upgrade``).
        ConfigError: PostgreSQL cannot be reached.
    """
    if config.metadata_url is None:
        # One discovery on a SQLite database: a second would keep its own placement leases,
        # caches and sync rounds, and both would answer for the cluster.
        hold_lock(
            path.with_name(path.name + ".lock"),
            lambda pid: (
                f"discovery's database {path} is in use by another process (pid {pid});"
                " one discovery serves a SQLite database: stop that one first (several discovery"
                " instances share PostgreSQL: metadata_url)"
            ),
        )
        return SqliteMetadataStore(path, sync_on_commit=False)
    import psycopg  # only here: psycopg takes ~0.1 s to import, every other command spared

    from karma8.metadata.postgres import PostgresMetadataStore

    try:
        return PostgresMetadataStore(config.metadata_url, pool_size=config.metadata_connections)
    except psycopg.Error as exc:
        raise ConfigError(f"cannot open the metadata at metadata_url: {exc}") from None


def check_metadata(config: NetConfig) -> None:
    """Fail before start-up unless PostgreSQL (if configured) is reachable with this
    karma8's schema; raises as :func:`open_metadata` does."""
    if config.metadata_url is not None:
        import psycopg

        from karma8.metadata.postgres import PostgresDatabase

        try:
            PostgresDatabase(config.metadata_url, pool_size=1).close()
        except psycopg.Error as exc:
            raise ConfigError(f"cannot open the metadata at metadata_url: {exc}") from None


def build_discovery(
    config: NetConfig, store: SqlMetadataStore, *, embedded: bool = False
) -> Discovery:
    """Discovery on ``store``, which :func:`open_metadata` opened; ``embedded``: of the
    embedded cluster (its namespaces public unless the configuration says otherwise).

    SQLite's calls run inline with commits synced in groups; PostgreSQL's in worker threads,
    as many at once as the store has connections (a round trip must not stall the loop)."""
    blocking: MetadataRunner
    if isinstance(store, SqliteMetadataStore):
        blocking = GroupCommitRunner(store)
    else:
        from karma8.metadata.postgres import PostgresDatabase

        assert isinstance(store, PostgresDatabase)
        blocking = ThreadRunner(store.pool_size)
    return Discovery(
        store=store,
        blocking=blocking,
        clock=WallClock(),
        ids=RandomIds(),
        instance=f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}",
        config=DiscoveryConfig(
            layout=StripeLayout(parts=5, unit=config.stripe_unit),
            upload_ttl=config.upload_ttl,
            node_timeout=config.node_timeout,
            suspect_for=config.suspect_for,
            retire_grace=config.retire_grace,
            sweep_interval=config.sweep_interval,
            leader_lease=config.leader_lease,
            max_file_size=config.max_file_size,
            namespaces=config.namespaces,
            public_namespaces=config.public(embedded=embedded),
            reserve_step=config.reserve_step,
        ),
    )


async def serve_discovery(
    discovery: Discovery,
    config: NetConfig,
    *,
    storage: StorageAPI,
    port: int | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Discovery and, beside it, the rebalancer and repair, which move parts through
    ``storage`` (read from the source node or rebuilt from the others, written to the
    target, as a gateway does)."""
    rebalancer = Rebalancer(discovery=discovery.moves, storage=storage, config=config.rebalance)
    repairer = Repairer(discovery=discovery.moves, storage=storage, config=config.repair)
    # The status view's recent errors: this process's warnings and errors (in the embedded
    # cluster, every role's).
    recent = RecentErrors()
    root = logging.getLogger()
    root.addHandler(recent)
    try:
        with METRICS.source(discovery_source(discovery, rebalancer, repairer)):
            async with trio.open_nursery() as nursery:
                await nursery.start(discovery.run)
                for mover, role, name in (
                    (rebalancer, "rebalancer", "the rebalancer"),
                    (repairer, "repair", "repair"),
                ):
                    await nursery.start(
                        partial(
                            keep_running,
                            mover,
                            name,
                            lead=partial(discovery.lead, role),
                            renew_every=discovery.config.leader_lease / 3,
                        )
                    )
                app = discovery_app(
                    discovery,
                    secret=config.secret,
                    rebalancer=rebalancer,
                    repairer=repairer,
                    recent_errors=recent,
                )
                url = await nursery.start(
                    serving(app, config, config.discovery_port if port is None else port)
                )
                log.info("discovery listening on %s", url)
                task_status.started(url)
    finally:
        root.removeHandler(recent)


async def keep_running(
    mover: Rebalancer | Repairer,
    name: str,
    *,
    lead: Callable[[], Awaitable[bool]] | None = None,
    renew_every: float = 5.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the rebalancer or repair until cancelled, while ``lead()`` says this discovery
    leads it (asked every ``renew_every`` seconds, which renews the lease; None: always). It
    stops on its own only for an error it does not expect (a bug, an answer it cannot read):
    that is logged, and it starts again after an ``interval``, so that discovery never goes
    down with it."""
    task_status.started()
    if lead is None:
        await _run_forever(mover, name)
        return
    while True:
        if not await _leads(lead):
            await trio.sleep(renew_every)
            continue
        log.info("this discovery leads %s", name)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_while_leading, lead, renew_every, nursery.cancel_scope, name)
            await _run_forever(mover, name)


async def _while_leading(
    lead: Callable[[], Awaitable[bool]], renew_every: float, scope: trio.CancelScope, name: str
) -> None:
    """Renew a leadership lease; cancel ``scope`` once it is lost."""
    while True:
        await trio.sleep(renew_every)
        if not await _leads(lead):
            break
    log.warning("this discovery no longer leads %s; another one does", name)
    scope.cancel()


async def _leads(lead: Callable[[], Awaitable[bool]]) -> bool:
    """``lead()``, or False while the store cannot say (its database out of reach)."""
    try:
        return await lead()
    except Unavailable as exc:
        log.warning("leadership unknown, taken as lost: %s", exc)
        return False


async def _run_forever(mover: Rebalancer | Repairer, name: str) -> None:
    while True:
        try:
            await mover.run()
        except Exception:
            log.exception("%s failed; it starts again in %g s", name, mover.config.interval)
            await trio.sleep(mover.config.interval)


async def run_discovery(
    config: NetConfig,
    *,
    database: Path,
    port: int | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Discovery on its own; its rebalancer reaches the nodes over HTTP with the secret."""
    private_dir(database.parent)
    store = open_metadata(config, database)
    try:
        async with data_pool(config) as http:
            await serve_discovery(
                build_discovery(config, store),
                config,
                storage=storage_client(config, http),
                port=port,
                task_status=task_status,
            )
    finally:
        store.close()
