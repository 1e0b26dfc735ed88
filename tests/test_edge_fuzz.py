"""Hypothesis against the gateway on a real socket: raw request targets, Range headers and
other request headers. Whatever arrives, the answer is never a 5xx, two targets name the same
file exactly when they decode to the same name, and a range serves exactly the bytes
:func:`karma8.core.ranges.resolve_range` selects (docs/http-api.md, "Names" and "Ranges")."""

from __future__ import annotations

import hashlib
import re
import socket
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from karma8.core.errors import InvalidName, RangeNotSatisfiable
from karma8.core.names import check_name
from karma8.core.ranges import resolve_range

from processes import GIVE_UP, service

FUZZ = settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
CONFIG = """
gateway_port = 0
discovery_port = 0
max_file_size = "64 KiB"
stripe_unit = "64 KiB"
"""
_ESCAPE = re.compile(rb"%([0-9a-fA-F]{2})")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """One embedded cluster (real processes' sockets) for every example of the module."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "karma8.toml").write_text(CONFIG)
    args = ["serve", "--data", str(root / "data"), "--config", str(root / "karma8.toml")]
    with service(args, r"gateway http://(127\.0\.0\.1):(\d+)", root / "serve.log", cwd=root) as s:
        yield s.match.group(1), int(s.match.group(2))


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body


def exchange(gateway: tuple[str, int], raw_request: bytes) -> Answer:
    """Send one request on a fresh connection and read its answer (Content-Length framed,
    as every answer of the gateway's object routes is; none to a HEAD)."""
    with socket.create_connection(gateway, timeout=GIVE_UP) as sock:
        sock.sendall(raw_request)
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            assert chunk, buffer
            buffer += chunk
        head, _, rest = buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        length = 0 if raw_request.startswith(b"HEAD") else int(headers.get("content-length", 0))
        while len(rest) < length:
            chunk = sock.recv(65536)
            assert chunk
            rest += chunk
        return Answer(status, headers, rest[:length])


def expected_name(raw: bytes) -> str | None:
    """The file a raw path names, by an independent strict decoder: None if it names none
    (a '%' without two hex digits, bytes that are not UTF-8, or a name the rules refuse)."""
    if re.search(rb"%(?![0-9a-fA-F]{2})", raw):
        return None
    try:
        name = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), raw).decode("utf-8")
        return check_name(name)
    except (UnicodeDecodeError, InvalidName):
        return None


# A path piece: a visible ASCII character as it is (no '?' or '#', which end the path), an
# escape of any byte (UTF-8 sequences, valid or not, control bytes, '/', '%'), a malformed
# escape, or a whole escaped character.
_piece = st.one_of(
    st.sampled_from([chr(c) for c in range(0x21, 0x7F) if chr(c) not in "?#%"]),
    st.integers(0, 255).map(lambda b: f"%{b:02x}"),
    st.integers(0, 255).map(lambda b: f"%{b:02X}"),
    st.tuples(st.sampled_from(["%", "%g", "%4"]), st.sampled_from(["", "z", "/", "x1"])).map(
        "".join
    ),
    st.characters(codec="utf-8", exclude_categories=["Cs"]).map(lambda c: quote(c, safe="")),
    st.sampled_from(["/", "//", "/./", "/../", "%2e", "%2F", "%25", "%EF%BF%BD", "%ff"]),
)
raw_paths = st.lists(_piece, min_size=1, max_size=12).map(lambda p: "".join(p).encode("ascii"))


def request(method: str, raw: bytes, *, body: bytes | None = None, headers: str = "") -> bytes:
    framing = "" if body is None else f"Content-Length: {len(body)}\r\n"
    head = f"{method} /default/".encode() + raw + b" HTTP/1.1\r\nHost: fuzz\r\n"
    return head + (headers + framing + "\r\n").encode("latin-1") + (body or b"")


def canonical(name: str) -> bytes:
    return quote(name, safe="/").encode("ascii")


