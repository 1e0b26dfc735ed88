"""The pass-through receive buffer: h11 parses any byte stream exactly as with its own buffer."""

from __future__ import annotations

import itertools
from typing import Any

import h11
from h11._receivebuffer import ReceiveBuffer
from hypothesis import given
from hypothesis import strategies as st

from karma8.net.http_fixes import PassThroughReceiveBuffer


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
