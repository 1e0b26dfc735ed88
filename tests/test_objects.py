"""The gateway's object routes at the ASGI level: which paths are theirs, and the counters.

What they share with a storage node's part routes (backpressure, a client that goes away,
405 with Allow, error bodies) is checked on both in tests/test_exchange.py.
"""

from __future__ import annotations

import json
from typing import Any, cast

import pytest
import trio
import trio.testing
from hypercorn.typing import Scope

from karma8.net.bounds import UploadGate
from karma8.net.objects import ObjectRoutes, new_stats, object_path

from dataplane import CHUNK, HANG, FakeServer, StubGateway, http_scope


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("/default/a.txt", ("default", "a.txt")),
        ("/default/dir/sub/a", ("default", "dir/sub/a")),
        ("/default//a", ("default", "/a")),  # the gateway rejects the name, with a 400
        ("/default/", None),  # the listing
        ("/default", None),
        ("/metrics", None),
        ("/", None),
        ("//a", None),
    ],
)
def test_which_paths_are_objects(path: str, target: tuple[str, str] | None) -> None:
    assert object_path(path) == target


async def test_other_routes_go_to_the_app() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        seen.append(cast(dict[str, str], scope).get("path", scope["type"]))

    objects = ObjectRoutes(StubGateway(), {}, app)
    server = FakeServer()
    for path in ("/default/", "/metrics", "/healthz"):
        await objects(http_scope("GET", path, []), *server.calls)
    await objects(cast(Scope, {"type": "lifespan"}), *server.calls)
    assert seen == ["/default/", "/metrics", "/healthz", "lifespan"]
    assert server.sent == []


async def test_gets_puts_and_failed_reads_are_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stats = {"gets": 0, "puts": 0, "read_errors": 0}
    routes = ObjectRoutes(StubGateway(fail_after=2), stats, cast(Any, None))
    with trio.fail_after(HANG):
        put = FakeServer()
        await put.request(CHUNK)
        headers = [(b"content-length", str(len(CHUNK)).encode())]
        await routes(http_scope("PUT", "/default/f", headers), *put.calls)
        get = FakeServer()
        await get.request()
        await routes(http_scope("GET", "/default/f", []), *get.calls)
    assert (put.status, get.status) == (201, 200)
    assert stats == {"gets": 1, "puts": 1, "read_errors": 1}


async def test_a_read_that_fails_before_its_first_byte_is_an_error_status(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # (A parity file missing more parts than it survives fails as its rebuild starts.)
    stats = new_stats()
    routes = ObjectRoutes(StubGateway(fail_after=0), stats, cast(Any, None))
    get = FakeServer()
    with trio.fail_after(HANG):
        await get.request()
        await routes(http_scope("GET", "/default/f", []), *get.calls)
    assert get.status == 502
    assert json.loads(get.body())["error"]["code"] == "storage_failure"
    assert stats == {"gets": 0, "puts": 0, "read_errors": 0}


@pytest.mark.parametrize("fail_after", [None, 2])
async def test_a_read_whose_answer_cannot_complete_gives_up_its_streams(
    autojump_clock: trio.testing.MockClock, fail_after: int | None
) -> None:
    """A client that goes away, or a part that fails mid-body: the read is left by an
    exception, so that its part streams are given up, not read to their end (over HTTP a
    stream closed normally drains the rest of its part)."""
    gateway = StubGateway(fail_after=fail_after)
    routes = ObjectRoutes(gateway, new_stats(), cast(Any, None))
    get = FakeServer(leave_after=3 if fail_after is None else None)
    with trio.fail_after(HANG):
        await get.request()
        await routes(http_scope("GET", "/default/f", []), *get.calls)
    assert get.status == 200
    assert gateway.chunks.endings == ["given up"]


async def test_ended_uploads_are_counted_failed_or_not(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # For give_back_memory: a failed upload's buffers may sit in reference cycles.
    uploads = UploadGate(max_uploads=4, idle_timeout=60.0)
    routes = ObjectRoutes(StubGateway(), new_stats(), cast(Any, None), uploads=uploads)
    statuses = []
    with trio.fail_after(HANG):
        for name in ("ok", "Bad//name"):  # the second fails: an invalid name
            put = FakeServer()
            await put.request(CHUNK)
            headers = [(b"content-length", str(len(CHUNK)).encode())]
            await routes(http_scope("PUT", f"/default/{name}", headers), *put.calls)
            statuses.append(put.status)
    assert statuses == [201, 400]
    assert (uploads.ended, uploads.failed, uploads.in_flight) == (2, 1, 0)


async def test_a_put_beyond_max_uploads_is_a_503_with_the_request_id() -> None:
    uploads = UploadGate(max_uploads=0, idle_timeout=60.0)  # every upload is one too many
    routes = ObjectRoutes(StubGateway(), new_stats(), cast(Any, None), uploads=uploads)
    put = FakeServer()
    headers = [(b"content-length", b"1"), (b"x-request-id", b"busy-1")]
    with trio.fail_after(HANG):
        await routes(http_scope("PUT", "/default/f", headers), *put.calls)
    assert put.status == 503
    assert put.header(b"retry-after") == b"1"
    assert put.header(b"x-request-id") == b"busy-1"
    assert json.loads(put.body())["error"] == {
        "code": "unavailable",
        "message": "0 uploads in flight, the limit; retry later",
        "request_id": "busy-1",
    }
