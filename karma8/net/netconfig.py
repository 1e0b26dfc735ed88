"""Net mode's settings: one :class:`NetConfig` for every role (``karma8 serve --config``
reads it strictly: :mod:`karma8.net.settings`; docs/configuration.md lists the keys)."""

from __future__ import annotations

import os
from pathlib import Path

import attrs

from karma8.actors.discovery import DiscoveryConfig
from karma8.actors.gateway import GatewayConfig
from karma8.actors.rebalancer import RebalancerConfig
from karma8.actors.repair import RepairConfig
from karma8.actors.storage import StorageConfig
from karma8.store.tiered import DEFAULT_SMALL_PART_MAX, DEFAULT_VOLUME_SIZE

HEADER_TIMEOUT = 30.0  # seconds; NetConfig.header_timeout
# Connections per server: far below the descriptors a process may open (ulimit -n) once the
# internal pools have theirs, far above what the bounded uploads need.
MAX_CONNECTIONS = 4096

_DISCOVERY = DiscoveryConfig()
_GATEWAY = GatewayConfig()
_STORAGE = StorageConfig()


CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"


def usable_cores(cpu_max: Path = CPU_MAX) -> int:
    """The cores this process may run on, the default gateway processes: its CPU affinity,
    narrowed by its cgroup's CPU quota (a container's ``--cpus``), rounded up."""
    affinity = getattr(os, "sched_getaffinity", None)
    cores = len(affinity(0)) if affinity is not None else os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


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
    # alone, in this process. Default: one per core this process may run on.
    gateway_workers: int = attrs.field(factory=usable_cores)
    # Embedded cluster: its gateway workers read the metadata and small parts from the
    # cluster's files instead of asking discovery and the nodes (karma8/net/direct.py).
    direct_reads: bool = True
    # Embedded cluster: its gateway workers write their small uploads' parts themselves, to
    # volumes the nodes lend them, and the parent only places and commits
    # (karma8/net/loanwrites.py). Off: they send the bodies to the parent to store.
    worker_parts: bool = True

    def public(self, *, embedded: bool) -> tuple[str, ...]:
        """The namespaces made public at start-up, for the embedded cluster or not."""
        if self.public_namespaces is not None:
            return self.public_namespaces
        return self.namespaces if embedded else ()
