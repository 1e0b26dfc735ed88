"""Two worlds behind one interface, for the contract suite.

:class:`SimDriver` talks to a simulated cluster (same actors, simulated network and disks);
:class:`NetDriver` talks HTTP to real services on 127.0.0.1. A contract test is written once
against :class:`Driver` and runs in both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Protocol

import attrs
import httpx
import trio

from karma8.actors.gateway import Gateway
from karma8.core.model import FileVersion, NodeStatus
from karma8.net.clients import HttpDiscoveryClient, make_http_client, raise_for_error
from karma8.net.netconfig import NetConfig
from karma8.net.serve import run_cluster, run_storage
from karma8.sim.cluster import SimCluster
from karma8.sim.runner import run_with_cluster
from karma8.sim.scenario import ClusterSpec, Scenario
from karma8.sim.workload import GATEWAY, BytesChunks

UNIT = 1024  # small stripe unit so that multi-row files stay small
HEARTBEAT = 0.1
RETIRE_GRACE = 0.3
# How long a test waits for something the cluster does by itself (garbage collected, a
# node seen) before it gives up: a guard against a hang, far above the few heartbeats it
# takes, so that no verdict depends on the machine's speed. Virtual seconds in sim.
GIVE_UP = 120.0


async def eventually(condition: Callable[[], Awaitable[bool]], *, what: str = "") -> None:
    """Wait until ``condition()`` holds, checking once a heartbeat, in either world.

    Raises:
        AssertionError: It did not hold within :data:`GIVE_UP` seconds.
    """
    with trio.move_on_after(GIVE_UP):
        while not await condition():  # noqa: ASYNC110 - a poll: no event says it holds
            await trio.sleep(HEARTBEAT)
        return
    raise AssertionError(f"never held: {what or condition.__name__}")


class Driver(Protocol):
    unit: int
    namespace: str  # where put, get, stat and delete go

    async def create_namespace(self, name: str, *, engine: str, **settings: int) -> None: ...

    async def put(
        self, name: str, data: bytes, *, chunked: bool = False, if_absent: bool = False
    ) -> str: ...

    async def get(self, name: str, start: int | None = None, stop: int | None = None) -> bytes: ...

    async def delete(self, name: str) -> None: ...

    async def stat(self, name: str) -> FileVersion: ...

    async def nodes(self) -> list[NodeStatus]: ...

    async def add_node(self, capacity: int | None = None) -> str: ...

    async def kill_node(self, node_id: str) -> None:
        """Stop a node added by :meth:`add_node` as a killed process stops."""
        ...

    async def part_keys(self) -> list[str]: ...


class SimDriver:
    unit = UNIT

    def __init__(self, cluster: SimCluster) -> None:
        self._cluster = cluster
        self._net = cluster.network
        self.namespace = "default"

    async def create_namespace(self, name: str, *, engine: str, **settings: int) -> None:
        assert self._cluster.discovery is not None
        await self._cluster.discovery.create_namespace(
            namespace=name,
            engine=engine,
            copies=settings.get("copies"),
            parity=settings.get("parity"),
        )

    async def _call(self, what: str, fn: Callable[[Gateway], Awaitable[object]]) -> object:
        return await self._net.call("contract", GATEWAY, what, fn)

    async def put(
        self, name: str, data: bytes, *, chunked: bool = False, if_absent: bool = False
    ) -> str:
        async def op(gw: Gateway) -> FileVersion:
            return await gw.put(
                self.namespace,
                name,
                BytesChunks(data, 3000),
                content_length=None if chunked else len(data),
                if_absent=if_absent,
            )

        version = await self._call(f"put {name}", op)
        assert isinstance(version, FileVersion)
        return version.version_id

    async def get(self, name: str, start: int | None = None, stop: int | None = None) -> bytes:
        async def op(gw: Gateway) -> bytes:
            version = await gw.stat(self.namespace, name)
            out = bytearray()
            async with gw.open_read(version, start=start or 0, stop=stop) as stream:
                async for chunk in stream:
                    out += chunk
            return bytes(out)

        data = await self._call(f"get {name}", op)
        assert isinstance(data, bytes)
        return data

    async def delete(self, name: str) -> None:
        async def op(gw: Gateway) -> bool:
            return await gw.delete(self.namespace, name)

        await self._call(f"delete {name}", op)

    async def stat(self, name: str) -> FileVersion:
        async def op(gw: Gateway) -> FileVersion:
            return await gw.stat(self.namespace, name)

        version = await self._call(f"stat {name}", op)
        assert isinstance(version, FileVersion)
        return version

    async def nodes(self) -> list[NodeStatus]:
        assert self._cluster.discovery is not None  # as discovery reports them: with leases
        return await self._cluster.discovery.list_nodes()

    async def add_node(self, capacity: int | None = None) -> str:
        return (await self._cluster.add_node(capacity)).node_id

    async def kill_node(self, node_id: str) -> None:
        self._net.endpoint(node_id).crash()

    async def part_keys(self) -> list[str]:
        return sorted(k for node in self._cluster.nodes for k in node.disk.parts)


class NetDriver:
    unit = UNIT

    def __init__(
        self,
        *,
        gateway: str,
        discovery: str,
        http: httpx.AsyncClient,
        internal: httpx.AsyncClient,
        config: NetConfig,
        nursery: trio.Nursery,
        data_dir: Path,
    ) -> None:
        self._gateway = gateway
        self._discovery = HttpDiscoveryClient(internal, discovery)
        self._discovery_url = discovery
        self._http = http
        self._internal = internal
        self._config = config
        self._nursery = nursery
        self._data_dir = data_dir
        self._extra = 0
        self._joined: dict[str, trio.CancelScope] = {}  # node id -> its task, of added nodes
        self._dirs: dict[str, Path] = {}  # node id -> its directory, of added nodes
        self.namespace = "default"

    async def create_namespace(self, name: str, *, engine: str, **settings: int) -> None:
        await self._discovery.create_namespace(
            namespace=name,
            public=True,
            engine=engine,
            copies=settings.get("copies"),
            parity=settings.get("parity"),
        )

    def _url(self, name: str) -> str:
        return f"{self._gateway}/{self.namespace}/{name}"

    async def put(
        self, name: str, data: bytes, *, chunked: bool = False, if_absent: bool = False
    ) -> str:
        headers = {"If-None-Match": "*"} if if_absent else {}
        content: bytes | AsyncIterator[bytes] = BytesChunks(data, 3000) if chunked else data
        response = await self._http.put(self._url(name), content=content, headers=headers)
        await raise_for_error(response)
        assert response.status_code == 201
        assert response.headers["ETag"] == response.json()["etag"]
        return str(response.json()["version"])

    async def get(self, name: str, start: int | None = None, stop: int | None = None) -> bytes:
        headers = {}
        if start is not None or stop is not None:
            size = (await self.stat(name)).size
            assert size is not None
            first, last = start or 0, (size if stop is None else stop) - 1
            if last < first:
                return b""
            headers["Range"] = f"bytes={first}-{last}"
        response = await self._http.get(self._url(name), headers=headers)
        await raise_for_error(response)
        assert int(response.headers["Content-Length"]) == len(response.content)
        return response.content

    async def delete(self, name: str) -> None:
        response = await self._http.delete(self._url(name))
        await raise_for_error(response)
        assert response.status_code == 204

    async def stat(self, name: str) -> FileVersion:
        return await self._discovery.resolve(namespace=self.namespace, name=name)

    async def nodes(self) -> list[NodeStatus]:
        return await self._discovery.list_nodes()

    async def add_node(
        self, capacity: int | None = None, *, port: int | None = None, again: str | None = None
    ) -> str:
        """A node in a new directory; or in the directory of ``again``, a node this added,
        which must be killed first (its ``node_id`` file, if it was removed, is new)."""
        if again is None:
            self._extra += 1
            data_dir = self._data_dir / f"joined-{self._extra}"
        else:
            data_dir = self.node_dir(again)
        scope = trio.CancelScope()

        async def run(*, task_status: trio.TaskStatus[str]) -> None:
            with scope:
                await run_storage(
                    self._config,
                    data_dir=data_dir,
                    discovery_url=self._discovery_url,
                    http=self._internal,
                    capacity=capacity,
                    port=port,
                    task_status=task_status,
                )

        await self._nursery.start(run)
        node_id = (data_dir / "node_id").read_text().strip()
        self._joined[node_id] = scope
        self._dirs[node_id] = data_dir
        return node_id

    def node_dir(self, node_id: str) -> Path:
        """The directory of a node :meth:`add_node` started."""
        return self._dirs[node_id]

    async def kill_node(self, node_id: str) -> None:
        self._joined.pop(node_id).cancel()
        await trio.lowlevel.checkpoint()

    def parts_being_written(self) -> list[Path]:
        """Temporary files of part writes in progress, on every node's disk."""
        return sorted(self._data_dir.glob("*/tmp/*.tmp"))

    async def reserved_bytes(self) -> int:
        """Bytes reserved on all nodes for uploads in flight."""
        return sum(node.reserved_bytes for node in await self.nodes())

    async def part_keys(self) -> list[str]:
        keys: list[str] = []
        for node in await self.nodes():
            response = await self._internal.get(f"{node.url}/v1/parts")
            await raise_for_error(response)
            keys += response.json()["keys"]
        return sorted(keys)


