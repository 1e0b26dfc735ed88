"""Strict HTTP at the gateway's edge, on a real socket (docs/http-api.md, "Requests"): each
hostile request gets its documented status, nothing is stored, and the gateway goes on
serving others."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import pytest
import trio

from karma8.core.errors import NotFound

from drivers import NetDriver, net_config, net_driver

LIMIT = 1 << 20  # the gateway's max_file_size here
GIVE_UP = 30  # seconds; a guard against a hang, not a wait
EXPECT = "Expect: 100-continue\r\n\r\n"


@pytest.fixture
async def net(tmp_path: Path) -> AsyncIterator[NetDriver]:
    async with net_driver(tmp_path, config=attrs.evolve(net_config(), max_file_size=LIMIT)) as d:
        yield d


async def connect(net: NetDriver) -> trio.SocketStream:
    host, port = net._gateway.removeprefix("http://").split(":")
    return await trio.open_tcp_stream(host, int(port))


class Answer:
    def __init__(self, head: bytes, body: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        self.body = body

    def error(self) -> dict[str, str]:
        error = json.loads(self.body)["error"]
        assert error["request_id"] == self.headers["x-request-id"]
        assert isinstance(error, dict)
        return error


async def read_answer(stream: trio.SocketStream, buffer: bytearray) -> Answer:
    """The next answer on ``stream`` (``buffer`` keeps what came after it)."""
    with trio.fail_after(GIVE_UP):
        while b"\r\n\r\n" not in buffer:
            chunk = await stream.receive_some(65536)
            assert chunk, bytes(buffer)
            buffer += chunk
        head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
        answer = Answer(head, b"")
        length = int(answer.headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = await stream.receive_some(65536)
            assert chunk
            rest += chunk
    buffer[:] = rest[length:]
    answer.body = rest[:length]
    return answer


async def closed(stream: trio.SocketStream) -> bool:
    """Whether the server closes the connection (it sends nothing more)."""
    with trio.fail_after(GIVE_UP):
        try:
            return await stream.receive_some(65536) == b""
        except trio.BrokenResourceError:  # a reset: closed too
            return True


async def one_request(net: NetDriver, request: bytes) -> tuple[Answer, bool]:
    """Send ``request`` on a fresh connection: its answer, and whether the server closed."""
    async with await connect(net) as stream:
        await stream.send_all(request)
        answer = await read_answer(stream, bytearray())
        return answer, answer.headers.get("connection") == "close" and await closed(stream)


async def still_serving(net: NetDriver) -> None:
    await net.put("alive", b"yes")
    assert await net.get("alive") == b"yes"


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\n"
        b"GET /default/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
)
async def test_transfer_encoding_with_content_length_is_400_and_closes(
    net: NetDriver, framing: bytes
) -> None:
    answer, was_closed = await one_request(
        net, b"PUT /default/smug HTTP/1.1\r\nHost: x\r\n" + framing
    )
    assert answer.status == 400
    assert answer.error()["code"] == "invalid_request"
    assert "Transfer-Encoding" in answer.error()["message"]
    assert was_closed  # the smuggled request after it is never read
    with pytest.raises(NotFound):
        await net.stat("smug")
    await still_serving(net)


@pytest.mark.parametrize("name", ["bad%zz", "bad%", "bad%2", "%ff", "%fe", "%80", "a%C3", "%C0%AF"])
async def test_invalid_escapes_and_utf8_in_names_are_400(net: NetDriver, name: str) -> None:
    for method in ("PUT", "GET"):
        request = f"{method} /default/{name} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
        answer, _ = await one_request(net, request.encode())
        assert answer.status == 400, (method, name)
        assert answer.error()["code"] == "invalid_name"
    assert await net._http.get(f"{net._gateway}/v1/namespaces/default/files") is not None
    await still_serving(net)


async def test_names_do_not_alias(net: NetDriver) -> None:
    for raw, content in [("%EF%BF%BD", b"fffd"), ("bad%25zz", b"percent")]:
        request = (
            f"PUT /default/{raw} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(content)}\r\n\r\n"
        )
        answer, _ = await one_request(net, request.encode() + content)
        assert answer.status == 201, answer.body
    for raw, content in [("%EF%BF%BD", b"fffd"), ("bad%25zz", b"percent")]:
        answer, _ = await one_request(
            net, f"GET /default/{raw} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        assert (answer.status, answer.body) == (200, content)
    assert await net.get("\ufffd") == b"fffd"
    assert (await net.stat("bad%zz")).size == len(b"percent")


async def test_an_absolute_form_target_is_served_as_its_path(net: NetDriver) -> None:
    put = b"PUT http://gw.example:8080/default/abs HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n"
    put += b"abc"
    answer, _ = await one_request(net, put)
    assert answer.status == 201, answer.body
    get = b"GET http://gw.example/default/abs HTTP/1.1\r\nHost: x\r\n\r\n"
    answer, _ = await one_request(net, get)
    assert (answer.status, answer.body) == (200, b"abc")
    assert await net.get("abs") == b"abc"
    # Its query is the query, as in origin form: a file's routes take none.
    get = b"GET http://gw.example/default/abs?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"
    answer, _ = await one_request(net, get)
    assert answer.status == 400
    assert answer.error()["code"] == "invalid_request"


async def test_options_star_names_what_the_server_allows(net: NetDriver) -> None:
    # It asks about the server as a whole (RFC 9110 §9.3.7); it was a 308 to "/*/".
    answer, _ = await one_request(net, b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.status == 204
    assert answer.headers["allow"] == "DELETE, GET, HEAD, OPTIONS, PUT"
    assert "location" not in answer.headers


@pytest.mark.parametrize(
    ("path", "allow"), [("/default/", "GET, HEAD, OPTIONS"), ("/healthz", "GET, HEAD, OPTIONS")]
)
async def test_options_on_a_listing_or_control_route_is_204_with_allow(
    net: NetDriver, path: str, allow: str
) -> None:
    # Quart's own answer was a 200 of empty HTML; now as on a file's route, no body.
    answer, _ = await one_request(net, f"OPTIONS {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert answer.status == 204
    assert answer.headers["allow"] == allow
    assert "content-type" not in answer.headers
    assert "content-length" not in answer.headers


async def test_an_upgrade_to_websocket_is_a_clear_400(net: NetDriver) -> None:
    # It was a 404 "no such route" for a file that exists.
    await net.put("ws", b"abc")
    upgrade = (
        b"GET /default/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    answer, _ = await one_request(net, upgrade)
    assert answer.status == 400
    assert answer.error()["code"] == "invalid_request"
    assert "WebSocket" in answer.error()["message"]
    assert answer.headers["x-request-id"] == answer.error()["request_id"]
    await still_serving(net)


@pytest.mark.parametrize(
    ("path", "length", "status"),
    [
        ("/no-such-ns/f", 3, 404),
        ("/Bad%20NS/f", 3, 400),
        ("/default/a/../b", 3, 400),
        ("/default/big", LIMIT + 1, 413),
    ],
)
async def test_100_continue_only_after_the_checks(
    net: NetDriver, path: str, length: int, status: int
) -> None:
    request = f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n" + EXPECT
    async with await connect(net) as stream:
        await stream.send_all(request.encode())
        answer = await read_answer(stream, bytearray())
        assert answer.status == status  # and no "100 Continue" before it
        assert answer.error()["request_id"]
        assert answer.headers.get("connection") == "close"
        assert await closed(stream)
    await still_serving(net)


async def test_100_continue_then_the_upload(net: NetDriver) -> None:
    request = b"PUT /default/cont HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n" + EXPECT.encode()
    async with await connect(net) as stream:
        await stream.send_all(request)
        buffer = bytearray()
        assert (await read_answer(stream, buffer)).status == 100
        await stream.send_all(b"abc")
        assert (await read_answer(stream, buffer)).status == 201
    assert await net.get("cont") == b"abc"


async def test_a_failed_upload_answers_at_once_and_closes(net: NetDriver) -> None:
    # A chunked body that passes the size limit: the upload fails then, and the answer comes
    # while the client has not ended its body (it never does here).
    async with await connect(net) as stream:
        chunk = b"x" * (LIMIT // 4)
        await stream.send_all(
            b"PUT /default/toolong HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        buffer = bytearray()
        async with trio.open_nursery() as nursery:

            async def send_until_refused() -> None:
                try:
                    for _ in range(5):
                        await stream.send_all(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

            nursery.start_soon(send_until_refused)
            answer = await read_answer(stream, buffer)
        assert answer.status == 413
        assert answer.headers.get("connection") == "close"
        assert await closed(stream)
    with pytest.raises(NotFound):
        await net.stat("toolong")
    await still_serving(net)
