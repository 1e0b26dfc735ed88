"""Each patch of :mod:`karma8.net.http_fixes`, by a test that fails without it.

The fixes a client sees (a closed connection closed at once, HTTP/2 not spoken) are tested
on a real socket, against Hypercorn serving a plain ASGI app as the data-plane routes are
served (:func:`karma8.net.serving.serve_app`).
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import AsyncIterator
from functools import partial
from types import SimpleNamespace
from typing import Any

import h11
import httpcore
import pytest
import trio
import trio.testing
from h11._receivebuffer import ReceiveBuffer
from hypercorn.events import Event, RawData
from hypercorn.trio import tcp_server
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from hypothesis import given
from hypothesis import strategies as st
from quart_trio import QuartTrio

from karma8.net import http_fixes
from karma8.net.exchange import Exchange, ExchangeRoutes
from karma8.net.http_fixes import (
    RECEIVE_SIZE,
    PassThroughReceiveBuffer,
    check_versions,
    patch_httpcore,
    patch_hypercorn,
)
from karma8.net.netconfig import HEADER_TIMEOUT
from karma8.net.serving import serve_app


def requests(bodies: list[bytes], chunked: list[bool]) -> bytes:
    """Pipelined PUTs, each with a Content-Length body or a chunked one."""
    out = b""
    for i, (body, is_chunked) in enumerate(zip(bodies, chunked, strict=True)):
        if is_chunked:
            framed = (f"{len(body):x}\r\n".encode() + body + b"\r\n") if body else b""
            out += (
                f"PUT /ns/f{i} HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                + framed
                + b"0\r\n\r\n"
            )
        else:
            out += (
                f"PUT /ns/f{i} HTTP/1.1\r\nHost: h\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            )
            out += body
    return out


def parse(stream: bytes, cuts: list[int], buffer: type[ReceiveBuffer]) -> list[Any]:
    """Feed ``stream`` cut at ``cuts`` to a server connection; the events, bodies joined."""
    conn = h11.Connection(h11.SERVER)
    conn._receive_buffer = buffer()
    events: list[Any] = []
    body = b""
    bounds = [0, *sorted(set(cuts)), len(stream)]
    pieces = [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    for piece in [*pieces, b""]:
        conn.receive_data(piece)
        while True:
            event = conn.next_event()
            if event in (h11.NEED_DATA, h11.PAUSED) or isinstance(event, h11.ConnectionClosed):
                break
            if isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                events.append(("body", body))
                body = b""
                conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
                conn.send(h11.EndOfMessage())
                conn.start_next_cycle()
            else:
                events.append((type(event).__name__, getattr(event, "target", None)))
        if event is h11.PAUSED:
            break
    return events


@given(
    bodies=st.lists(st.binary(max_size=300), min_size=1, max_size=4),
    chunked=st.lists(st.booleans(), min_size=4, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
)
def test_same_events_as_h11s_own_buffer(
    bodies: list[bytes], chunked: list[bool], cuts: list[int]
) -> None:
    stream = requests(bodies, chunked[: len(bodies)])
    cuts = [c % (len(stream) + 1) for c in cuts]
    expected = parse(stream, cuts, ReceiveBuffer)
    assert parse(stream, cuts, PassThroughReceiveBuffer) == expected
    assert [e for e in expected if e[0] == "body"] == [("body", b) for b in bodies]


def test_a_whole_body_chunk_passes_through_uncopied() -> None:
    buf = PassThroughReceiveBuffer()
    chunk = b"x" * 100_000
    buf += chunk
    assert len(buf) == 100_000
    out: object = buf.maybe_extract_at_most(1 << 20)
    assert out is chunk
    assert not buf


def test_a_chunk_split_between_a_body_and_the_next_request_takes_the_stock_path() -> None:
    buf = PassThroughReceiveBuffer()
    buf += b"tail-of-body" + b"GET / HTTP/1.1\r\n\r\n"
    head = buf.maybe_extract_at_most(12)
    assert head is not None
    assert bytes(head) == b"tail-of-body"
    lines = buf.maybe_extract_lines()
    assert lines is not None
    assert [bytes(line) for line in lines] == [b"GET / HTTP/1.1"]


def test_every_h11_connection_gets_the_pass_through_buffer() -> None:
    patch_httpcore()
    assert isinstance(h11.Connection(h11.CLIENT)._receive_buffer, PassThroughReceiveBuffer)


def test_hypercorn_and_httpcore_read_receive_size_at_a_time() -> None:
    patch_hypercorn()
    patch_httpcore()
    assert tcp_server.MAX_RECV == RECEIVE_SIZE
    assert httpcore.AsyncHTTP11Connection.READ_NUM_BYTES == RECEIVE_SIZE


def test_another_version_of_a_patched_package_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http_fixes, "version", lambda name: "0.0.1")
    with pytest.raises(RuntimeError, match="installed"):
        check_versions()


def socket_stream() -> tuple[trio.SocketStream, trio.socket.SocketType]:
    ours, peer = trio.socket.socketpair()
    return trio.SocketStream(ours), peer


async def test_a_cancelled_close_still_closes_the_socket() -> None:
    # Stock Hypercorn checkpoints in send_eof first: cancelled there, it never closes.
    patch_hypercorn()
    stream, peer = socket_stream()
    with peer, trio.CancelScope() as scope:
        scope.cancel()
        server: Any = SimpleNamespace(stream=stream)  # what _close uses of a TCPServer
        await tcp_server.TCPServer._close(server)
    assert stream.socket.fileno() == -1


async def test_a_send_to_a_client_that_stops_reading_can_be_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Stock Hypercorn shields send_all: the send ends only when the peer goes away.
    patch_hypercorn()
    stream, peer = socket_stream()
    events: list[Event] = []

    async def handle(event: Event) -> None:
        events.append(event)

    server: Any = SimpleNamespace(  # what protocol_send uses of a TCPServer
        stream=stream, send_lock=trio.Lock(), protocol=SimpleNamespace(handle=handle)
    )

    peer_left = False

    async def peer_leaves_eventually() -> None:
        nonlocal peer_left
        await trio.sleep(3600)  # virtual: only a send that ignores its cancellation waits
        peer_left = True
        peer.close()

    with peer:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer_leaves_eventually)
            # 16 MiB fill the socket buffers, so the send blocks; then it is cancelled.
            with trio.move_on_after(1) as scope:
                await tcp_server.TCPServer.protocol_send(server, RawData(b"x" * (16 << 20)))
            assert scope.cancelled_caught
            assert not peer_left  # it ended while the client was still connected
            nursery.cancel_scope.cancel()
    assert stream.socket.fileno() == -1


HELLO = b"hello"
GIVE_UP = 30  # seconds; a guard against a hang on a real socket


async def hello(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """A plain ASGI app (as the data-plane routes are): ``hello`` to every request. It is not
    cancelled when its client goes away, as Quart-Trio's handlers are."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    headers = [(b"content-length", str(len(HELLO)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": HELLO, "more_body": False})


