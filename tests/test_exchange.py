"""The data-plane exchange (:mod:`karma8.net.exchange`), the same behaviours checked on both
of its routes: the gateway's objects and a storage node's parts.

The server side is played by :class:`FakeServer` (a queue of 10 messages, as in Hypercorn);
time is virtual (the autojump clock), and the tests wait on events, never on the clock.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing

from karma8.core.errors import NotEnoughNodes, StorageFailure
from karma8.net.exchange import ExchangeRoutes
from karma8.net.objects import ObjectRoutes
from karma8.net.parts import PartRoutes, part_path

from dataplane import CHUNK, HANG, QUEUE, FakeServer, Headers, StubGateway, StubNode, http_scope

SECRET = "s3cret"
STATS = ("gets", "puts", "read_errors")


async def not_ours(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError(f"{scope.get('path')} went to Quart")


@dataclass
class Plane:
    """One side of the data plane, with what its tests need to address it."""

    name: str
    make: Callable[[int | None], StubGateway | StubNode]  # a backend, given fail_after
    routes: Callable[[StubGateway | StubNode], ExchangeRoutes[Any]]
    upload: str  # a path to PUT to
    refused: str  # a PUT path refused before its body is read
    big: str  # a huge download
    missing: str
    lookup: str  # the backend's method that finds a file or part
    headers: Headers  # what every request carries (the cluster secret)


def gateway_routes(backend: StubGateway | StubNode) -> ExchangeRoutes[Any]:
    assert isinstance(backend, StubGateway)
    return ObjectRoutes(backend, dict.fromkeys(STATS, 0), not_ours)


def part_routes(backend: StubGateway | StubNode) -> ExchangeRoutes[Any]:
    assert isinstance(backend, StubNode)
    return PartRoutes(backend, not_ours, secret=SECRET)


PLANES = [
    Plane(
        name="gateway",
        make=StubGateway,
        routes=gateway_routes,
        upload="/default/x",
        refused="/Bad NS/x",
        big="/default/big",
        missing="/default/missing",
        lookup="stat",
        headers=[],
    ),
    Plane(
        name="storage",
        make=StubNode,
        routes=part_routes,
        upload="/v1/parts/v1.0",
        refused="/v1/parts/not..a.key",
        big="/v1/parts/big.0",
        missing="/v1/parts/v9.0",
        lookup="stat_part",
        headers=[(b"x-karma8-secret", SECRET.encode())],
    ),
]


@pytest.fixture(params=PLANES, ids=[p.name for p in PLANES])
def plane(request: pytest.FixtureRequest) -> Plane:
    assert isinstance(request.param, Plane)
    return request.param


def error_code(server: FakeServer) -> str:
    assert server.header(b"content-type") == b"application/json"
    body = server.body()
    assert server.header(b"content-length") == str(len(body)).encode()
    code = json.loads(body)["error"]["code"]
    assert isinstance(code, str)
    return code


async def test_a_slow_upload_holds_the_body_back(
    plane: Plane, autojump_clock: trio.testing.MockClock
) -> None:
    # Nothing is buffered beyond Hypercorn's queue: while the upload does not read, the
    # client can get no more than the queue's worth in, and TCP slows it down.
    backend = plane.make(None)
    backend.may_read = trio.Event()
    server = FakeServer()
    count = 4 * QUEUE
    headers = [*plane.headers, (b"content-length", str(count * len(CHUNK)).encode())]
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send_body, count)
            nursery.start_soon(
                plane.routes(backend), http_scope("PUT", plane.upload, headers), *server.calls
            )
            await trio.testing.wait_all_tasks_blocked()
            assert server.body_messages == QUEUE
            assert backend.received == b""
            backend.may_read.set()
    assert server.status == 201
    assert backend.received == CHUNK * count
    assert backend.stored == 1


async def test_a_client_gone_mid_body_fails_the_upload_without_an_answer(
    plane: Plane, autojump_clock: trio.testing.MockClock
) -> None:
    backend = plane.make(None)
    server = FakeServer()
    await server.request(b"abc", more=True)
    await server.disconnect()
    headers = [*plane.headers, (b"content-length", b"10")]
    with trio.fail_after(HANG):
        await plane.routes(backend)(http_scope("PUT", plane.upload, headers), *server.calls)
    assert server.sent == []  # nobody to answer
    assert backend.received == b"abc"
    assert backend.stored == 0


async def test_an_early_answer_drains_the_body_it_did_not_read(
    plane: Plane, autojump_clock: trio.testing.MockClock
) -> None:
    # The name is refused before the body is read. Hypercorn puts the disconnect into the
    # request's queue once the answer has ended; with the queue full of unread body and
    # nobody reading, that would wait forever.
    server = FakeServer()
    headers = [*plane.headers, (b"content-length", str(1 << 40).encode())]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.keep_sending)
        await trio.testing.wait_all_tasks_blocked()  # the queue is full
        with trio.fail_after(HANG):
            await plane.routes(plane.make(None))(
                http_scope("PUT", plane.refused, headers), *server.calls
            )
        nursery.cancel_scope.cancel()
    assert server.status == 400
    assert error_code(server) in ("invalid_name", "invalid_request")


async def test_a_download_stops_when_the_client_goes_away(
    plane: Plane, autojump_clock: trio.testing.MockClock
) -> None:
    backend = plane.make(None)
    server = FakeServer(leave_after=3)
    await server.request()  # a GET: its (empty) body is complete
    with trio.fail_after(HANG):
        await plane.routes(backend)(http_scope("GET", plane.big, plane.headers), *server.calls)
    assert server.status == 200
    assert all(body["more_body"] for body in server.bodies())  # never ended as complete
    assert backend.chunks.open == 0


async def test_a_read_that_fails_mid_stream_cuts_the_body_short(
    plane: Plane, autojump_clock: trio.testing.MockClock
) -> None:
    backend = plane.make(2)
    server = FakeServer()
    await server.request()
    with trio.fail_after(HANG):
        await plane.routes(backend)(http_scope("GET", plane.big, plane.headers), *server.calls)
    assert server.status == 200
    bodies = server.bodies()
    assert [len(b["body"]) for b in bodies] == [len(CHUNK), len(CHUNK)]
    assert all(body["more_body"] for body in bodies)  # Hypercorn closes: a short body
    assert backend.chunks.open == 0


@pytest.mark.parametrize("method", ["POST", "PATCH", "OPTIONS"])
async def test_the_allowed_methods_are_named(
    plane: Plane, method: str, autojump_clock: trio.testing.MockClock
) -> None:
    server = FakeServer()
    await server.request()
    await plane.routes(plane.make(None))(
        http_scope(method, plane.upload, plane.headers), *server.calls
    )
    assert server.header(b"allow") == b"DELETE, GET, HEAD, OPTIONS, PUT"
    if method == "OPTIONS":
        assert server.status == 204
        assert server.body() == b""
    else:
        assert server.status == 405
        assert error_code(server) == "method_not_allowed"


async def test_a_missing_file_or_part_is_a_json_404(
    plane: Plane, autojump_clock: trio.testing.MockClock
) -> None:
    for method in ("GET", "HEAD"):
        server = FakeServer()
        await server.request()
        await plane.routes(plane.make(None))(
            http_scope(method, plane.missing, plane.headers), *server.calls
        )
        assert server.status == 404
        assert error_code(server) == "not_found"


async def test_an_unexpected_error_is_a_json_500(
    plane: Plane, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    backend = plane.make(None)

    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(backend, plane.lookup, broken)
    server = FakeServer()
    await server.request()
    await plane.routes(backend)(http_scope("GET", plane.missing, plane.headers), *server.calls)
    assert server.status == 500
    assert error_code(server) == "internal"


async def test_an_http2_body_without_a_length_is_read(
    plane: Plane, autojump_clock: trio.testing.MockClock
) -> None:
    # HTTP/2 has no chunked coding: a body of unknown size comes with neither header.
    backend = plane.make(None)
    server = FakeServer()
    await server.request(b"abc", more=True)
    await server.request(b"def")
    with trio.fail_after(HANG):
        await plane.routes(backend)(
            http_scope("PUT", plane.upload, plane.headers, version="2"), *server.calls
        )
    assert backend.received == b"abcdef"
    assert server.status == 201


# The storage node's part routes alone.


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("/v1/parts/v1.0", "v1.0"),
        ("/v1/parts/not..a.key", "not..a.key"),  # the node refuses it, with a 400
        ("/v1/parts", None),  # the listing
        ("/v1/parts/", None),
        ("/v1/parts/a/b", None),
        ("/v1/scrub", None),
        ("/healthz", None),
    ],
)
def test_which_paths_are_parts(path: str, key: str | None) -> None:
    assert part_path(path) == key


@pytest.mark.parametrize("method", ["PUT", "GET", "POST", "OPTIONS"])
@pytest.mark.parametrize("secret", [None, "wrong"])
async def test_a_part_route_needs_the_cluster_secret_whatever_the_method(
    method: str, secret: str | None, autojump_clock: trio.testing.MockClock
) -> None:
    node = StubNode()
    server = FakeServer()
    headers = [(b"content-length", str(1 << 40).encode())]
    if secret is not None:
        headers.append((b"x-karma8-secret", secret.encode()))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.keep_sending)
        with trio.fail_after(HANG):
            await part_routes(node)(http_scope(method, "/v1/parts/v1.0", headers), *server.calls)
        nursery.cancel_scope.cancel()
    assert server.status == 403
    assert error_code(server) == "forbidden"
    assert node.received == b""


async def test_a_part_is_read_back_whole_in_ranges_and_by_head(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node = StubNode()
    routes = part_routes(node)
    secret = [(b"x-karma8-secret", SECRET.encode())]

    async def request(method: str, query: bytes = b"", body: bytes = b"") -> FakeServer:
        server = FakeServer()
        await server.request(body)
        headers = [*secret, (b"content-length", str(len(body)).encode())]
        await routes(http_scope(method, "/v1/parts/v1.0", headers, query=query), *server.calls)
        return server

    put = await request("PUT", body=b"0123456789")
    assert put.status == 201
    stored = json.loads(put.body())
    assert stored == {"key": "v1.0", "size": 10, "checksum": node.disk.parts["v1.0"].checksum}
    assert (await request("PUT", body=b"other")).status == 409
    head = await request("HEAD")
    assert (head.status, head.body()) == (200, b"")
    assert head.header(b"content-length") == b"10"
    assert head.header(b"x-karma8-checksum") == stored["checksum"].encode()
    whole = await request("GET")
    assert (whole.status, whole.body()) == (200, b"0123456789")
    span = await request("GET", b"offset=2&length=3")
    assert (span.status, span.body(), span.header(b"content-length")) == (200, b"234", b"3")
    assert (await request("GET", b"offset=7")).body() == b"789"
    for query in (b"offset=x", b"length=-1", b"offset=8&length=3"):
        refused = await request("GET", query)
        assert (refused.status, error_code(refused)) == (400, "invalid_request")
    deleted = await request("DELETE")
    assert (deleted.status, deleted.body()) == (204, b"")
    assert node.stored == 0


async def test_a_5xx_names_a_request_id_and_is_logged_with_its_cause(
    plane: Plane,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = plane.make(None)
    cause = "node http://10.9.8.7:9000 failed: connection refused"

    async def failing(*args: Any, **kwargs: Any) -> None:
        raise StorageFailure(cause)

    monkeypatch.setattr(backend, plane.lookup, failing)
    server = FakeServer()
    await server.request()
    with caplog.at_level(logging.WARNING):
        await plane.routes(backend)(http_scope("GET", plane.missing, plane.headers), *server.calls)
    assert server.status == 502
    error = json.loads(server.body())["error"]
    request_id = server.header(b"x-request-id")
    assert request_id
    assert error["request_id"] == request_id.decode()
    if plane.name == "gateway":  # public: the cause stays in the log
        assert "10.9.8.7" not in server.body().decode()
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    logged = record.getMessage()
    for part in (request_id.decode(), "GET", plane.missing, cause, "502"):
        assert part in logged


async def test_a_public_503_not_enough_nodes_says_how_many(
    plane: Plane, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    # Counts, no addresses: what a client needs to act on (http-api.md promises it).
    backend = plane.make(None)
    need = "need 7 storage nodes with 2 bytes free, have 6 (6 available of 6)"

    async def short(*args: Any, **kwargs: Any) -> None:
        raise NotEnoughNodes(need)

    monkeypatch.setattr(backend, plane.lookup, short)
    server = FakeServer()
    await server.request()
    await plane.routes(backend)(http_scope("GET", plane.missing, plane.headers), *server.calls)
    assert server.status == 503
    assert json.loads(server.body())["error"]["message"] == need


async def test_every_answer_has_a_request_id(
    plane: Plane, autojump_clock: trio.testing.MockClock
) -> None:
    ids = set()
    for _ in range(2):
        server = FakeServer()
        await server.request()
        await plane.routes(plane.make(None))(
            http_scope("GET", plane.missing, plane.headers), *server.calls
        )
        request_id = server.header(b"x-request-id")
        assert request_id
        assert json.loads(server.body())["error"]["request_id"] == request_id.decode()
        ids.add(request_id)
    assert len(ids) == 2
