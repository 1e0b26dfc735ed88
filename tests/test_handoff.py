"""Write connections handed from a gateway worker to its parent (karma8/net/handoff.py, and
patch 10 of karma8/net/http_fixes.py), in one process: two Hypercorn servers, each serving an
app that answers with its own name, one as the worker (``hand_off_to``) and one as the parent
(``adopt_from``), joined by the parent's Unix socket. Clients connect to the worker's port."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope

from karma8.net.handoff import (
    HEAD_MAX,
    MESSAGE,
    classify,
    declared_length,
    first_request_kind,
    handoff_socket,
    remove_orphaned,
)
from karma8.net.netconfig import HEADER_TIMEOUT
from karma8.net.serving import serve_app

GIVE_UP = 30  # seconds; a guard against a hang on a real socket


def named(name: bytes) -> ASGIFramework:
    """An ASGI app that reads each request's body and answers with ``name`` (in a header
    too, for HEAD)."""

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-length", str(len(name)).encode()), (b"x-served-by", name)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": name, "more_body": False})

    return app


class Pair:
    def __init__(self, nursery: trio.Nursery, path: str, worker_url: str) -> None:
        self.nursery = nursery
        self.path = path
        host, port = worker_url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream(self.host, self.port)


@asynccontextmanager
async def worker_and_parent(
    *, parent: bool = True, parent_connections: int = 64, keep_small_writes: int | None = None
) -> AsyncIterator[Pair]:
    """A worker handing off to a parent (or to a socket nobody listens on: ``parent=False``),
    but the writes of at most ``keep_small_writes`` bytes."""
    with handoff_socket() as path:
        assert path is not None
        async with trio.open_nursery() as nursery:
            if parent:
                await nursery.start(
                    partial(
                        serve_app,
                        named(b"parent"),
                        host="127.0.0.1",
                        port=0,
                        adopt_from=path,
                        max_connections=parent_connections,
                    )
                )
            worker_url = await nursery.start(
                partial(
                    serve_app,
                    named(b"worker"),
                    host="127.0.0.1",
                    port=0,
                    hand_off_to=path,
                    keep_small_writes=keep_small_writes,
                )
            )
            yield Pair(nursery, path, worker_url)
            nursery.cancel_scope.cancel()


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    received = b""
    try:
        while chunk := await stream.receive_some(65536):
            received += chunk
    except trio.BrokenResourceError:  # reset: closed with bytes unread
        pass
    return received


async def one_request(pair: Pair, head: bytes) -> bytes:
    """``head`` (ending the headers) on a new connection, asking it to close; the answer."""
    async with await pair.connect() as stream:
        await stream.send_all(head)
        with trio.fail_after(GIVE_UP):
            return await read_until_closed(stream)


def request(method: str, path: str = "/ns/f", body: bytes = b"", *, close: bool = True) -> bytes:
    connection = "Connection: close\r\n" if close else ""
    return (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{connection}\r\n"
    ).encode() + body


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"GET / HTTP/1.1", "read"),
        (b"HEAD /", "read"),
        (b"PUT /x", "write"),
        (b"POST /x", "write"),
        (b"DELETE /", "write"),
        (b"OPTIONS", None),  # a space could still follow
        (b"OPTIONS ", "write"),
        (b"PU", None),
        (b"G", None),
        (b"", None),
        (b"OPTIONSX", "other"),
        (b"put /x", "other"),
        (b"\x16\x03\x01", "other"),
        (b"\r\nPUT", "other"),
        (b" PUT", "other"),
        (b"PRI * HTTP/2.0", "write"),
    ],
)
def test_the_first_bytes_name_the_first_requests_kind(head: bytes, kind: str | None) -> None:
    assert classify(head) == kind


HEAD = b"PUT /ns/f HTTP/1.1\r\nHost: x\r\n"


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (HEAD + b"Content-Length: 100\r\n\r\n", "small_write"),
        (HEAD + b"content-length:  100 \r\n\r\nbody", "small_write"),
        (HEAD + b"Content-Length: 0\r\n\r\n", "small_write"),
        (HEAD + b"Content-Length: 101\r\n\r\n", "write"),
        (HEAD + b"\r\n", "write"),  # no length: a chunked or empty body, the parent's
        (HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", "write"),
        (HEAD + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\n", "write"),
        (HEAD + b"Content-Length: -5\r\n\r\n", "write"),
        (HEAD + b"Content-Length: 5x\r\n\r\n", "write"),
        (HEAD + b"Content-Length: 99999999999999999999\r\n\r\n", "write"),
        (HEAD + b"no colon here\r\nContent-Length: 5\r\n\r\n", "write"),
        (HEAD + b"Content-Length: 100\r\n", None),  # the head has not ended yet
        (b"PUT /ns/f HTTP/1.1\nHost: x\nContent-Length: 2\n\nab", "small_write"),  # bare LF
        (b"PUT /ns/f HTTP/1.1\r\nContent-Length: 2\n\r\n", "small_write"),
        (b"DELETE /ns/f HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "write"),  # PUTs only
        (b"POST /ns/f HTTP/1.1\r\nContent-Length: 5\r\n\r\n", "write"),
        (HEAD + b"X: " + b"y" * HEAD_MAX + b"\r\n", "write"),  # too long a head to wait for
        (b"GET /ns/f HTTP/1.1\r\n", "read"),
        (b"PUT ", None),
    ],
)
def test_a_write_declaring_a_small_body_is_a_small_write(head: bytes, kind: str | None) -> None:
    assert classify(head, small_max=100) == kind


def test_the_declared_length_is_the_one_content_length_of_the_head() -> None:
    assert declared_length(HEAD.rstrip(b"\r\n") + b"\r\nContent-Length: 7") == 7
    assert declared_length(HEAD.rstrip(b"\r\n")) is None


async def test_a_worker_keeping_small_writes_hands_over_only_the_large_ones() -> None:
    async with worker_and_parent(keep_small_writes=10) as pair:
        small = await one_request(pair, request("PUT", body=b"x" * 10))
        large = await one_request(pair, request("PUT", body=b"x" * 11))
        read = await one_request(pair, request("GET"))
    assert small.endswith(b"worker")
    assert large.endswith(b"parent")
    assert read.endswith(b"worker")


async def test_a_put_whose_head_stalls_is_closed_at_the_header_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Its length never comes: closed as Hypercorn closes a head not whole in time, not handed
    # to the parent, which would grant it a header timeout of its own.
    async with worker_and_parent(keep_small_writes=10) as pair, await pair.connect() as stream:
        start = trio.current_time()
        await stream.send_all(b"PUT /ns/f HTTP/1.1\r\nHost: x\r\n")
        answer = await read_until_closed(stream)
        waited = trio.current_time() - start
    assert answer == b""
    assert HEADER_TIMEOUT <= waited < 2 * HEADER_TIMEOUT


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE"])
async def test_a_write_is_answered_by_the_parent(method: str) -> None:
    async with worker_and_parent() as pair:
        answer = await one_request(pair, request(method, body=b"x" * 1000))
    assert answer.startswith(b"HTTP/1.1 200")
    assert answer.endswith(b"parent")


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_read_is_answered_by_the_worker(method: str) -> None:
    async with worker_and_parent() as pair:
        answer = await one_request(pair, request(method))
    assert answer.startswith(b"HTTP/1.1 200")
    assert b"x-served-by: worker" in answer


async def test_many_writes_on_new_connections_all_reach_the_parent() -> None:
    async with worker_and_parent() as pair:
        answers = [await one_request(pair, request("PUT", body=b"y" * i)) for i in range(50)]
    assert all(a.startswith(b"HTTP/1.1 200") and a.endswith(b"parent") for a in answers)


async def test_a_kept_alive_connection_that_starts_with_a_read_stays_with_the_worker() -> None:
    async with worker_and_parent() as pair, await pair.connect() as stream:
        await stream.send_all(request("GET", close=False))
        first = b""
        while not first.endswith(b"worker"):
            first += await stream.receive_some(65536)
        await stream.send_all(request("PUT", body=b"z" * 100))
        with trio.fail_after(GIVE_UP):
            second = await read_until_closed(stream)
    assert first.startswith(b"HTTP/1.1 200")
    assert second.startswith(b"HTTP/1.1 200")
    assert second.endswith(b"worker")


async def test_a_write_whose_method_arrives_byte_by_byte_still_reaches_the_parent() -> None:
    async with worker_and_parent() as pair, await pair.connect() as stream:
        whole = request("DELETE")
        for i in range(4):  # "D", "E", "L", "E": the worker waits for each next byte
            await stream.send_all(whole[i : i + 1])
            await trio.testing.wait_all_tasks_blocked()
        await stream.send_all(whole[4:])
        with trio.fail_after(GIVE_UP):
            answer = await read_until_closed(stream)
    assert answer.startswith(b"HTTP/1.1 200")
    assert answer.endswith(b"parent")


async def test_with_no_parent_the_worker_serves_writes_itself() -> None:
    async with worker_and_parent(parent=False) as pair:
        answer = await one_request(pair, request("PUT", body=b"x"))
    assert answer.startswith(b"HTTP/1.1 200")
    assert answer.endswith(b"worker")


async def test_a_parent_that_goes_away_leaves_writes_with_the_worker() -> None:
    with handoff_socket() as path:
        assert path is not None
        async with trio.open_nursery() as nursery:
            parent = trio.CancelScope()
            serve = partial(serve_app, named(b"parent"), host="127.0.0.1", port=0)
            await nursery.start(_in_scope, parent, partial(serve, adopt_from=path))
            worker_url = await nursery.start(
                partial(serve_app, named(b"worker"), host="127.0.0.1", port=0, hand_off_to=path)
            )
            pair = Pair(nursery, path, worker_url)
            before = await one_request(pair, request("PUT", body=b"x"))
            parent.cancel()
            await trio.testing.wait_all_tasks_blocked()  # the parent has closed its sockets
            after = await one_request(pair, request("PUT", body=b"x"))
            nursery.cancel_scope.cancel()
    assert before.endswith(b"parent")  # the worker had a connection to the parent
    assert after.startswith(b"HTTP/1.1 200")
    assert after.endswith(b"worker")


async def _in_scope(
    scope: trio.CancelScope, serve: partial[Any], *, task_status: trio.TaskStatus[None]
) -> None:
    with scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve)
            task_status.started()


@pytest.mark.parametrize(
    "garbage", [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"hello there\r\n\r\n"]
)
async def test_garbage_stays_with_the_worker_and_gets_its_400(garbage: bytes) -> None:
    async with worker_and_parent() as pair:
        answer = await one_request(pair, garbage)
    assert answer.startswith(b"HTTP/1.1 400")


async def test_a_connection_that_stalls_in_its_method_is_closed_at_the_header_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with worker_and_parent() as pair, await pair.connect() as stream:
        start = trio.current_time()
        await stream.send_all(b"PU")
        answer = await read_until_closed(stream)
        waited = trio.current_time() - start  # virtual time: the clock jumps when all wait
    assert answer == b""  # closed without an answer, as Hypercorn's header timeout closes
    assert HEADER_TIMEOUT <= waited < 2 * HEADER_TIMEOUT


async def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with worker_and_parent() as pair, await pair.connect() as stream:
        start = trio.current_time()
        answer = await read_until_closed(stream)
        waited = trio.current_time() - start
    assert answer == b""
    assert HEADER_TIMEOUT <= waited < 2 * HEADER_TIMEOUT


async def test_an_adopted_connection_counts_against_the_parents_cap() -> None:
    # The parent's one slot is held by a handed-over write whose body never ends.
    async with worker_and_parent(parent_connections=1) as pair, await pair.connect() as held:
        await held.send_all(b"PUT /ns/f HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        await trio.testing.wait_all_tasks_blocked()
        refused = await one_request(pair, request("PUT", body=b"x"))
    assert refused.startswith(b"HTTP/1.1 503")
    assert b"max_connections" in refused


async def send_to_parent(path: str, data: bytes, fds: list[int]) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        socket.send_fds(sock, [data], fds)


async def test_the_parent_drops_and_closes_anything_but_one_tcp_connection() -> None:
    async with worker_and_parent() as pair:
        strays: list[tuple[bytes, list[int]]] = []
        reads: list[int] = []
        for data, count in [(MESSAGE, 2), (b"X", 1), (MESSAGE, 1)]:
            fds = []
            for _ in range(count):
                read, write = os.pipe()  # not a socket; once the parent closes it, EOF
                reads.append(read)
                fds.append(write)
            strays.append((data, fds))
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        for data, fds in strays:
            await send_to_parent(pair.path, data, fds)
            for fd in fds:
                os.close(fd)
        await send_to_parent(pair.path, MESSAGE, [udp.fileno()])
        await send_to_parent(pair.path, MESSAGE, [listening.fileno()])
        await send_to_parent(pair.path, MESSAGE + MESSAGE, [])
        for read in reads:  # each write end's last copy was the parent's: closed
            assert await trio.to_thread.run_sync(os.read, read, 1) == b""
            os.close(read)
        udp.close()
        listening.close()
        # And the parent still takes writes.
        answer = await one_request(pair, request("PUT", body=b"x"))
    assert answer.endswith(b"parent")


def test_the_parents_socket_lives_in_a_private_directory_removed_at_exit() -> None:
    with handoff_socket() as path:
        assert path is not None
        directory = os.path.dirname(path)
        assert os.stat(directory).st_mode & 0o777 == 0o700
    assert not os.path.exists(directory)
    with handoff_socket(enabled=False) as none:  # one gateway process: no socket at all
        assert none is None


async def test_a_method_cut_off_by_the_peers_end_of_stream_is_not_a_request() -> None:
    """Half a method, then the peer shuts its side: the socket stays readable with no new
    byte, which must end the peek rather than spin on it."""
    a, b = trio.socket.socketpair()
    with a, b:
        await a.send(b"PU")
        a.shutdown(socket.SHUT_WR)
        with trio.fail_after(GIVE_UP):  # a guard: the bug spun here until the header timeout
            assert await first_request_kind(b) == "other"


async def test_a_gateway_that_does_not_listen_holds_the_port_for_the_others() -> None:
    # The embedded cluster's parent: it binds the port (SO_REUSEPORT) and never listens, so
    # every connection goes to the processes that do; the port stays its until cancelled.
    returned: list[bool] = []

    async def parent(*, task_status: trio.TaskStatus[str]) -> None:
        await serve_app(
            named(b"parent"), host="127.0.0.1", port=0, listen=False, task_status=task_status
        )
        returned.append(True)

    async with trio.open_nursery() as nursery:
        url = await nursery.start(parent)
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(OSError, match="connect"):  # nobody listens yet: refused
            await trio.open_tcp_stream("127.0.0.1", port)
        await nursery.start(
            partial(serve_app, named(b"worker"), host="127.0.0.1", port=port, reuse_port=True)
        )
        for _ in range(4):
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(request("GET"))
                with trio.fail_after(GIVE_UP):
                    assert (await read_until_closed(stream)).endswith(b"worker")
        with socket.socket() as other, pytest.raises(OSError, match="in use"):
            other.bind(("127.0.0.1", port))  # without SO_REUSEPORT: taken
        assert returned == []  # it holds the port until cancelled
        nursery.cancel_scope.cancel()


def test_a_worker_removes_only_the_sockets_and_directory_its_killed_parent_left(
    tmp_path: Path,
) -> None:
    left = tmp_path / "karma8-handoff-abc"
    other = tmp_path / "elsewhere"
    for directory in (left, other):
        directory.mkdir()
        for name in ("handoff.sock", "writes.sock"):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.bind(str(directory / name))
    (other / "a-file").write_text("not a socket")
    remove_orphaned([str(left / "handoff.sock"), str(left / "writes.sock")])
    remove_orphaned([str(other / "handoff.sock"), str(other / "a-file")])
    assert not left.exists()
    assert sorted(p.name for p in other.iterdir()) == ["a-file", "writes.sock"]  # kept