def net_config(*, local_calls: bool = True) -> NetConfig:
    return NetConfig(
        local_calls=local_calls,
        secret="contract-test-secret",
        gateway_port=0,
        discovery_port=0,
        storage_port=0,
        stripe_unit=UNIT,
        capacity=1 << 30,
        heartbeat_interval=HEARTBEAT,
        node_timeout=GIVE_UP / 4,  # no node of a loaded machine is taken for dead
        retire_grace=RETIRE_GRACE,
        sweep_interval=HEARTBEAT,
        # One gateway process, whose metrics and logs are this test's: the worker layout
        # (one per core by default) has tests of its own (test_workers_processes.py).
        gateway_workers=1,
    )


@asynccontextmanager
async def net_driver(
    data_dir: Path, *, local_calls: bool = True, config: NetConfig | None = None
) -> AsyncIterator[NetDriver]:
    """The embedded cluster on real sockets; ``local_calls=False`` sends every hop over HTTP.
    ``config`` replaces :func:`net_config`'s."""
    config = config or net_config(local_calls=local_calls)
    async with (
        make_http_client(config.secret) as internal,
        httpx.AsyncClient(timeout=30) as http,
        trio.open_nursery() as nursery,
    ):
        info = await nursery.start(partial(run_cluster, config, data_dir=data_dir))
        yield NetDriver(
            gateway=info.gateway,
            discovery=info.discovery,
            http=http,
            internal=internal,
            config=config,
            nursery=nursery,
            data_dir=data_dir,
        )
        nursery.cancel_scope.cancel()


SIM_SCENARIO = Scenario(
    name="contract",
    cluster=ClusterSpec(
        storage_nodes=6,
        stripe_unit=UNIT,
        heartbeat_interval=HEARTBEAT,
        retire_grace=RETIRE_GRACE,
        sweep_interval=HEARTBEAT,
    ),
)

Check = Callable[[Driver], Awaitable[None]]


def run_in(world: str, check: Check, tmp_path: Path, *, metadata_url: str | None = None) -> None:
    """Run ``check`` against a fresh cluster of ``world``.

    "sim": the simulator; "net": the embedded cluster as ``karma8 serve`` runs it (co-located
    roles call each other in-process); "net-http": the same with every internal hop over HTTP,
    as between separate processes; "net-pg": "net" with its metadata at ``metadata_url``.
    """
    if world == "sim":
        run_with_cluster(lambda cluster: check(SimDriver(cluster)), scenario=SIM_SCENARIO)
        return

    async def main() -> None:
        config = attrs.evolve(
            net_config(local_calls=world != "net-http"), metadata_url=metadata_url
        )
        async with net_driver(tmp_path, config=config) as driver:
            await check(driver)

    trio.run(main)