async def served(nursery: trio.Nursery) -> trio.SocketStream:
    """A connection to :func:`hello`, served by Hypercorn in ``nursery``."""
    url: str = await nursery.start(partial(serve_app, hello, host="127.0.0.1", port=0))
    host, port = url.removeprefix("http://").split(":")
    return await trio.open_tcp_stream(host, int(port))


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    received = b""
    while chunk := await stream.receive_some(65536):
        received += chunk
    return received


async def test_a_connection_the_client_closes_is_closed_at_once() -> None:
    # Hypercorn's keep-alive timer (75 s) used to hold it open, in CLOSE-WAIT.
    async with trio.open_nursery() as nursery:
        async with await served(nursery) as stream:
            await stream.send_all(b"GET /f HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(HELLO):
                answer += await stream.receive_some(65536)
            # The server runs in this trio run: once every task waits, it has recycled the
            # connection and started its keep-alive timer (an EOF that arrives before that
            # ends the connection through another path, and the test would guard nothing).
            await trio.testing.wait_all_tasks_blocked()
            await stream.send_eof()
            with trio.fail_after(HEADER_TIMEOUT / 2):  # closed by the EOF, not the timer
                rest = await read_until_closed(stream)
        nursery.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 200")
    assert rest == b""


async def test_http2_is_not_spoken() -> None:
    async with trio.open_nursery() as nursery:
        async with await served(nursery) as stream:
            await stream.send_all(
                b"GET /f HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
            )
            await stream.send_eof()
            with trio.fail_after(GIVE_UP):
                upgrade = await read_until_closed(stream)
        assert upgrade.startswith(b"HTTP/1.1 200")  # the upgrade is ignored
        assert upgrade.endswith(HELLO)
        # A prior-knowledge HTTP/2 client, with a DATA frame for a stream (HTTP/2 used to
        # crash the process on such a frame after an early answer): refused, and the server
        # lives on.
        async with await served(nursery) as stream:
            await stream.send_all(
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # SETTINGS
                + b"\x00\x00\x05\x00\x00\x00\x00\x00\x01hello"  # DATA on stream 1
            )
            with trio.fail_after(GIVE_UP):
                refused = await read_until_closed(stream)
        assert not refused.startswith(b"\x00")  # no HTTP/2 frame came back
        nursery.cancel_scope.cancel()


async def reject_or_read(
    scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
) -> None:
    """``/reject``: 400 on the headers alone; any other path reads the body, then ``hello``."""
    if scope["type"] != "http":
        await hello(scope, receive, send)
        return
    if scope["path"] != "/reject":
        while (await receive()).get("more_body"):
            pass
    status = 400 if scope["path"] == "/reject" else 200
    headers = [(b"content-length", str(len(HELLO)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": HELLO, "more_body": False})


async def read_head(stream: trio.SocketStream) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await stream.receive_some(65536)
        assert chunk, head
        head += chunk
    return head


async def test_100_continue_waits_for_the_app_to_ask_for_the_body() -> None:
    # Stock Hypercorn sends "100 Continue" as soon as the headers are in: the client then
    # sends its body even though the app rejects the request on its headers.
    expect = b"Host: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    async with trio.open_nursery() as nursery:
        url: str = await nursery.start(partial(serve_app, reject_or_read, host="127.0.0.1", port=0))
        host, port = url.removeprefix("http://").split(":")
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            await stream.send_all(b"PUT /reject HTTP/1.1\r\n" + expect)
            with trio.fail_after(GIVE_UP):
                head = await read_head(stream)
            assert head.startswith(b"HTTP/1.1 400"), head  # no 100 before it
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            await stream.send_all(b"PUT /accept HTTP/1.1\r\n" + expect)
            with trio.fail_after(GIVE_UP):
                head = await read_head(stream)
                assert head.startswith(b"HTTP/1.1 100 "), head
                await stream.send_all(b"12345")
                answer = head.partition(b"\r\n\r\n")[2] or await read_head(stream)
            assert answer.startswith(b"HTTP/1.1 200"), answer
        nursery.cancel_scope.cancel()


GO_ON: list[trio.Event] = []  # the closing answer's body waits for the last one


async def closing_answer(
    scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
) -> None:
    """``hello`` with ``Connection: close``, before the request body was read; the head and
    the first byte go out at once, the rest once the test sets ``GO_ON[-1]``."""
    if scope["type"] != "http":
        await hello(scope, receive, send)
        return
    headers = [(b"content-length", str(len(HELLO)).encode()), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 400, "headers": headers})
    await send({"type": "http.response.body", "body": HELLO[:1], "more_body": True})
    await GO_ON[-1].wait()
    await send({"type": "http.response.body", "body": HELLO[1:], "more_body": False})


async def test_bytes_after_a_closing_answer_do_not_cut_it_short() -> None:
    # Stock Hypercorn: a request after the one answered with "Connection: close" is a
    # protocol error to h11, and Hypercorn's reader closes the connection mid-answer.
    GO_ON.append(trio.Event())
    async with trio.open_nursery() as nursery:
        url: str = await nursery.start(partial(serve_app, closing_answer, host="127.0.0.1", port=0))
        host, port = url.removeprefix("http://").split(":")
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            await stream.send_all(
                b"PUT /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            with trio.fail_after(GIVE_UP):
                head = await read_head(stream)
                await stream.send_all(b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
                await trio.testing.wait_all_tasks_blocked()  # the server has read them
                GO_ON[-1].set()
                answer = head + await read_until_closed(stream)
        nursery.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 400")
    assert answer.endswith(HELLO)  # whole, and nothing for the second request


async def test_a_small_answer_goes_out_in_one_send(monkeypatch: pytest.MonkeyPatch) -> None:
    # Stock Hypercorn sends the head, the body and the (empty) end of the body apart.
    sent: list[bytes] = []
    send_all = trio.SocketStream.send_all
    client: list[trio.SocketStream] = []

    async def recording(self: trio.SocketStream, data: Any) -> None:
        if self not in client:  # the server's side of the connection
            sent.append(bytes(data))
        await send_all(self, data)

    monkeypatch.setattr(trio.SocketStream, "send_all", recording)
    async with trio.open_nursery() as nursery:
        async with await served(nursery) as stream:
            client.append(stream)
            for method in (b"GET", b"HEAD"):
                sent.clear()
                await stream.send_all(method + b" /f HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = b""
                with trio.fail_after(GIVE_UP):
                    while b"\r\n\r\n" not in answer or (
                        method == b"GET" and not answer.endswith(HELLO)
                    ):
                        answer += await stream.receive_some(65536)
                await trio.testing.wait_all_tasks_blocked()
                assert answer.startswith(b"HTTP/1.1 200")
                assert [data for data in sent if data] == [answer], method
        nursery.cancel_scope.cancel()


async def test_connections_beyond_the_cap_get_503_and_are_closed() -> None:
    # Stock Hypercorn serves every connection it can accept: no 503, the third is served.
    async with trio.open_nursery() as nursery:
        url: str = await nursery.start(
            partial(serve_app, hello, host="127.0.0.1", port=0, max_connections=2)
        )
        host, port = url.removeprefix("http://").split(":")
        held = [await trio.open_tcp_stream(host, int(port)) for _ in range(2)]
        # Both are being served once every task waits (each has a TCPServer reading it).
        await trio.testing.wait_all_tasks_blocked()
        async with await trio.open_tcp_stream(host, int(port)) as third:
            await third.send_all(b"GET /f HTTP/1.1\r\nHost: x\r\n\r\n")
            with trio.fail_after(GIVE_UP):
                refused = await read_until_closed(third)
        head, _, body = refused.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503")
        assert b"retry-after: 1" in head
        assert b"connection: close" in head
        assert b"max_connections" in body
        # Written as every other answer is: compact JSON, no reason phrase (h11 writes none).
        assert head.startswith(b"HTTP/1.1 503 \r\n")
        assert body.startswith(b'{"error":{"code":"unavailable","message":')
        assert body.endswith(b"}}\n")
        # One held connection closes: the next one is served again.
        await held.pop().aclose()
        await trio.testing.wait_all_tasks_blocked()
        async with await trio.open_tcp_stream(host, int(port)) as fourth:
            await fourth.send_all(b"GET /f HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            with trio.fail_after(GIVE_UP):
                served_again = await read_until_closed(fourth)
        assert served_again.startswith(b"HTTP/1.1 200")
        for stream in held:
            await stream.aclose()
        nursery.cancel_scope.cancel()


class Streamed(ExchangeRoutes[str]):
    """Every GET answered with a body streamed in pieces (as a large file is)."""

    PIECES = [bytes([i]) * 65536 for i in range(4)]

    def __init__(self) -> None:
        super().__init__(hello, {"GET": self._get}, log=logging.getLogger("test"))

    def match(self, path: str) -> str | None:
        return path

    async def _get(self, exchange: Exchange, _: str) -> None:
        length = sum(map(len, self.PIECES))
        await exchange.start(200, [(b"content-length", str(length).encode())])

        async def pieces() -> AsyncIterator[bytes]:
            for piece in self.PIECES:
                yield piece

        await exchange.stream(pieces())


@pytest.mark.parametrize("head", [b"HTTP/1.1\r\nConnection: close", b"HTTP/1.0"])
async def test_a_streamed_answer_to_a_closing_request_ends_with_the_connection(
    head: bytes,
) -> None:
    # The end of the body used to be sent inside the watch on the client's disconnect, which
    # the end itself triggers: about half the time that cancelled Hypercorn's close, and a
    # client reading to the end of the connection waited for ever (found by a user's test).
    async with trio.open_nursery() as nursery:
        url: str = await nursery.start(partial(serve_app, Streamed(), host="127.0.0.1", port=0))
        host, port = url.removeprefix("http://").split(":")
        for _ in range(20):  # each time a fair coin decided it
            async with await trio.open_tcp_stream(host, int(port)) as stream:
                await stream.send_all(b"GET /f " + head + b"\r\nHost: x\r\n\r\n")
                with trio.fail_after(GIVE_UP):
                    answer = await read_until_closed(stream)
            assert answer.endswith(b"".join(Streamed.PIECES))
        nursery.cancel_scope.cancel()


async def test_a_method_not_in_upper_case_is_501_before_any_app_sees_it() -> None:
    # Methods are case-sensitive (RFC 9110 §9.1): Hypercorn upper-cased them, so "put" was
    # routed as PUT and stored a file (and Quart's routes took "options" for a write).
    seen: list[str] = []

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "http":
            seen.append(scope["method"])
        await reject_or_read(scope, receive, send)

    answers = []
    async with trio.open_nursery() as nursery:
        url: str = await nursery.start(partial(serve_app, app, host="127.0.0.1", port=0))
        host, port = url.removeprefix("http://").split(":")
        for method in (b"put", b"PUT", b"Get", b"options", b"head"):
            async with await trio.open_tcp_stream(host, int(port)) as stream:
                # A body, unread by the answer: the connection still closes at once.
                await stream.send_all(
                    method + b" /f HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                    b"Connection: close\r\n\r\nab"
                )
                with trio.fail_after(GIVE_UP):
                    answers.append(await read_until_closed(stream))
        nursery.cancel_scope.cancel()
    assert seen == ["PUT"]  # the others never reached the app
    assert [a.split(b" ")[1] for a in answers] == [b"501", b"200", b"501", b"501", b"501"]
    assert b"connection: close" in answers[0].lower()
    head, _, body = answers[0].partition(b"\r\n\r\n")
    error = json.loads(body)["error"]
    assert error["message"].endswith("methods are case-sensitive")
    assert f"x-request-id: {error['request_id']}".encode() in head.lower()
    assert answers[4].endswith(b"\r\n\r\n")  # "head": no body


class SpawnedTasks(trio.abc.Instrument):
    def __init__(self) -> None:
        self.names: list[str] = []

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.names.append(task.name)


async def test_the_keep_alive_timer_is_one_task_per_connection() -> None:
    # Hypercorn started a new timer task each time the connection went idle (and cancelled
    # it at the next request): a task and two scheduler trips per request.
    spawned = SpawnedTasks()
    async with trio.open_nursery() as nursery:
        async with await served(nursery) as stream:
            trio.lowlevel.add_instrument(spawned)
            try:
                for _ in range(10):
                    await stream.send_all(b"GET /f HTTP/1.1\r\nHost: x\r\n\r\n")
                    answer = b""
                    with trio.fail_after(GIVE_UP):
                        while not answer.endswith(HELLO):
                            answer += await stream.receive_some(65536)
                    assert answer.startswith(b"HTTP/1.1 200")
                await trio.testing.wait_all_tasks_blocked()
            finally:
                trio.lowlevel.remove_instrument(spawned)
        nursery.cancel_scope.cancel()
    timers = [name for name in spawned.names if "idle" in name.lower()]
    assert len(timers) <= 1, timers


class IdleServer:
    """What the keep-alive timer knows of Hypercorn's TCP server: its config, its context
    (``terminated``: a graceful shutdown) and how it closes an idle connection."""

    def __init__(self) -> None:
        self.config = SimpleNamespace(keep_alive_timeout=5)
        self.terminated = trio.Event()
        self.context = SimpleNamespace(terminated=self.terminated)
        self.closed_at: float | None = None

    async def _idle_timeout(self) -> None:  # the action Hypercorn hands its timer
        raise AssertionError("the timer closes the connection itself")

    async def _initiate_server_close(self) -> None:
        self.closed_at = trio.current_time()


async def test_the_timer_closes_only_an_idle_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = IdleServer()
    timer = http_fixes.IdleTimer()
    async with trio.open_nursery() as nursery:
        group = SimpleNamespace(_nursery=nursery)
        await timer.restart(group, server._idle_timeout)  # idle: closed 5 s from now
        await trio.sleep(4)
        await timer.stop()  # a request: never closed while it runs
        await trio.sleep(60)
        server.terminated.set()  # a graceful shutdown waits for the answer
        await trio.sleep(1)
        assert server.closed_at is None
        start = trio.current_time()
        await timer.restart(group, server._idle_timeout)  # answered: idle, shut down
        await trio.testing.wait_all_tasks_blocked()
        assert server.closed_at == start


async def test_the_timer_closes_a_connection_idle_for_its_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server = IdleServer()
    timer = http_fixes.IdleTimer()
    async with trio.open_nursery() as nursery:
        group = SimpleNamespace(_nursery=nursery)
        await timer.restart(group, server._idle_timeout)
        await trio.sleep(3)
        await timer.stop()
        await timer.restart(group, server._idle_timeout)  # idle again: 5 s from here
        start = trio.current_time()
    assert server.closed_at == start + 5


async def test_a_cancelled_timer_ends_without_closing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The reader ended (the client closed): Hypercorn closes the connection itself.
    server = IdleServer()
    timer = http_fixes.IdleTimer()
    async with trio.open_nursery() as nursery:
        await timer.restart(SimpleNamespace(_nursery=nursery), server._idle_timeout)
        await trio.sleep(1)
        timer.cancel()
    assert server.closed_at is None
    assert trio.current_time() < 5


async def test_a_request_at_the_deadline_leaves_the_timer_running(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A request handled in the same scheduler batch as the deadline expiry lifts the
    # deadline of an already cancelled scope: the timer must not take that for cancel().
    for _ in range(20):  # the batch's order is random; both orders, with near certainty
        server = IdleServer()
        timer = http_fixes.IdleTimer()
        async with trio.open_nursery() as nursery:
            group = SimpleNamespace(_nursery=nursery)
            await timer.restart(group, server._idle_timeout)
            await trio.sleep_until(trio.current_time() + 5)  # woken with the timer
            if server.closed_at is not None:
                continue  # the timer ran first and closed it: fine
            await timer.stop()  # the request arrived
            await trio.sleep(60)
            await timer.restart(group, server._idle_timeout)  # answered
            start = trio.current_time()
            await trio.sleep(6)
            assert server.closed_at == start + 5


async def test_a_kept_alive_connection_is_closed_once_idle_for_the_keep_alive_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # End to end through Hypercorn (keep_alive_timeout = header_timeout): requests that come
    # within the timeout keep the connection; idle for the timeout, it is closed.
    async with trio.open_nursery() as nursery:
        url: str = await nursery.start(
            partial(serve_app, hello, host="127.0.0.1", port=0, header_timeout=5.0)
        )
        host, port = url.removeprefix("http://").split(":")
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            for _ in range(3):
                await trio.sleep(4)
                await stream.send_all(b"GET /f HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = b""
                while not answer.endswith(HELLO):
                    answer += await stream.receive_some(65536)
                assert answer.startswith(b"HTTP/1.1 200")
            answered = trio.current_time()
            assert await read_until_closed(stream) == b""
            assert trio.current_time() - answered == pytest.approx(5.0, abs=0.1)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("head", [b"HTTP/1.1\r\nConnection: close", b"HTTP/1.0"])
async def test_a_quart_answer_to_a_closing_request_ends_with_the_connection(head: bytes) -> None:
    # Quart-Trio cancels its handler once the answer is out, and the handler is the task
    # that closes the connection: a close cancelled while it waited for the send lock left
    # the socket open for good, and enough such clients filled max_connections (found by a
    # user's trial: /healthz, /metrics, every 404).
    app = QuartTrio(__name__)

    @app.route("/healthz")
    async def healthz() -> str:
        return "ok"

    async with trio.open_nursery() as nursery:
        url: str = await nursery.start(partial(serve_app, app, host="127.0.0.1", port=0))
        host, port = url.removeprefix("http://").split(":")
        for path in [b"/healthz", b"/nothing-here"] * 10:  # each time a fair coin decided it
            async with await trio.open_tcp_stream(host, int(port)) as stream:
                await stream.send_all(b"GET " + path + b" " + head + b"\r\nHost: x\r\n\r\n")
                with trio.fail_after(GIVE_UP):
                    answer = await read_until_closed(stream)
            assert answer.startswith((b"HTTP/1.1 200", b"HTTP/1.1 404")), answer[:100]
        nursery.cancel_scope.cancel()


async def test_a_target_that_is_not_a_path_is_400_before_any_app_sees_it() -> None:
    # Quart indexed the target's first character: "GET ?a" was a 500 with a traceback, and
    # "PUT Xdefault/f" stored default/f, its first character dropped.
    seen: list[str] = []

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "http":
            seen.append(scope["raw_path"].decode())
        await reject_or_read(scope, receive, send)

    quart = QuartTrio(__name__)

    @quart.route("/<path:name>", methods=["PUT"])
    async def put(name: str) -> str:
        seen.append(name)
        return "stored"

    targets = [b"?a", b"Xdefault/f", b"default/f", b"*", b"/f", b"http://h/g", b"HTTP://h/h"]
    async with trio.open_nursery() as nursery:
        answers: dict[str, list[bytes]] = {}
        for name, served in (("asgi", app), ("quart", quart)):
            url: str = await nursery.start(partial(serve_app, served, host="127.0.0.1", port=0))
            host, port = url.removeprefix("http://").split(":")
            for target in targets:
                async with await trio.open_tcp_stream(host, int(port)) as stream:
                    await stream.send_all(
                        b"PUT " + target + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                        b"Connection: close\r\n\r\nab"
                    )
                    with trio.fail_after(GIVE_UP):
                        answers.setdefault(name, []).append(await read_until_closed(stream))
        nursery.cancel_scope.cancel()
    assert seen == ["/f", "http://h/g", "HTTP://h/h", "f", "g", "h"]  # paths and URLs only
    for name, got in answers.items():
        assert [a.split(b" ")[1] for a in got] == [b"400"] * 4 + [b"200"] * 3, name
        head, _, body = got[1].partition(b"\r\n\r\n")
        error = json.loads(body)["error"]
        assert error["code"] == "invalid_request"
        assert "'Xdefault/f'" in error["message"], error
        assert b"connection: close" in head.lower()
