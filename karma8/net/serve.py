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

import contextlib
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, aclosing
from functools import partial
from pathlib import Path
from typing import TypeVar

import attrs
import httpx
import trio

from karma8.actors.gateway import Gateway, GatewayConfig
from karma8.actors.storage import StorageConfig, StorageNode
from karma8.core.errors import Forbidden, Karma8Error, Unavailable
from karma8.core.layout import StripeLayout
from karma8.net.bounds import UploadGate, give_back_memory
from karma8.net.clients import HttpDiscoveryClient
from karma8.net.direct import (
    DirectReadStorage,
    DirectResolveDiscovery,
    direct_source,
    open_direct_reads,
)
from karma8.net.discovery_role import build_discovery, open_metadata, serve_discovery
from karma8.net.gateway_app import gateway_app
from karma8.net.handoff import handoff_socket
from karma8.net.loanwrites import LoanDesk, WorkerWrites
from karma8.net.local import LocalFirstStorageClient
from karma8.net.locate import (
    DATABASE_FILE,
    NODE_ID_FILE,
    ClusterInfo,
    read_cluster_info,
    write_cluster_info,
)
from karma8.net.metrics import METRICS
from karma8.net.netconfig import NetConfig
from karma8.net.objects import new_stats
from karma8.net.serving import control_pool, data_pool, serving, storage_client
from karma8.net.sources import gateway_source, storage_source
from karma8.net.storage_app import storage_app
from karma8.net.workers import run_gateway_workers
from karma8.net.writepipe import ParentWrites, SmallWrites, serve_writes, writes_socket
from karma8.ports import DiscoveryAPI, StorageAPI
from karma8.store.diskio import FILE_MODE, hold_lock, private_dir, release_lock
from karma8.store.groupsync import GroupSync, SyncGroups, can_sync_file_systems
from karma8.store.tiered import open_part_store

T = TypeVar("T")
log = logging.getLogger("karma8.serve")

# A node or gateway that cannot reach discovery says so this often (seconds), and a gateway
# asks discovery this often until it first answers.
DISCOVERY_WARN_EVERY = 5.0
GATEWAY_PROBE_EVERY = 1.0
# A gateway's uploads waiting for a staging slot, or stalled behind a slow node, hold their
# queued body pieces: 2 instead of Hypercorn's 10 bounds that at ~2 MiB per upload.
GATEWAY_APP_QUEUE = 2


NODE_LOCK_FILE = "lock"  # held (flock) by the process serving a node's data directory


def lock_node_dir(data_dir: Path) -> None:
    """Hold ``data_dir`` for this process until it exits, or raise: two processes serving
    one node would scan and cut each other's volumes on open, answer for each other's parts
    (each knows only its own), and flip the node's address at discovery with every heartbeat.
    Held again by the same process (a node restarted in-process), it is already held."""
    hold_lock(
        data_dir / NODE_LOCK_FILE,
        lambda pid: (
            f"storage node directory {data_dir} is in use by another process"
            f" (pid {pid}); one process serves a node: stop that one first"
        ),
    )


def release_node_dir(data_dir: Path) -> None:
    """Let ``data_dir`` go (its node stopped): another process, or this one again, may hold
    it. (A process that exits lets go of its directories anyway.)"""
    release_lock(data_dir / NODE_LOCK_FILE)


