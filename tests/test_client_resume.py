"""``karma8 get``'s resume against a gateway seen through a hop that drops If-Range: a 206
or a 416 of another version must not be taken for the partial file's own."""

from __future__ import annotations

import argparse
from pathlib import Path

import httpx
import pytest

from karma8.core.errors import RangeNotSatisfiable
from karma8.core.ranges import resolve_range
from karma8.net import client

BODY, ETAG = b"NEW-VERSION!", '"new"'


def dropping_if_range(request: httpx.Request) -> httpx.Response:
    """The gateway's range logic (karma8.net.objects), with If-Range lost on the way."""
    wanted = request.headers.get("range")
    try:
        span = resolve_range(wanted, len(BODY))
    except RangeNotSatisfiable:
        return httpx.Response(416, headers={"Content-Range": f"bytes */{len(BODY)}"}, json={})
    start, stop = span or (0, len(BODY))
    headers = {"ETag": ETAG, "Content-Length": str(stop - start)}
    return httpx.Response(206 if span else 200, headers=headers, content=BODY[start:stop])


@pytest.mark.parametrize("partial", [b"old-version!", b"old-ve"])  # as long; shorter
def test_a_partial_of_another_version_is_not_kept(tmp_path: Path, partial: bytes) -> None:
    out = str(tmp_path / "f")
    Path(out + client.PARTIAL).write_bytes(partial)
    Path(out + client.PARTIAL + ".etag").write_text('"old"')
    http = httpx.Client(transport=httpx.MockTransport(dropping_if_range))
    args = argparse.Namespace(json=False, progress=False, quiet=True)
    target = client.Target("http://gw", None)
    said = client._download(http, "http://gw/default/f", target, args, "default", "f", out)
    assert Path(out).read_bytes() == BODY
    assert "resumed" not in said
