"""A simulated karma8 cluster: discovery, one gateway and storage nodes on a SimNetwork.

The actors are the production classes from ``karma8.actors``; only their ports are simulated.
Each actor lives on a named endpoint; its background task (sweeper, heartbeats) runs in a
cancel scope the endpoint owns, so a crash stops it like a killed process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import attrs
import trio

from karma8.actors.discovery import Discovery, DiscoveryConfig
from karma8.actors.gateway import Gateway, GatewayConfig
from karma8.actors.rebalancer import Rebalancer
from karma8.actors.repair import Repairer
from karma8.actors.storage import StorageConfig, StorageNode
from karma8.core.layout import StripeLayout, engine_redundancy
from karma8.core.leases import PlacementLeases
from karma8.metadata.sqlite import SqliteMetadataStore
from karma8.sim.adapters import DISCOVERY, SimDiscoveryClient, SimStorageClient
from karma8.sim.disk import MemoryDisk
from karma8.sim.network import Endpoint, LinkConfig, SimNetwork
from karma8.sim.scenario import Scenario
from karma8.sim.workload import GATEWAY
from karma8.sim.world import World


class _Runnable(Protocol):
    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...


@attrs.define(kw_only=True)
class SimNode:
    """A storage node of the simulated cluster: its disk outlives crashes."""

    index: int
    node_id: str
    disk: MemoryDisk
    joined_at: float


class SimCluster:
    def __init__(
        self,
        world: World,
        scenario: Scenario,
        nursery: trio.Nursery,
        *,
        store: SqliteMetadataStore | None = None,
        leases: Callable[[], PlacementLeases] = PlacementLeases,
    ) -> None:
        self.world = world
        self.scenario = scenario
        self._nursery = nursery
        spec = scenario.cluster
        self.network = SimNetwork(
            world,
            LinkConfig(latency=scenario.network.latency, bandwidth=scenario.network.bandwidth),
        )
        self.store = store or SqliteMetadataStore(":memory:")
        # The workload's namespace, with the scenario's engine (discovery then finds it).
        copies, parity = engine_redundancy(spec.engine, copies=spec.copies, parity=spec.parity)
        self.store.add_namespace("default", 0.0, public=True, copies=copies, parity=parity)
        # Keys of parts wiped or damaged by fault events (until repair rebuilds them elsewhere).
        self.lost_keys: set[str] = set()
        self._leases = leases
        self.discovery: Discovery | None = None  # the discovery process last started
        self.discovery_config = DiscoveryConfig(
            layout=StripeLayout(parts=5, unit=spec.stripe_unit),
            upload_ttl=spec.upload_ttl,
            placement_lease=spec.placement_lease,
            node_timeout=spec.node_timeout,
            retire_grace=spec.retire_grace,
            sweep_interval=spec.sweep_interval,
            public_namespaces=DiscoveryConfig().namespaces,  # the simulator's clients: anonymous
        )
        self.storage_config = StorageConfig(
            heartbeat_interval=spec.heartbeat_interval,
            orphan_check_interval=spec.orphan_check_interval,
            scrub_interval=spec.scrub_interval,
            orphan_grace=spec.orphan_grace,
        )
        self.nodes: list[SimNode] = []
        self.rebalancer: Rebalancer | None = None  # of the discovery process last started
        self.repairer: Repairer | None = None  # likewise
        self._disk_rng = world.rng("disk")
        # Handlers are tracked (a cancel scope per call) only if something can crash.
        self.network.crashable = any(e.action in ("crash", "wipe") for e in scenario.events)

    def _discovery(self) -> Discovery:
        return Discovery(
            store=self.store,  # the database is durable: it survives a crash of discovery
            blocking=self.world.blocking,
            clock=self.world.clock,
            ids=self.world.ids,
            config=self.discovery_config,
            leases=self._leases(),  # memory: a restarted discovery starts with none
        )

    def _gateway(self) -> Gateway:
        return Gateway(
            discovery=SimDiscoveryClient(self.network, GATEWAY),
            storage=SimStorageClient(self.network, GATEWAY),
            config=GatewayConfig(small_file_max=self.scenario.cluster.small_file_max),
        )

    def _discovery_process(self) -> _DiscoveryProcess:
        discovery = self.discovery = self._discovery()
        storage = SimStorageClient(self.network, DISCOVERY)
        self.rebalancer = Rebalancer(
            discovery=discovery.moves, storage=storage, config=self.scenario.rebalance
        )
        self.repairer = Repairer(
            discovery=discovery.moves, storage=storage, config=self.scenario.repair
        )
        return _DiscoveryProcess(discovery, self.rebalancer, self.repairer)

    async def start(self) -> None:
        await self._nursery.start(
            self._serve, self.network.endpoint(DISCOVERY), self._discovery_process()
        )
        for capacity in self.scenario.cluster.initial_capacities():
            await self.add_node(capacity)
        self.network.endpoint(GATEWAY).bring_up(self._gateway())

    def endpoint_name(self, spec: str) -> str:
        """``discovery``, ``gateway``, ``node:N`` or ``*`` -> the endpoint's network name."""
        if spec.startswith("node:"):
            return self.nodes[int(spec.removeprefix("node:"))].node_id
        return spec

    def crash(self, spec: str) -> None:
        """Kill an actor at once: in-flight handlers die, unsynced writes are lost."""
        name = self.endpoint_name(spec)
        self.world.record(f"crash {name}")
        self.network.endpoint(name).crash()
        disk = self.disk_of(name)
        if disk is not None:
            disk.crash()  # what was not yet synced is lost; the disk recovers as on restart

    def restart(self, spec: str) -> None:
        """Start a crashed actor again: a new process on the same disk or database."""
        name = self.endpoint_name(spec)
        endpoint = self.network.endpoint(name)
        if endpoint.up:
            return
        self.world.record(f"restart {name}")
        if spec == GATEWAY:
            endpoint.bring_up(self._gateway())
        elif spec == DISCOVERY:
            self._nursery.start_soon(self._serve, endpoint, self._discovery_process())
        else:
            node = next(n for n in self.nodes if n.node_id == name)
            self._nursery.start_soon(self._serve, endpoint, self._storage(node))

    def disk_of(self, node_id: str) -> MemoryDisk | None:
        """The disk of the node with ``node_id``, if it has joined."""
        return next((n.disk for n in self.nodes if n.node_id == node_id), None)

    @property
    def gateway(self) -> Gateway:
        gateway = self.network.endpoint(GATEWAY).actor
        assert isinstance(gateway, Gateway), "the gateway is down"
        return gateway

    async def add_node(self, capacity: int | None = None) -> SimNode:
        """Join a new, empty storage node; returns once it has registered.

        ``capacity`` defaults to the scenario's capacity for added nodes.
        """
        node_id = f"node-{self.world.ids.new_id()[:8]}"
        disk = MemoryDisk(
            capacity_bytes=self.scenario.cluster.join_capacity if capacity is None else capacity,
            rng=self._disk_rng,
            sleep=self.world.sleep,
            fsync_latency=self.scenario.disk.fsync_latency,
        )
        node = SimNode(
            index=len(self.nodes), node_id=node_id, disk=disk, joined_at=trio.current_time()
        )
        self.nodes.append(node)
        self.world.record(f"join {node_id}")
        await self._nursery.start(self._serve, self.network.endpoint(node_id), self._storage(node))
        return node

    def _storage(self, node: SimNode) -> StorageNode:
        return StorageNode(
            node_id=node.node_id,
            url=f"sim://{node.node_id}",
            store=node.disk,
            discovery=SimDiscoveryClient(self.network, node.node_id),
            config=self.storage_config,
        )

    async def _serve(
        self,
        endpoint: Endpoint[object],
        actor: _Runnable,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with trio.CancelScope() as scope:
            endpoint.background = scope
            endpoint.bring_up(actor.serves if isinstance(actor, _DiscoveryProcess) else actor)
            await actor.run(task_status=task_status)


class _DiscoveryProcess:
    """Discovery, and the rebalancer and repair beside it: one process, crashing and
    restarting together; the network reaches discovery."""

    def __init__(self, discovery: Discovery, rebalancer: Rebalancer, repairer: Repairer) -> None:
        self.serves = discovery
        self._rebalancer = rebalancer
        self._repairer = repairer

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.serves.run)
            await nursery.start(self._rebalancer.run)
            await nursery.start(self._repairer.run)
            task_status.started()
