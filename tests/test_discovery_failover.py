"""Several discovery instances behind one discovery client (karma8/net/clients.py): real
discovery apps on sockets, two instances sharing one SQLite database, and in front of the
first a proxy that passes requests on, refuses them (503) or loses their answers (504 after
forwarding: the request arrived). Calls fail over, stay with the instance that answered, send a
request that may have arrived again only where that is safe, and keep a small upload's commit
with the instance that holds its placement lease."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import attrs
import httpx
import pytest
import trio
from hypercorn.typing import Framework

from karma8.actors.discovery import Discovery, DiscoveryConfig
from karma8.actors.rebalancer import Rebalancer, RebalancerConfig
from karma8.actors.repair import RepairConfig, Repairer
from karma8.core.errors import NotEnoughNodes, Unavailable, UploadConflict
from karma8.core.layout import StripeLayout
from karma8.core.model import NodeRef, NodeRegistration, PartReceipt, VersionState
from karma8.metadata.sqlite import SqliteMetadataStore
from karma8.net.clients import HttpDiscoveryClient, HttpStorageClient, make_http_client
from karma8.net.discovery_app import discovery_app
from karma8.net.serving import RandomIds, WallClock, serve_app
from karma8.sim.world import InlineRunner

from processes import free_port

T = TypeVar("T")
SECRET = "failover-secret"
LAYOUT = StripeLayout(parts=5, unit=4)


inline = InlineRunner()


class Proxy:
    """An ASGI app in front of one instance: ``mode`` "pass" forwards, "refuse" answers 503
    (as a load balancer with no instance behind it does), "lose" forwards and answers 504 (the
    instance did the work; its answer never came back). ``hits`` counts the requests."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.mode = "pass"
        self.hits: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": f"{message['type']}.complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        self.hits.append(f"{scope['method']} {scope['path']}")
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        status, content = 503, b"no upstream"
        if self.mode != "refuse":
            headers = {k.decode(): v.decode() for k, v in scope["headers"]}
            headers.pop("host", None)
            url = f"{self.target}{scope['path']}"
            query = scope["query_string"].decode()
            async with httpx.AsyncClient() as http:
                response = await http.request(
                    scope["method"],
                    url + (f"?{query}" if query else ""),
                    headers=headers,
                    content=body,
                )
            status, content = response.status_code, response.content
            if self.mode == "lose":
                status, content = 504, b"gateway timeout"
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-length", str(len(content)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": content})


@attrs.define
class Instances:
    """Discovery instances A and B on one database; ``proxy`` in front of A."""

    a: Discovery
    b: Discovery
    a_url: str
    b_url: str
    proxy: Proxy
    proxy_url: str
    http: httpx.AsyncClient

    def client(self, *urls: str, **kwargs: Any) -> HttpDiscoveryClient:
        return HttpDiscoveryClient(self.http, list(urls), **kwargs)


def instance(path: Path, ids: Any = None) -> Discovery:
    return Discovery(
        store=SqliteMetadataStore(path),
        blocking=inline,
        clock=WallClock(),
        ids=ids or RandomIds(),
        config=DiscoveryConfig(layout=LAYOUT, namespaces=("default",)),
    )


@asynccontextmanager
async def instances(tmp_path: Path, *, nodes: int = 6) -> AsyncIterator[Instances]:
    database = tmp_path / "discovery.sqlite3"
    a, b = instance(database), instance(database)
    async with make_http_client(SECRET, timeout=30) as http, trio.open_nursery() as nursery:
        urls = []
        for discovery in (a, b):
            await nursery.start(discovery.run)
            nodes_http = HttpStorageClient(http, blocking=inline)
            rebalancer = Rebalancer(
                discovery=discovery.moves, storage=nodes_http, config=RebalancerConfig()
            )
            repairer = Repairer(
                discovery=discovery.moves, storage=nodes_http, config=RepairConfig()
            )
            app = discovery_app(discovery, secret=SECRET, rebalancer=rebalancer, repairer=repairer)
            urls.append(await nursery.start(partial(serve_app, app, host="127.0.0.1", port=0)))
        proxy = Proxy(urls[0])
        as_app = cast(Framework, proxy)  # a plain ASGI callable
        proxy_url = await nursery.start(partial(serve_app, as_app, host="127.0.0.1", port=0))
        for i in range(nodes):
            registration = NodeRegistration(
                node_id=f"n{i}", url=f"http://127.0.0.1:{i + 1}", capacity_bytes=1 << 20
            )
            await a.register_node(registration)
        yield Instances(a, b, urls[0], urls[1], proxy, proxy_url, http)
        nursery.cancel_scope.cancel()


