"""Net mode: the actors bound to Quart-Trio apps on real sockets, one service per role.

Every service is ``async def run_x(..., *, task_status)`` and reports its base URL through
``task_status.started(url)`` once it accepts requests, so a caller (the CLI, a test) runs any
mix of roles in one nursery and cancels the nursery to stop them.

``run_cluster`` is the embedded default: discovery (SQLite file) + N storage nodes + gateway
on 127.0.0.1, everything under one data directory, each role on its own socket. It writes
``cluster.json`` (URLs and the cluster secret) so that admin commands and nodes started later
find the cluster, and running it again on the same directory resumes with the same nodes.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import attrs
import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.typing import Framework
from quart_trio import QuartTrio

from karma8.actors.discovery import Discovery, DiscoveryConfig
from karma8.actors.gateway import Gateway, GatewayConfig
from karma8.actors.rebalancer import Rebalancer, RebalancerConfig
from karma8.actors.repair import RepairConfig, Repairer
from karma8.actors.storage import StorageConfig, StorageNode
from karma8.core.errors import Karma8Error, Unavailable
from karma8.core.layout import StripeLayout
from karma8.core.tomlconf import ConfigError
from karma8.metadata.sqlite import SqliteMetadataStore
from karma8.metadata.store import SqlMetadataStore
from karma8.net.bounds import UploadGate, give_back_memory
from karma8.net.clients import HttpDiscoveryClient, HttpStorageClient, make_http_client
from karma8.net.discovery_app import discovery_app
from karma8.net.gateway_app import gateway_app
from karma8.net.http_fixes import cap_connections, patch_hypercorn
from karma8.net.local import LocalFirstStorageClient
from karma8.net.locate import ClusterInfo, read_cluster_info, write_cluster_info
from karma8.net.metasync import GroupCommitRunner
from karma8.net.metrics import METRICS
from karma8.net.objects import new_stats
from karma8.net.requestlog import RecentErrors
from karma8.net.sources import discovery_source, gateway_source, storage_source
from karma8.net.storage_app import storage_app
from karma8.net.workers import run_gateway_workers, shared_port_socket
from karma8.ports import BlockingRunner, DiscoveryAPI, StorageAPI
from karma8.store.diskio import private_dir
from karma8.store.groupsync import GroupSync, SyncGroups
from karma8.store.tiered import DEFAULT_SMALL_PART_MAX, DEFAULT_VOLUME_SIZE, open_part_store

T = TypeVar("T")
log = logging.getLogger("karma8.serve")

HASH_THREADS = 8  # per HTTP storage client; hashing releases the GIL
# A node or gateway that cannot reach discovery says so this often (seconds), and a gateway
# asks discovery this often until it first answers.
DISCOVERY_WARN_EVERY = 5.0
GATEWAY_PROBE_EVERY = 1.0
NODE_ID_FILE = "node_id"
HEADER_TIMEOUT = 30.0  # seconds; NetConfig.header_timeout
# Connections per server: far below the descriptors a process may open (ulimit -n) once the
# internal pools have theirs, far above what the bounded uploads need.
MAX_CONNECTIONS = 4096
# A gateway's uploads waiting for a staging slot, or stalled behind a slow node, hold their
# queued body pieces: 2 instead of Hypercorn's 10 bounds that at ~2 MiB per upload.
GATEWAY_APP_QUEUE = 2


_DISCOVERY = DiscoveryConfig()
_GATEWAY = GatewayConfig()
_STORAGE = StorageConfig()
_GATEWAY = GatewayConfig()


@attrs.frozen(kw_only=True)
class NetConfig:
    """Settings of net-mode services; see docs/configuration.md for every key.

    The actors' settings take their defaults from the actors' own configs, the one definition
    that the simulator's scenarios share too.
    """

    host: str = "127.0.0.1"
    secret: str | None = None
    gateway_port: int = 8080
    discovery_port: int = 8090
    storage_port: int = 0
    # One discovery URL or several, comma-separated (instances sharing one database): the
    # gateway's and the nodes' discovery client fails over between them.
    discovery_url: str | None = None
    storage_nodes: int = 6
    capacity: int = 10 << 30
    # Parts of at most this many bytes are packed into volume files; 0: every part a file.
    small_part_max: int = DEFAULT_SMALL_PART_MAX
    # A volume of packed parts is sealed, and a new one started, past this size.
    volume_size: int = DEFAULT_VOLUME_SIZE
    stripe_unit: int = _DISCOVERY.layout.unit
    max_file_size: int = _DISCOVERY.max_file_size
    heartbeat_interval: float = _STORAGE.heartbeat_interval
    node_timeout: float = _DISCOVERY.node_timeout
    suspect_for: float = _DISCOVERY.suspect_for
    upload_ttl: float = _DISCOVERY.upload_ttl
    retire_grace: float = _DISCOVERY.retire_grace
    sweep_interval: float = _DISCOVERY.sweep_interval
    leader_lease: float = _DISCOVERY.leader_lease
    # Discovery's metadata on PostgreSQL ("postgresql://user@host/db"), shared by every
    # discovery instance given the same URL; None: SQLite in discovery's data directory.
    metadata_url: str | None = None
    # Connections to PostgreSQL per discovery, and so its metadata calls at once (threads).
    metadata_connections: int = 8
    orphan_check_interval: float = _STORAGE.orphan_check_interval
    orphan_grace: float = _STORAGE.orphan_grace
    scrub_interval: float = _STORAGE.scrub_interval
    scrub_pause: float = _STORAGE.scrub_pause
    # Hypercorn closes a connection that has *received* nothing for this long, even while a
    # download is flowing out; 0 disables it (the default).
    read_timeout: int = 0
    # Bounds on what clients can hold (docs/configuration.md, "Bounded resources").
    # PUTs in flight per gateway; beyond, 503 with Retry-After, the body unread.
    max_uploads: int = 256
    # A client that sends no body bytes for this long has its upload aborted and cleaned up.
    idle_timeout: float = 30.0
    # A connection must send a request's headers within this long of opening (or of the
    # previous answer); Hypercorn's keep_alive_timeout, which also closes idle connections.
    header_timeout: float = HEADER_TIMEOUT
    # Connections each server of the process keeps open at once; beyond, 503 and close.
    max_connections: int = MAX_CONNECTIONS
    # Requests in flight from a gateway (or the rebalancer) to one storage node.
    node_connections: int = 512
    # Connections to discovery, a pool apart from the nodes': uploads cannot starve it.
    discovery_connections: int = 64
    # Uploads that may hold back a partial row (up to 5 stripe units) at once; the others
    # wait for a slot before they stage more than 1 MiB.
    staging_uploads: int = _GATEWAY.staging_uploads
    # Bodies with a Content-Length up to this are held whole: one metadata transaction each.
    small_file_max: int = _GATEWAY.small_file_max
    # Room reserved at begin for at most this many bytes of a Content-Length; the rest as it
    # arrives.
    reserve_step: int = _DISCOVERY.reserve_step
    # Embedded cluster: the gateway and nodes call the discovery and nodes of their own process
    # directly instead of over loopback HTTP (every role still serves its socket).
    local_calls: bool = True
    # The rebalancer beside discovery (the config file's [rebalance] table).
    rebalance: RebalancerConfig = attrs.Factory(RebalancerConfig)
    # Repair beside discovery (the config file's [repair] table).
    repair: RepairConfig = attrs.Factory(RepairConfig)
    # Namespaces discovery makes sure exist at start-up, and those of them anyone may read
    # and write without a token. None: all of ``namespaces`` in the embedded cluster (the
    # quick start), none for a discovery of its own.
    namespaces: tuple[str, ...] = _DISCOVERY.namespaces
    public_namespaces: tuple[str, ...] | None = None
    # Seconds a gateway reuses a positive access answer (a revoked token works this long).
    access_cache_ttl: float = _GATEWAY.access_cache_ttl
    # Gateway processes sharing the gateway's port (karma8/net/workers.py); 1: the gateway
    # alone, in this process. More measured slower on 2 cores (docs/benchmarks.md).
    gateway_workers: int = 1

    def public(self, *, embedded: bool) -> tuple[str, ...]:
        """The namespaces made public at start-up, for the embedded cluster or not."""
        if self.public_namespaces is not None:
            return self.public_namespaces
        return self.namespaces if embedded else ()


class ThreadRunner:
    """:class:`karma8.ports.BlockingRunner` for net mode: at most ``threads`` worker threads.

    Hashing a chunk takes a while; running it in a thread keeps the event loop serving bytes
    (and hashlib, which releases the GIL, uses another core).
    """

    def __init__(self, threads: int = 1) -> None:
        self._limiter = trio.CapacityLimiter(threads)

    async def __call__(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, limiter=self._limiter)


class WallClock:
    def now(self) -> float:
        return time.time()


class RandomIds:
    def new_id(self) -> str:
        return secrets.token_hex(8)


async def serve_app(
    app: Framework,
    *,
    host: str,
    port: int,
    read_timeout: int | None = 60,
    header_timeout: float = HEADER_TIMEOUT,
    app_queue: int = 10,
    max_connections: int = MAX_CONNECTIONS,
    reuse_port: bool = False,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` with Hypercorn until cancelled; reports ``http://host:port``.

    ``reuse_port``: bind with ``SO_REUSEPORT``, so that other processes (gateway workers)
    can listen on the same port and the kernel spreads new connections over them.
    """
    patch_hypercorn()
    config = HypercornConfig()
    cap_connections(config, max_connections)
    if reuse_port:
        # Hypercorn sets SO_REUSEPORT only for its own multi-worker mode; a socket handed
        # over by descriptor is taken as it is (and closed by Hypercorn).
        config.bind = [f"fd://{shared_port_socket(host, port).detach()}"]
    else:
        config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.read_timeout = read_timeout or None
    # Covers the wait for a request's headers too: Hypercorn's idle timer runs from the
    # connection's start (or the previous answer) until a whole request head has arrived.
    config.keep_alive_timeout = header_timeout
    # Messages (body pieces of up to http_fixes.RECEIVE_SIZE) queued for a request that is
    # not reading: Hypercorn's max_app_queue_size (default 10).
    config.max_app_queue_size = app_queue
    async with trio.open_nursery() as nursery:
        urls: list[str] = await nursery.start(hypercorn_serve, app, config)
        task_status.started(urls[0])