def load_node_id(data_dir: Path) -> str:
    """The node's permanent id, created on first start and kept in its data directory."""
    private_dir(data_dir)
    lock_node_dir(data_dir)
    path = data_dir / NODE_ID_FILE
    if path.exists():
        node_id = path.read_text().strip()
        if node_id:
            return node_id
    node_id = f"node-{secrets.token_hex(6)}"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    with open(fd, "w") as f:
        f.write(node_id + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return node_id


def node_place(data_dir: Path) -> str:
    """Where a node's directory is, as discovery compares it (``NodeRegistration.place``):
    this host, and the directory's device and inode. A copy of the directory is elsewhere;
    the directory restarted on another port is not."""
    st = os.stat(data_dir)
    return f"{socket.gethostname()}:{st.st_dev}:{st.st_ino}"


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
        place=node_place(data_dir),
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
                serving(
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
    try:
        await serve_storage(node, config, port=port, task_status=task_status)
    finally:
        node.close()  # its tasks ended with serve_storage's nursery
        release_node_dir(data_dir)


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
    join_port: bool = False,
    adopt_from: str | None = None,
    hand_off_to: str | None = None,
    store_writes_at: str | None = None,
    parent: SmallWrites | None = None,
    listen: bool = True,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The gateway's socket (not ``listen``: held for the workers, see :func:`serve_app`);
    ``reuse_port``: shared with gateway workers (SO_REUSEPORT); ``join_port``: this
    gateway is a worker joining its parent's port (which the parent found free).
    ``adopt_from``: the Unix socket this gateway takes its workers' write connections on;
    ``hand_off_to``: the one this gateway, a worker, hands them to (karma8/net/handoff.py).
    ``store_writes_at``: the Unix socket this gateway stores its workers' small uploads
    from; ``parent``: the one this gateway, a worker, sends them to
    (karma8/net/writepipe.py), keeping the connections that begin with one."""
    uploads = UploadGate(max_uploads=config.max_uploads, idle_timeout=config.idle_timeout)
    stats = new_stats()
    with METRICS.source(gateway_source(gateway, stats, uploads)):
        async with trio.open_nursery() as nursery:
            if store_writes_at is not None:
                await nursery.start(
                    partial(
                        serve_writes,
                        body_max=config.small_file_max,
                        at_once=config.max_uploads,
                        uploads=uploads,
                        ops=LoanDesk(gateway, keep_for=config.upload_ttl).ops(),
                    ),
                    store_writes_at,
                    gateway,
                )
            url = await nursery.start(
                serving(
                    gateway_app(gateway, uploads, stats, parent),
                    config,
                    config.gateway_port if port is None else port,
                    app_queue=GATEWAY_APP_QUEUE,
                    reuse_port=reuse_port,
                    join_port=join_port,
                    adopt_from=adopt_from,
                    hand_off_to=hand_off_to,
                    keep_small_writes=config.small_file_max if parent is not None else None,
                    listen=listen,
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
    read_from: Path | None = None,
    handoff: str | None = None,
    writes: str | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A gateway on its own, with ``gateway_workers - 1`` workers on its port. It asks
    discovery in the background until discovery first answers, so that a gateway that cannot
    reach it warns (as :func:`run_storage`'s node does) before a client finds out. ``http``
    is the pool to discovery; the nodes get a pool of their own. ``discovery_url``: one URL
    or several, comma-separated, which the discovery client fails over between.
    ``shared_port``: this gateway is itself a worker, binding a port that others share;
    ``handoff``: its parent's Unix socket, which it hands write connections to;
    ``writes``: its parent's Unix socket that stores small uploads for it;
    ``read_from``: an embedded cluster's data directory on this host, whose metadata and
    parts this gateway reads directly (:mod:`karma8.net.direct`)."""
    metadata, readers = (
        open_direct_reads(
            read_from,
            metadata=config.metadata_url is None,
            # Well inside the time a moved part's old copy is kept for reads (see there).
            keep_for=min(10.0, config.retire_grace / 4),
        )
        if read_from is not None
        else (None, {})
    )
    resolver: DirectResolveDiscovery | None = None
    if metadata is not None:
        resolver = DirectResolveDiscovery(
            http,
            discovery_url,
            metadata=metadata,
            origin=discovery_from,
            warn_every=DISCOVERY_WARN_EVERY,
        )
    discovery = (
        resolver
        if resolver is not None
        else HttpDiscoveryClient(
            http, discovery_url, origin=discovery_from, warn_every=DISCOVERY_WARN_EVERY
        )
    )
    try:
        with handoff_socket(config.gateway_workers > 1) as adopt_from:
            async with (
                data_pool(config) as nodes,
                AsyncExitStack() as published,
                trio.open_nursery() as nursery,
            ):
                storage: StorageAPI = storage_client(config, nodes)
                pipe = ParentWrites(writes) if writes is not None else None
                parent: SmallWrites | None = pipe
                if pipe is not None:
                    await published.enter_async_context(aclosing(pipe))
                    published.enter_context(METRICS.source(pipe.samples))
                    if _writes_parts(config, readers):
                        parent = writer = WorkerWrites(
                            pipe,
                            local=readers,
                            volume_size=config.volume_size,
                            stripe=StripeLayout(parts=5, unit=config.stripe_unit),
                            part_max=config.small_part_max,
                        )
                        await published.enter_async_context(aclosing(writer))
                        published.enter_context(METRICS.source(writer.samples))
                direct = None
                if readers:
                    storage = direct = DirectReadStorage(storage, readers, config.small_part_max)
                    nursery.start_soon(direct.run, name="gateway-direct-damage")
                if direct is not None or resolver is not None:
                    published.enter_context(METRICS.source(direct_source(direct, resolver)))
                gateway = build_gateway(config, discovery=discovery, storage=storage)
                nursery.start_soon(_probe_discovery, discovery, name="gateway-probe-discovery")
                url = await nursery.start(
                    partial(
                        serve_gateway,
                        gateway,
                        config,
                        port=port,
                        reuse_port=shared_port or config.gateway_workers > 1,
                        join_port=shared_port,
                        adopt_from=adopt_from,
                        hand_off_to=handoff,
                        parent=parent,
                    )
                )
                await _start_workers(
                    nursery,
                    config,
                    config.gateway_workers - 1,
                    gateway_url=url,
                    discovery_url=discovery_url,
                    handoff=adopt_from,
                )
                task_status.started(url)
    finally:
        for reader in readers.values():
            reader.close()
        if metadata is not None:
            metadata.close()


def _writes_parts(config: NetConfig, readers: Mapping[str, object]) -> bool:
    """Whether a worker writes its small uploads' parts itself (karma8/net/loanwrites.py):
    asked for, its parent's nodes on this host and called in-process there, packing small
    parts."""
    return bool(
        config.worker_parts
        and readers
        and config.local_calls
        and config.small_part_max
        and can_sync_file_systems()
    )


async def _start_workers(
    nursery: trio.Nursery,
    config: NetConfig,
    count: int,
    *,
    gateway_url: str,
    discovery_url: str,
    handoff: str | None,
    read_from: Path | None = None,
    writes: str | None = None,
) -> None:
    """``count`` workers (perhaps none) beside the gateway at
    ``gateway_url``, handing their write connections to it at ``handoff`` and sending their
    small uploads to ``writes``; ``read_from``: the embedded cluster's data directory, which
    they read directly."""
    if count > 0:
        await nursery.start(
            partial(
                run_gateway_workers,
                count,
                config,
                port=int(gateway_url.rsplit(":", 1)[1]),
                discovery_url=discovery_url,
                read_from=read_from,
                handoff=handoff,
                writes=writes,
            )
        )


async def _probe_discovery(discovery: DiscoveryAPI) -> None:
    """Ask discovery for its nodes until it answers; the client logs what fails. Refused
    (a wrong secret) the gateway stops, as a node does: serving, it would answer every
    client 403 for discovery's refusal, as if the client's credentials were wrong."""
    while True:
        try:
            await discovery.list_nodes()
            return
        except Unavailable:
            await trio.sleep(GATEWAY_PROBE_EVERY)
        except Forbidden as exc:
            raise Forbidden(f"discovery refused this gateway: {exc.message}") from None
        except Karma8Error as exc:  # it answered, and refused something else
            log.warning("discovery refused the gateway: %s", exc.message)
            return


def cluster_secret(data_dir: Path) -> str:
    """The embedded cluster's secret: kept in cluster.json so restarts and joins agree. Hex, so
    that it never starts with "-" and can follow `--secret` on a command line."""
    info = read_cluster_info(data_dir)
    return info.secret if info is not None else secrets.token_hex(24)


async def run_cluster(
    config: NetConfig,
    *,
    data_dir: Path,
    task_status: trio.TaskStatus[ClusterInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The embedded default: discovery + ``storage_nodes`` nodes + gateway on one host, and
    with ``gateway_workers`` above 1 that many gateway worker processes on the gateway's port,
    which this process then holds without serving (``gateway_workers - 1`` beside its own
    gateway if ``direct_reads`` is off)."""
    config, node_dirs, absolute = _prepare_cluster_dir(config, data_dir)
    secret = config.secret
    assert secret is not None
    store = open_metadata(config, data_dir / DATABASE_FILE)
    local: dict[str, StorageNode] = {}
    try:
        async with (
            _handoff_socket(config.gateway_workers > 1) as handoff,
            data_pool(config) as http,
            control_pool(config) as control,
            trio.open_nursery() as nursery,
        ):
            # Co-located roles call each other in-process (karma8/net/local.py), unless the
            # configuration asks for every hop to go over HTTP. The gateway and the
            # rebalancer share one storage client; the nodes join ``local`` as they start.
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
            writes = writes_socket(handoff) if handoff is not None else None
            # With workers that read parts directly, the parent holds the port for them
            # and serves none of it: they parse every request, it stores what they send it
            # (docs/architecture.md, "Gateway workers: more than one event loop").
            front = handoff is not None and config.direct_reads
            gateway_url = await nursery.start(
                partial(
                    serve_gateway,
                    gateway,
                    config,
                    reuse_port=config.gateway_workers > 1,
                    adopt_from=handoff,
                    store_writes_at=writes,
                    listen=not front,
                )
            )
            await _start_workers(
                nursery,
                config,
                config.gateway_workers if front else config.gateway_workers - 1,
                gateway_url=gateway_url,
                discovery_url=discovery_url,
                read_from=Path(absolute) if config.direct_reads else None,
                handoff=handoff,
                writes=writes,
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
        # Every task has ended, the workers' too: the nodes take back what they lent them.
        for node in local.values():
            node.end_loans()
        store.close()
        for node_dir in node_dirs:
            release_node_dir(node_dir)


@contextlib.asynccontextmanager
async def _handoff_socket(enabled: bool) -> AsyncIterator[str | None]:
    """:func:`handoff_socket`, beside the async resources of :func:`run_cluster`."""
    with handoff_socket(enabled) as path:
        yield path


def _prepare_cluster_dir(config: NetConfig, data_dir: Path) -> tuple[NetConfig, list[Path], str]:
    """The secret (kept across restarts) and the node directories (existing ones first)."""
    private_dir(data_dir)
    config = attrs.evolve(config, secret=config.secret or cluster_secret(data_dir))
    existing = sorted(p for p in data_dir.glob("storage-*") if p.is_dir())
    fresh = [data_dir / f"storage-{i}" for i in range(len(existing), config.storage_nodes)]
    return config, existing + fresh, os.path.abspath(data_dir)