def receipts(size: int) -> list[PartReceipt]:
    return [
        PartReceipt(index=i, size=s, checksum=f"c{i}")
        for i, s in enumerate(LAYOUT.part_sizes(size))
    ]


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


async def test_calls_fail_over_to_an_instance_that_answers_and_stay_with_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with instances(tmp_path) as cluster:
        cluster.proxy.mode = "refuse"
        down = dead_url()
        client = cluster.client(down, cluster.proxy_url, cluster.b_url, warn_every=5.0)
        with caplog.at_level(logging.WARNING, logger="karma8.net.clients"):
            assert len(await client.list_nodes()) == 6
            assert len(await client.list_nodes()) == 6
        # The refusing instance was asked once; the second call went straight to B.
        assert cluster.proxy.hits == ["GET /v1/nodes"]
        warnings = [r.getMessage() for r in caplog.records]
        assert warnings == [
            f"cannot reach discovery at {down}: GET {down}/v1/nodes: ConnectError",
            f"cannot reach discovery at {cluster.proxy_url}:"
            f" GET {cluster.proxy_url}/v1/nodes: HTTP 503",
        ]
        # A storage node registers and heartbeats to whichever instance answers.
        registration = NodeRegistration(node_id="late", url="http://late", capacity_bytes=9)
        await client.register_node(registration)
        assert await client.heartbeat(registration, deleted=[]) == []
        assert "late" in {n.node_id for n in await cluster.a.list_nodes()}
        # None answers: one Unavailable naming what each did.
        cluster.proxy.hits.clear()
        nobody = cluster.client(down, cluster.proxy_url)
        with pytest.raises(Unavailable) as caught:
            await nobody.list_nodes()
        assert "ConnectError" in caught.value.message
        assert "HTTP 503" in caught.value.message


async def test_an_instances_own_answer_is_not_failed_over(tmp_path: Path) -> None:
    """503 not_enough_nodes is discovery's answer, not an instance that cannot serve."""
    async with instances(tmp_path, nodes=3) as cluster:
        client = cluster.client(cluster.proxy_url, cluster.b_url)
        with pytest.raises(NotEnoughNodes):
            await client.begin_upload(namespace="default", name="f", size_hint=10)
        assert cluster.proxy.hits == ["POST /v1/uploads"]
        assert client.urls == (cluster.proxy_url, cluster.b_url)


async def test_a_commit_whose_answer_was_lost_succeeds_on_the_next_instance(
    tmp_path: Path,
) -> None:
    async with instances(tmp_path) as cluster:
        version = await cluster.client(cluster.a_url).begin_upload(
            namespace="default", name="f", size_hint=10
        )
        cluster.proxy.mode = "lose"
        client = cluster.client(cluster.proxy_url, cluster.b_url)
        committed = await client.commit_upload(
            version_id=version.version_id, size=10, receipts=receipts(10)
        )
        # A committed it (its answer was lost); B found it committed with the same receipts.
        assert cluster.proxy.hits == [f"POST /v1/uploads/{version.version_id}/commit"]
        assert committed.state is VersionState.COMMITTED
        current = await cluster.b.resolve(namespace="default", name="f")
        assert current.version_id == version.version_id
        assert sum(n.used_bytes for n in await cluster.b.list_nodes()) == 10  # counted once
        # A pending upload's abort, extend and replace are state in the database: any instance.
        other = await client.begin_upload(namespace="default", name="g", size_hint=10)
        assert (await client.abort_upload(version_id=other.version_id)).state is (
            VersionState.ABORTED
        )


