"""Request ids and log lines (karma8/net/requestlog.py)."""

from __future__ import annotations

import json
import logging

import pytest

from karma8.net import requestlog
from karma8.net.requestlog import JsonFormatter, RequestIdFilter, TextFormatter, accept_request_id


@pytest.mark.parametrize("given", ["trace-1", "a.b_c:d-E", "x" * 64])
def test_a_sane_client_id_is_kept(given: str) -> None:
    assert accept_request_id(given) == given


@pytest.mark.parametrize("given", [None, "", "x" * 65, "a b", "a\nb", "a\tb", "ü", "a;b", "a]b"])
def test_anything_else_gets_a_new_id(given: str | None) -> None:
    made = accept_request_id(given)
    assert made != given
    assert len(made) == 16
    assert int(made, 16) >= 0


def record(message: str) -> logging.LogRecord:
    made = logging.LogRecord("karma8.test", logging.WARNING, __file__, 1, message, None, None)
    RequestIdFilter().filter(made)
    return made


def test_lines_carry_the_current_request_id() -> None:
    assert not TextFormatter().format(record("outside")).endswith("]")
    token = requestlog.current.set("trace-9")
    try:
        text = TextFormatter().format(record("inside"))
        line = json.loads(JsonFormatter("gw").format(record("inside")))
        # A message that names its request already is not told twice.
        named = TextFormatter().format(record("failed [request trace-9]: why"))
        named_json = json.loads(JsonFormatter("gw").format(record("failed [request trace-9]: why")))
    finally:
        requestlog.current.reset(token)
    assert text.endswith("WARNING inside [request trace-9]")
    assert line["request_id"] == "trace-9"
    assert line["role"] == "gw"
    assert line["level"] == "warning"
    assert line["time"].endswith("Z")
    assert named.count("trace-9") == 1
    assert named_json["message"] == "failed: why"
    assert named_json["request_id"] == "trace-9"


def test_internal_requests_carry_it() -> None:
    assert requestlog.outgoing_headers() == {}
    token = requestlog.current.set("trace-9")
    try:
        assert requestlog.outgoing_headers() == {"X-Request-Id": "trace-9"}
    finally:
        requestlog.current.reset(token)