def _serving(
    app: QuartTrio, config: NetConfig, port: int, *, app_queue: int = 10, reuse_port: bool = False
) -> Callable[..., Awaitable[None]]:
    """``serve_app`` for ``app`` bound with the config's host and read timeout."""
    return partial(
        serve_app,
        app,
        host=config.host,
        port=port,
        read_timeout=config.read_timeout,
        header_timeout=config.header_timeout,
        app_queue=app_queue,
        max_connections=config.max_connections,
        reuse_port=reuse_port,
    )


def open_metadata(config: NetConfig, path: Path) -> SqlMetadataStore:
    """Discovery's database as net mode runs it: PostgreSQL at ``metadata_url``, else SQLite
    at ``path`` with commits made durable in groups.

    Raises:
        SchemaError: PostgreSQL's schema is not this karma8's (``karma8 db upgrade``).
        ConfigError: PostgreSQL cannot be reached.
    """
    if config.metadata_url is None:
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
    blocking: BlockingRunner
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


def storage_client(config: NetConfig, http: httpx.AsyncClient) -> HttpStorageClient:
    """Storage nodes over ``http`` (a pool of its own), ``node_connections`` per node."""
    return HttpStorageClient(
        http, blocking=ThreadRunner(HASH_THREADS), node_connections=config.node_connections
    )