async def test_a_call_that_is_not_safe_to_repeat_is_not_sent_again(tmp_path: Path) -> None:
    async with instances(tmp_path) as cluster:
        cluster.proxy.mode = "lose"
        client = cluster.client(cluster.proxy_url, cluster.b_url)
        with pytest.raises(Unavailable, match="HTTP 504"):
            await client.create_token(namespace="default", read=True, write=False)
        assert len(await cluster.b.list_tokens()) == 1  # A made it; B was not asked for another
        # Refused before it arrived (no connection): sent to the next one.
        client = cluster.client(dead_url(), cluster.b_url)
        await client.create_token(namespace="default", read=True, write=False)
        assert len(await cluster.b.list_tokens()) == 2


async def test_a_small_uploads_commit_stays_with_the_instance_holding_its_lease(
    tmp_path: Path,
) -> None:
    async with instances(tmp_path) as cluster:
        client = cluster.client(cluster.proxy_url, cluster.b_url)
        placed = await client.place_upload(namespace="default", name="s", size=10)
        assert cluster.a.leases.holds(placed.version_id)
        committed = await client.commit_upload(
            version_id=placed.version_id, size=10, receipts=receipts(10)
        )
        assert committed.state is VersionState.COMMITTED
        # The holder cannot be reached: the commit does not go to B (which knows no such
        # upload and would answer upload_conflict), and neither does the abort that settles
        # it: the parts may yet be committed by A, so nobody may delete them on B's word.
        placed = await client.place_upload(namespace="default", name="t", size=10)
        cluster.proxy.mode = "refuse"
        with pytest.raises(Unavailable):
            await client.commit_upload(version_id=placed.version_id, size=10, receipts=receipts(10))
        with pytest.raises(Unavailable):
            await client.abort_upload(version_id=placed.version_id)
        assert not cluster.b.leases.holds(placed.version_id)
        with pytest.raises(UploadConflict):
            await cluster.b.commit_upload(
                version_id=placed.version_id, size=10, receipts=receipts(10)
            )
        # Other calls fail over as usual.
        assert len(await client.list_nodes()) == 6


async def test_each_attempt_gets_its_share_of_the_time_left(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An instance that times out (the request may have arrived) leaves time for the next;
    a read is safe to send again. (Virtual time: the timed-out attempt takes 3 s of it.)"""
    timeouts: list[tuple[str, float]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        timeouts.append((request.url.host, request.extensions["timeout"]["read"]))
        if request.url.host == "b":
            return httpx.Response(200, json={"nodes": []})
        await trio.sleep(3.0)
        raise httpx.ReadTimeout("no answer", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler), timeout=60) as http:
        client = HttpDiscoveryClient(http, "http://a:1, http://b:1/", budget=10.0)
        assert client.urls == ("http://a:1", "http://b:1")
        assert await client.list_nodes() == []
        # Half of the budget while two instances are left to try, then all that is left.
        assert timeouts == [("a", 5.0), ("b", 7.0)]
        # With a longer budget an attempt that leaves another to try is capped (a hung
        # instance costs 10 s, not half of a minute); the last one gets the rest.
        timeouts.clear()
        client = HttpDiscoveryClient(http, "http://a:1,http://b:1", budget=60.0)
        assert await client.list_nodes() == []
        assert timeouts == [("a", 10.0), ("b", 57.0)]


async def test_a_call_after_the_process_closed_its_connections_is_unavailable() -> None:
    # A worker stopping closes its pool while a shielded clean-up (an upload's abort) still
    # runs: that call is a 503 like any unreachable discovery, not a 500 with a traceback.
    async with make_http_client(SECRET, timeout=5) as http:
        discovery = HttpDiscoveryClient(http, [dead_url(), dead_url()])
        nodes = HttpStorageClient(http, blocking=inline)
    with pytest.raises(Unavailable, match="shutting down"):
        await discovery.abort_upload(version_id="v1")
    with pytest.raises(Unavailable, match="shutting down"):
        await nodes.delete_part(NodeRef(node_id="n1", url=dead_url()), "k.0")