@FUZZ
@given(raws=st.lists(raw_paths, min_size=1, max_size=6))
def test_targets_never_alias_and_never_fail(gateway: tuple[str, int], raws: list[bytes]) -> None:
    stored: dict[str, bytes] = {}  # decoded name -> what its last PUT stored
    for raw in raws:
        body = hashlib.sha256(raw).digest()
        answer = exchange(gateway, request("PUT", raw, body=body))
        assert answer.status < 500, (raw, answer.status, answer.body)
        name = expected_name(raw)
        if name is None:
            assert answer.status == 400, (raw, answer.status, answer.body)
            continue
        assert answer.status == 201, (raw, answer.status, answer.body)
        stored[name] = body
    # Read each name back by another spelling of it: the bytes its own last PUT stored.
    for name, body in stored.items():
        answer = exchange(gateway, request("GET", canonical(name)))
        assert (answer.status, answer.body) == (200, body), name
    for name in stored:
        answer = exchange(gateway, request("DELETE", canonical(name)))
        assert answer.status == 204, (name, answer.status, answer.body)


_number = st.one_of(st.just(""), st.integers(0, 300).map(str), st.just("99999999999999999999"))
range_headers = st.one_of(
    st.tuples(_number, _number).map(lambda p: f"bytes={p[0]}-{p[1]}"),
    st.tuples(
        st.sampled_from(["bytes", "Bytes", "items", " bytes ", "bytes"]),
        st.sampled_from(["=", " = ", ":", ""]),
        _number,
        st.sampled_from(["-", "--", ",", " - "]),
        _number,
        st.sampled_from(["", ",0-1", ", 5-", "x"]),
    ).map("".join),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30),
)


# If-Range: none, the file's own ETag, its weak form, another ETag, a date.
if_ranges = st.sampled_from([None, "own", "W/own", '"other"', "Sat, 05 Dec 2026 10:00:00 GMT"])


@FUZZ
@given(size=st.sampled_from([0, 1, 14, 200]), header=range_headers, if_range=if_ranges)
def test_ranges_serve_what_the_rules_select(
    gateway: tuple[str, int], size: int, header: str, if_range: str | None
) -> None:
    data = bytes(i % 251 for i in range(size))
    name = f"range-{size}"
    stored = exchange(gateway, request("PUT", name.encode(), body=data))
    assert stored.status == 201
    lines = f"Range: {header}\r\n"
    if if_range is not None:
        lines += f"If-Range: {if_range.replace('own', stored.headers['etag'])}\r\n"
    answer = exchange(gateway, request("GET", name.encode(), headers=lines))
    if if_range not in (None, "own"):  # only the file's own strong ETag lets a range through
        assert (answer.status, answer.body) == (200, data), (header, if_range)
        return
    try:
        selected = resolve_range(header.strip(" \t"), size)
    except RangeNotSatisfiable:
        assert answer.status == 416, (header, answer.status)
        assert answer.headers["content-range"] == f"bytes */{size}"
        return
    if selected is None:
        assert (answer.status, answer.body) == (200, data), header
        return
    start, stop = selected
    assert (answer.status, answer.body) == (206, data[start:stop]), header
    assert answer.headers["content-range"] == f"bytes {start}-{stop - 1}/{size}"


header_names = st.sampled_from(
    [
        "If-None-Match",
        "If-Match",
        "If-Modified-Since",
        "If-Unmodified-Since",
        "If-Range",
        "Authorization",
        "Expect",
        "Content-Type",
        "Accept-Encoding",
        "X-Request-Id",
        "Connection",
    ]
)
header_values = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
    st.sampled_from(['"x"', "*", 'W/"a", "b"', "Bearer k8t_a_b", "Bearer", "100-continue"]),
)


@FUZZ
@given(
    method=st.sampled_from(["GET", "HEAD", "PUT", "DELETE"]),
    headers=st.lists(st.tuples(header_names, header_values), max_size=4),
)
def test_odd_headers_never_fail_the_gateway(
    gateway: tuple[str, int], method: str, headers: list[tuple[str, str]]
) -> None:
    assert exchange(gateway, request("PUT", b"stay", body=b"here")).status == 201
    lines = "".join(f"{k}: {v.strip()}\r\n" for k, v in headers)
    body = b"new" if method == "PUT" else None
    answer = exchange(gateway, request(method, b"hdr", body=body, headers=lines))
    assert answer.status < 500, (method, headers, answer.status, answer.body)
    # Nothing another request stored was touched.
    assert exchange(gateway, request("GET", b"stay")).body == b"here"
