"""The gateway's public HTTP API on a real socket: statuses, headers, JSON errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from karma8.core.errors import NotFound

from drivers import NetDriver, eventually, net_driver


@pytest.fixture
async def net(tmp_path: Path) -> AsyncIterator[NetDriver]:
    async with net_driver(tmp_path) as driver:
        yield driver


@pytest.fixture
def client(net: NetDriver) -> httpx.AsyncClient:
    return net._http


def url(net: NetDriver, path: str) -> str:
    return f"{net._gateway}{path}"


async def test_put_get_head_with_etag_and_conditional_get(
    net: NetDriver, client: httpx.AsyncClient
) -> None:
    put = await client.put(url(net, "/default/docs/a.txt"), content=b"hello world")
    assert put.status_code == 201
    etag = put.headers["ETag"]
    assert etag.startswith('"')
    assert etag == put.json()["etag"]
    get = await client.get(url(net, "/default/docs/a.txt"))
    assert get.status_code == 200
    assert get.content == b"hello world"
    assert get.headers["ETag"] == etag
    assert get.headers["Accept-Ranges"] == "bytes"
    head = await client.head(url(net, "/default/docs/a.txt"))
    assert head.status_code == 200
    assert head.headers["Content-Length"] == "11"
    assert head.content == b""
    cached = await client.get(url(net, "/default/docs/a.txt"), headers={"If-None-Match": etag})
    assert cached.status_code == 304
    assert cached.content == b""


@pytest.mark.parametrize(
    ("header", "status", "body"),
    [
        ("bytes=0-4", 206, b"01234"),
        ("bytes=5-", 206, b"56789"),
        ("bytes=-3", 206, b"789"),
        ("bytes=8-100", 206, b"89"),
        ("bytes=0-1,4-5", 200, b"0123456789"),  # multiple ranges: the whole file
        ("BYTES=2-3", 206, b"23"),  # the unit's name is case-insensitive (RFC 9110 §14.1)
    ],
)
async def test_range_requests(
    net: NetDriver, client: httpx.AsyncClient, header: str, status: int, body: bytes
) -> None:
    await client.put(url(net, "/default/r"), content=b"0123456789")
    response = await client.get(url(net, "/default/r"), headers={"Range": header})
    assert response.status_code == status
    assert response.content == body
    if status == 206:
        assert response.headers["Content-Range"].endswith("/10")


async def test_unsatisfiable_range_is_416(net: NetDriver, client: httpx.AsyncClient) -> None:
    put = await client.put(url(net, "/default/r"), content=b"0123456789")
    response = await client.get(url(net, "/default/r"), headers={"Range": "bytes=10-"})
    assert response.status_code == 416
    assert response.json()["error"]["code"] == "range_not_satisfiable"
    assert response.json()["error"]["request_id"] == response.headers["X-Request-Id"]
    assert response.headers["Content-Range"] == "bytes */10"
    # Which version it is of: a client resuming checks it is the one it has a part of.
    assert response.headers["ETag"] == put.headers["ETag"]


async def test_allowed_methods_are_named(net: NetDriver, client: httpx.AsyncClient) -> None:
    options = await client.options(url(net, "/default/f"))
    assert options.status_code == 204
    refused = await client.post(url(net, "/default/f"))
    assert refused.status_code == 405
    for response in (options, refused):
        assert response.headers["Allow"] == "DELETE, GET, HEAD, OPTIONS, PUT"


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        ("GET", "/default/missing", {}, 404, "not_found"),
        ("GET", "/nope/file", {}, 404, "not_found"),
        ("PUT", "/nope/file", {"content": b"x"}, 404, "not_found"),
        ("PUT", "/Bad/file", {"content": b"x"}, 400, "invalid_name"),
        ("PUT", "/default/a//b", {"content": b"x"}, 400, "invalid_name"),
        (
            "PUT",
            "/default/f",
            {"content": b"x", "headers": {"If-None-Match": '"abc"'}},
            400,
            "invalid_request",
        ),
        ("GET", "/default/?limit=0", {}, 400, "invalid_request"),
        ("GET", "/default/?limit=x", {}, 400, "invalid_request"),
        ("POST", "/default/f", {}, 405, "method_not_allowed"),
    ],
)
async def test_errors_are_json_with_the_right_status(
    net: NetDriver,
    client: httpx.AsyncClient,
    method: str,
    path: str,
    kwargs: dict[str, object],
    status: int,
    code: str,
) -> None:
    response = await client.request(method, url(net, path), **kwargs)  # type: ignore[arg-type]
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]
    assert response.json()["error"]["request_id"] == response.headers["X-Request-Id"]


async def test_the_first_of_several_request_ids_is_the_one(
    net: NetDriver, client: httpx.AsyncClient
) -> None:
    given = [("X-Request-Id", "first-id"), ("X-Request-Id", "second-id")]
    for response in (
        await client.get(url(net, "/default/missing"), headers=given),  # the data plane
        await client.get(url(net, "/default/?limit=0"), headers=given),  # a control route
    ):
        assert response.headers["X-Request-Id"] == "first-id", response.headers
        assert response.json()["error"]["request_id"] == "first-id"


async def test_create_only_put(net: NetDriver, client: httpx.AsyncClient) -> None:
    headers = {"If-None-Match": "*"}
    assert (
        await client.put(url(net, "/default/o"), content=b"1", headers=headers)
    ).status_code == 201
    again = await client.put(url(net, "/default/o"), content=b"2", headers=headers)
    assert again.status_code == 412
    assert (await client.get(url(net, "/default/o"))).content == b"1"


async def test_delete_is_idempotent(net: NetDriver, client: httpx.AsyncClient) -> None:
    await client.put(url(net, "/default/d"), content=b"x")
    assert (await client.delete(url(net, "/default/d"))).status_code == 204
    assert (await client.delete(url(net, "/default/d"))).status_code == 204
    assert (await client.get(url(net, "/default/d"))).status_code == 404


async def test_listing_paginates(net: NetDriver, client: httpx.AsyncClient) -> None:
    for name in ["a/1", "a/2", "a/3", "b/1"]:
        await client.put(url(net, f"/default/{name}"), content=name.encode())
    first = (await client.get(url(net, "/default/?prefix=a/&limit=2"))).json()
    assert [f["name"] for f in first["files"]] == ["a/1", "a/2"]
    assert first["next_after"] == "a/2"
    rest = (await client.get(url(net, "/default/?prefix=a/&limit=2&after=a/2"))).json()
    assert [f["name"] for f in rest["files"]] == ["a/3"]
    assert rest["next_after"] is None
    assert all(f["size"] == 3 for f in first["files"] + rest["files"])
    # Percent-encoded bytes that are not UTF-8: a 400, as in a path, not an empty listing.
    for query in ("prefix=%ff", "after=%ff", "prefix=a/&x=%c3"):
        refused = await client.get(url(net, f"/default/?{query}"))
        assert refused.status_code == 400
        assert "not UTF-8" in refused.json()["error"]["message"]
    unicode = (await client.get(url(net, "/default/?prefix=%C3%A9"))).json()
    assert unicode["files"] == []
    # A typo is refused, not taken for no filter at all (a whole namespace listed).
    typo = await client.get(url(net, "/default/?prefx=a/"))
    assert typo.status_code == 400
    assert typo.json()["error"]["message"] == (
        "unknown query parameter 'prefx' (known: after, limit, prefix)"
    )
    # Percent-encoding as strict as a path's, and no parameter twice (which would count?).
    for query, message in (
        ("prefix=bad%zz", "a '%' that is not followed by two hex digits"),
        ("after=%", "a '%' that is not followed by two hex digits"),
        ("limit=1&limit=2", "query parameter 'limit' is given more than once"),
        ("prefix=x&prefix=a/", "query parameter 'prefix' is given more than once"),
    ):
        refused = await client.get(url(net, f"/default/?{query}"))
        assert refused.status_code == 400, query
        assert message in refused.json()["error"]["message"], query


async def test_a_file_route_takes_no_query(net: NetDriver, client: httpx.AsyncClient) -> None:
    """A query on a file's path is refused, not dropped: ``DELETE /default/f?dryrun=1``
    deleted f, and ``PUT /default/a?b`` stored "a"."""
    await client.put(url(net, "/default/q"), content=b"kept")
    for method in ("PUT", "GET", "HEAD", "DELETE"):
        answer = await client.request(method, url(net, "/default/q?dryrun=1"), content=b"x")
        assert answer.status_code == 400, method
        if method != "HEAD":
            assert answer.json()["error"] == {
                "code": "invalid_request",
                "message": "unknown query parameter 'dryrun' (it takes none; a '?' in a name"
                " is sent as %3F)",
                "request_id": answer.headers["x-request-id"],
            }
    assert (await client.get(url(net, "/default/q"))).content == b"kept"
    assert (await client.get(url(net, "/default/a"))).status_code == 404
    assert (await client.put(url(net, "/default/a?b"), content=b"x")).status_code == 400
    assert (await client.get(url(net, "/default/a"))).status_code == 404
    stored = await client.put(url(net, "/default/a%3Fb"), content=b"x")
    assert stored.status_code == 201
    assert stored.json()["name"] == "a?b"


async def test_internal_apis_need_the_cluster_secret(net: NetDriver) -> None:
    async with httpx.AsyncClient() as anonymous:
        nodes = await net.nodes()
        targets = [f"{net._discovery_url}/v1/nodes", f"{nodes[0].url}/v1/parts"]
        targets.append(f"{nodes[0].url}/v1/parts/abc.0")  # a part route (the data plane)
        for target in targets:
            response = await anonymous.get(target)
            assert response.status_code == 403
            assert response.json()["error"]["code"] == "forbidden"
        health = await anonymous.get(f"{net._discovery_url}/healthz")
        assert health.status_code == 200
        # The control routes' own errors (Quart's): JSON with the request's id, and a 405
        # names what is allowed.
        for response, status in (
            (await net._internal.get(f"{net._discovery_url}/no/such/route"), 404),
            (await anonymous.post(f"{net._discovery_url}/healthz"), 405),
        ):
            assert response.status_code == status
            assert response.json()["error"]["request_id"] == response.headers["X-Request-Id"]
        assert "GET" in response.headers["Allow"]
        metrics = await anonymous.get(f"{net._discovery_url}/metrics")  # the secret's challenge
        assert metrics.status_code == 401
        assert metrics.json()["error"]["request_id"] == metrics.headers["X-Request-Id"]
    assert (await net._http.get(url(net, "/healthz"))).json()["ok"] is True


async def test_a_stored_part_cannot_be_overwritten(
    net: NetDriver, client: httpx.AsyncClient
) -> None:
    await client.put(url(net, "/default/immutable"), content=b"original bytes")
    version = await net.stat("immutable")
    part = version.parts[0]
    target = f"{part.node.url}/v1/parts/{part.key}"
    response = await net._internal.put(target, content=b"other")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "upload_conflict"
    assert (await net._internal.head(target)).status_code == 200
    assert await net.get("immutable") == b"original bytes"


async def test_part_routes_answer_as_documented(net: NetDriver, client: httpx.AsyncClient) -> None:
    await client.put(url(net, "/default/parts"), content=b"0123456789" * 5)
    part = (await net.stat("parts")).parts[0]
    target = f"{part.node.url}/v1/parts/{part.key}"
    head = await net._internal.head(target)
    assert head.status_code == 200
    assert head.headers["Content-Length"] == "10"
    assert head.headers["X-Karma8-Checksum"] == part.checksum
    span = await net._internal.get(target, params={"offset": 2, "length": 3})
    assert (span.status_code, span.content) == (200, b"234")
    assert span.headers["Content-Length"] == "3"
    beyond = await net._internal.get(target, params={"offset": 8, "length": 3})
    assert (beyond.status_code, beyond.json()["error"]["code"]) == (400, "invalid_request")
    missing = await net._internal.get(f"{part.node.url}/v1/parts/{part.key}0")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")
    options = await net._internal.options(target)
    refused = await net._internal.post(target, content=b"x")
    assert (options.status_code, refused.status_code) == (204, 405)
    assert refused.json()["error"]["code"] == "method_not_allowed"
    for response in (options, refused):
        assert response.headers["Allow"] == "DELETE, GET, HEAD, OPTIONS, PUT"


async def test_short_small_body_then_disconnect_leaves_nothing(net: NetDriver) -> None:
    # A body up to small_file_max is read whole before anything is placed or reserved.
    host, port = net._gateway.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(
            b"PUT /default/short HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
            + b"x" * 30_000
        )
        await trio.sleep(0.2)

    async def nothing_left() -> bool:
        no_parts = await net.part_keys() == [] and net.parts_being_written() == []
        return no_parts and await net.reserved_bytes() == 0

    await eventually(nothing_left)
    with pytest.raises(NotFound):
        await net.stat("short")


async def test_short_body_then_disconnect_leaves_nothing(net: NetDriver) -> None:
    # Longer than small_file_max (1 MiB): the body streams, so the upload begins at once.
    host, port = net._gateway.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(
            b"PUT /default/short HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n"
            + b"x" * 30_000
        )

        async def the_upload_began() -> bool:
            return await net.reserved_bytes() > 0

        await eventually(the_upload_began)

    async def nothing_left() -> bool:
        no_parts = await net.part_keys() == [] and net.parts_being_written() == []
        return no_parts and await net.reserved_bytes() == 0

    await eventually(nothing_left)
    with pytest.raises(NotFound):
        await net.stat("short")


async def test_a_malformed_record_from_a_peer_is_a_400_naming_the_field(net: NetDriver) -> None:
    registration = {"node_id": "n9", "url": "http://h:1", "capacity_bytes": "lots"}
    response = await net._internal.post(
        f"{net._discovery_url}/v1/nodes", json=registration | {"disk_used_bytes": 0}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert "capacity_bytes" in error["message"]


async def test_a_method_in_lowercase_is_not_that_method(net: NetDriver) -> None:
    # Methods are case-sensitive (RFC 9110 §9.1): "put" is an unknown method, not PUT.
    host, port = net._gateway.removeprefix("http://").rsplit(":", 1)
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        await stream.send_all(
            b"put /default/lower HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"X-Request-Id: first-id\r\nX-Request-Id: second-id\r\n"
            b"Connection: close\r\n\r\nab"
        )
        answer = b""
        with trio.fail_after(60):  # a guard against a hang (an answer that never closes)
            while chunk := await stream.receive_some(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 501"), answer
    assert b'"not_implemented"' in answer
    assert b"x-request-id: first-id\r\n" in answer.lower()  # the client's, the first given
    assert b'"request_id":"first-id"' in answer
    with pytest.raises(NotFound):
        await net.stat("lower")