def data_pool(config: NetConfig) -> httpx.AsyncClient:
    """The pool to storage nodes: bounded per node by :func:`storage_client`."""
    return make_http_client(config.secret, max_connections=None)


def control_pool(config: NetConfig) -> httpx.AsyncClient:
    """The pool to discovery, apart from the nodes' one."""
    return make_http_client(config.secret, max_connections=config.discovery_connections)


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
                    _serving(app, config, config.discovery_port if port is None else port)
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


def load_node_id(data_dir: Path) -> str:
    """The node's permanent id, created on first start and kept in its data directory."""
    private_dir(data_dir)
    path = data_dir / NODE_ID_FILE
    if path.exists():
        node_id = path.read_text().strip()
        if node_id:
            return node_id
    node_id = f"node-{secrets.token_hex(6)}"
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(node_id + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return node_id


def build_storage_node(
    config: NetConfig,
    *,
    data_dir: Path,
    discovery: DiscoveryAPI,
    capacity: int | None = None,
    sync_groups: SyncGroups | None = None,
) -> StorageNode:
    """A node on ``data_dir``; nodes given the same ``sync_groups`` share sync rounds."""
    node_id = load_node_id(data_dir)
    group_sync: bool | GroupSync = True
    if sync_groups is not None:
        group_sync = sync_groups.for_path(data_dir) or False
    return StorageNode(
        node_id=node_id,
        url="",  # known once bound
        store=open_part_store(
            data_dir,
            capacity_bytes=capacity or config.capacity,
            small_part_max=config.small_part_max,
            volume_size=config.volume_size,
            group_sync=group_sync,
        ),
        discovery=discovery,
        config=StorageConfig(
            heartbeat_interval=config.heartbeat_interval,
            orphan_check_interval=config.orphan_check_interval,
            orphan_grace=config.orphan_grace,
            scrub_interval=config.scrub_interval,
            scrub_pause=config.scrub_pause,
        ),
    )


async def serve_storage(
    node: StorageNode,
    config: NetConfig,
    *,
    port: int | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    with METRICS.source(storage_source(node)):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(
                _serving(
                    storage_app(node, secret=config.secret),
                    config,
                    config.storage_port if port is None else port,
                )
            )
            node.url = url
            await nursery.start(node.run)
            log.info("storage node %s listening on %s", node.node_id, url)
            task_status.started(url)


async def run_storage(
    config: NetConfig,
    *,
    data_dir: Path,
    discovery_url: str,
    discovery_from: str | None = None,
    http: httpx.AsyncClient,
    port: int | None = None,
    capacity: int | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A storage node on its own; it warns while it cannot reach ``discovery_url``, naming
    where that came from (``discovery_from``), so that a wrong URL does not wait silently.
    With several URLs (comma-separated) it registers and heartbeats with whichever answers."""
    discovery = HttpDiscoveryClient(
        http, discovery_url, origin=discovery_from, warn_every=DISCOVERY_WARN_EVERY
    )
    node = build_storage_node(config, data_dir=data_dir, discovery=discovery, capacity=capacity)
    await serve_storage(node, config, port=port, task_status=task_status)


def build_gateway(config: NetConfig, *, discovery: DiscoveryAPI, storage: StorageAPI) -> Gateway:
    return Gateway(
        discovery=discovery,
        storage=storage,
        config=GatewayConfig(
            max_file_size=config.max_file_size,
            access_cache_ttl=config.access_cache_ttl,
            reserve_step=config.reserve_step,
            staging_uploads=config.staging_uploads,
            small_file_max=config.small_file_max,
        ),
    )


async def serve_gateway(
    gateway: Gateway,
    config: NetConfig,
    *,
    port: int | None = None,
    reuse_port: bool = False,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The gateway's socket; ``reuse_port``: shared with gateway workers (SO_REUSEPORT)."""
    uploads = UploadGate(max_uploads=config.max_uploads, idle_timeout=config.idle_timeout)
    stats = new_stats()
    with METRICS.source(gateway_source(gateway, stats, uploads)):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(
                _serving(
                    gateway_app(gateway, uploads, stats),
                    config,
                    config.gateway_port if port is None else port,
                    app_queue=GATEWAY_APP_QUEUE,
                    reuse_port=reuse_port,
                )
            )
            nursery.start_soon(give_back_memory, uploads, name="gateway-give-back-memory")
            log.info("gateway listening on %s", url)
            task_status.started(url)


async def run_gateway(
    config: NetConfig,
    *,
    discovery_url: str,
    discovery_from: str | None = None,
    http: httpx.AsyncClient,
    port: int | None = None,
    shared_port: bool = False,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A gateway on its own, with ``gateway_workers - 1`` workers on its port. It asks
    discovery in the background until discovery first answers, so that a gateway that cannot
    reach it warns (as :func:`run_storage`'s node does) before a client finds out. ``http``
    is the pool to discovery; the nodes get a pool of their own. ``discovery_url``: one URL
    or several, comma-separated, which the discovery client fails over between.
    ``shared_port``: this gateway is itself a worker, binding a port that others share."""
    discovery = HttpDiscoveryClient(
        http, discovery_url, origin=discovery_from, warn_every=DISCOVERY_WARN_EVERY
    )
    async with data_pool(config) as nodes, trio.open_nursery() as nursery:
        gateway = build_gateway(config, discovery=discovery, storage=storage_client(config, nodes))
        nursery.start_soon(_probe_discovery, discovery, name="gateway-probe-discovery")
        url = await nursery.start(
            partial(
                serve_gateway,
                gateway,
                config,
                port=port,
                reuse_port=shared_port or config.gateway_workers > 1,
            )
        )
        await _start_workers(nursery, config, gateway_url=url, discovery_url=discovery_url)
        task_status.started(url)


async def _start_workers(
    nursery: trio.Nursery, config: NetConfig, *, gateway_url: str, discovery_url: str
) -> None:
    """The ``gateway_workers - 1`` workers beside the gateway at ``gateway_url``."""
    if config.gateway_workers > 1:
        await nursery.start(
            partial(
                run_gateway_workers,
                config.gateway_workers - 1,
                config,
                port=int(gateway_url.rsplit(":", 1)[1]),
                discovery_url=discovery_url,
            )
        )


async def _probe_discovery(discovery: DiscoveryAPI) -> None:
    """Ask discovery for its nodes until it answers; the client logs what fails."""
    while True:
        try:
            await discovery.list_nodes()
            return
        except Unavailable:
            await trio.sleep(GATEWAY_PROBE_EVERY)
        except Karma8Error as exc:  # it answered, and refused: e.g. a wrong secret
            log.warning("discovery refused the gateway: %s", exc.message)
            return


def cluster_secret(data_dir: Path) -> str:
    """The embedded cluster's secret: kept in cluster.json so restarts and joins agree."""
    info = read_cluster_info(data_dir)
    return info.secret if info is not None else secrets.token_urlsafe(24)


async def run_cluster(
    config: NetConfig,
    *,
    data_dir: Path,
    task_status: trio.TaskStatus[ClusterInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The embedded default: discovery + ``storage_nodes`` nodes + gateway on one host, and
    ``gateway_workers - 1`` gateway worker processes on the gateway's port."""
    config, node_dirs, absolute = _prepare_cluster_dir(config, data_dir)
    secret = config.secret
    assert secret is not None
    store = open_metadata(config, data_dir / "discovery.sqlite3")
    try:
        async with (
            data_pool(config) as http,
            control_pool(config) as control,
            trio.open_nursery() as nursery,
        ):
            # Co-located roles call each other in-process (karma8/net/local.py), unless the
            # configuration asks for every hop to go over HTTP. The gateway and the
            # rebalancer share one storage client; the nodes join ``local`` as they start.
            local: dict[str, StorageNode] = {}
            storage: StorageAPI = storage_client(config, http)
            if config.local_calls:
                storage = LocalFirstStorageClient(local, storage)
            discovery = build_discovery(config, store, embedded=True)
            discovery_url = await nursery.start(
                partial(serve_discovery, discovery, config, storage=storage)
            )
            reach: DiscoveryAPI = (
                discovery if config.local_calls else HttpDiscoveryClient(control, discovery_url)
            )
            sync_groups = SyncGroups()  # nodes on one file system share one syncfs per round
            for node_dir in node_dirs:
                node = build_storage_node(
                    config, data_dir=node_dir, discovery=reach, sync_groups=sync_groups
                )
                await nursery.start(partial(serve_storage, node, config))
                local[node.node_id] = node
            gateway = build_gateway(config, discovery=reach, storage=storage)
            gateway_url = await nursery.start(
                partial(serve_gateway, gateway, config, reuse_port=config.gateway_workers > 1)
            )
            await _start_workers(
                nursery, config, gateway_url=gateway_url, discovery_url=discovery_url
            )
            info = ClusterInfo(
                gateway=gateway_url,
                discovery=discovery_url,
                secret=secret,
                data_dir=absolute,
            )
            write_cluster_info(data_dir, info)
            task_status.started(info)
    finally:
        store.close()


def _prepare_cluster_dir(config: NetConfig, data_dir: Path) -> tuple[NetConfig, list[Path], str]:
    """The secret (kept across restarts) and the node directories (existing ones first)."""
    private_dir(data_dir)
    config = attrs.evolve(config, secret=config.secret or cluster_secret(data_dir))
    existing = sorted(p for p in data_dir.glob("storage-*") if p.is_dir())
    fresh = [data_dir / f"storage-{i}" for i in range(len(existing), config.storage_nodes)]
    return config, existing + fresh, os.path.abspath(data_dir)
