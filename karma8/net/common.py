"""What the three HTTP apps share: app creation, JSON errors, the cluster secret."""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import time
from typing import Any

from quart import Response, g, jsonify, request
from quart_trio import QuartTrio

from karma8.core.errors import InvalidRequest, Karma8Error
from karma8.net import requestlog
from karma8.net.codec import error_body, error_headers, error_status
from karma8.net.exchange import (
    METHOD_NOT_ALLOWED,
    SECRET_HEADER,
    check_secret,
    int_value,
    query_args,
)
from karma8.net.metrics import CONTENT_TYPE, METRICS
from karma8.net.requestlog import REQUEST_ID_HEADER, accept_request_id, log_access

log = logging.getLogger("karma8.net")
# Routes that check the secret themselves (or need none): a health probe, and a page a
# browser opens, which cannot send X-Karma8-Secret.
OWN_AUTH = frozenset({"/healthz", "/status", "/metrics"})


class _App(QuartTrio):
    """Quart-Trio whose answer to ``OPTIONS`` on a route is the file routes' (and RFC 9110's
    usual one): ``204`` and ``Allow``, no body (Quart's own is a ``200`` of empty HTML)."""

    async def make_default_options_response(self) -> Response:
        response = await super().make_default_options_response()
        allowed = sorted(m.strip() for m in response.headers["Allow"].split(","))
        response.status_code = 204  # no Content-Type, no Content-Length (RFC 9110 §8.6)
        for header in ("Content-Type", "Content-Length"):
            del response.headers[header]
        response.headers["Allow"] = ", ".join(allowed)
        return response


def create_app(name: str, *, secret: str | None) -> QuartTrio:
    """A Quart-Trio app for a role's control routes: JSON errors, (if ``secret``) auth.

    Files and parts do not pass through it: :mod:`karma8.net.exchange` serves them in front.
    """
    app = _App(name)
    # No size limit of Quart's own on a JSON body: a node's key lists (heartbeats, unknown
    # parts) grow with the node. Nor timeouts: Hypercorn's and the clients' apply.
    app.config["MAX_CONTENT_LENGTH"] = None
    app.config["BODY_TIMEOUT"] = None
    app.config["RESPONSE_TIMEOUT"] = None

    # First of the before_request hooks: a refused secret is logged with the id too. The
    # handler, its error handlers and after_request run in the same task, so they see it.
    @app.before_request
    async def take_request_id() -> None:
        g.request_id = accept_request_id(request.headers.get(REQUEST_ID_HEADER))
        g.began = time.perf_counter()
        requestlog.current.set(g.request_id)

    @app.after_request
    async def give_request_id(response: Response) -> Response:
        request_id = _request_id()
        response.headers[REQUEST_ID_HEADER] = request_id
        sent = response.content_length or 0
        rule = request.url_rule.rule if request.url_rule is not None else "(none)"
        METRICS.observe(
            role=name,
            route=rule,
            method=request.method,
            status=response.status_code,
            sent=sent,
            received=request.content_length or 0,
            started=g.get("began", time.perf_counter()),
        )
        log_access(
            request.method,
            request.full_path.rstrip("?"),
            response.status_code,
            sent,
            g.get("began", time.perf_counter()),
            request_id,
        )
        return response

    @app.errorhandler(Karma8Error)
    async def karma8_error(error: Karma8Error) -> tuple[Response, int, dict[str, str]]:
        # As the data plane answers (karma8.net.exchange): a request id, and a 5xx logged.
        status, request_id = error_status(error), _request_id()
        if status >= 500:
            log.error(
                "%s %s failed with %d [request %s]: %s",
                *(request.method, request.path, status, request_id, error.message),
            )
        body = error_body(error, request_id)
        headers = {k.decode(): v.decode() for k, v in error_headers(error)}
        return jsonify(body), status, headers

    @app.errorhandler(404)
    async def no_route(_: Exception) -> tuple[Response, int]:
        error = {"code": "not_found", "message": "no such route", "request_id": _request_id()}
        return jsonify({"error": error}), 404

    @app.errorhandler(405)
    async def bad_method(error: Exception) -> tuple[Response, int, dict[str, str]]:
        allowed = sorted(getattr(error, "valid_methods", None) or ())
        body = {"error": {**METHOD_NOT_ALLOWED["error"], "request_id": _request_id()}}
        return jsonify(body), 405, {"Allow": ", ".join(allowed)} if allowed else {}

    @app.errorhandler(Exception)
    async def internal(error: Exception) -> tuple[Response, int]:
        request_id = _request_id()
        log.error(
            "unhandled error in %s: %s %s [request %s]",
            *(name, request.method, request.path, request_id),
            exc_info=error,
        )
        body = {
            "error": {"code": "internal", "message": "internal error", "request_id": request_id}
        }
        return jsonify(body), 500

    if secret is not None:

        @app.before_request
        async def authenticate() -> None:
            if request.path in OWN_AUTH:
                return
            check_secret(request.headers.get(SECRET_HEADER), secret)

    @app.route("/healthz")
    async def healthz() -> Response:
        return jsonify({"ok": True, "role": name})

    @app.route("/metrics")
    async def metrics() -> Response | tuple[Response, int, dict[str, str]]:
        if secret is not None and not secret_given(secret):
            return challenge("the metrics need the cluster secret")
        return Response(await METRICS.render(), content_type=CONTENT_TYPE)

    return app


def secret_given(secret: str) -> bool:
    """Whether the request carries the secret: in ``X-Karma8-Secret``, as a Bearer token
    (what a Prometheus scrape sends with ``authorization``), or as the password of HTTP Basic
    auth (what a browser sends: ``http://karma8:SECRET@host:port/status``)."""
    given = request.headers.get(SECRET_HEADER)
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if given is None and scheme.lower() == "bearer":
        given = value.strip()
    elif given is None and scheme.lower() == "basic":
        try:
            given = base64.b64decode(value, validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    return given is not None and hmac.compare_digest(given.encode(), secret.encode())


def challenge(message: str) -> tuple[Response, int, dict[str, str]]:
    """A 401 that asks a browser for the secret (any user name, the secret as password)."""
    error = {"code": "unauthorized", "message": f"{message} (any user name)"}
    body = {"error": {**error, "request_id": _request_id()}}
    return jsonify(body), 401, {"WWW-Authenticate": 'Basic realm="karma8"'}


def _request_id() -> str:
    """The current request's id (made here if the request never reached the hook)."""
    if "request_id" not in g:
        g.request_id = accept_request_id(None)
    return str(g.request_id)


async def json_body() -> dict[str, Any]:
    data = await request.get_json(force=True, silent=True)
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    return data


def text_args(known: set[str]) -> dict[str, str]:
    """The current request's query parameters, as :func:`~karma8.net.exchange.query_args`
    reads them: percent-encoded as strictly as a path (Werkzeug would put U+FFFD where the
    bytes are not UTF-8, and take ``%zz`` as it is), each at most once, only ``known``
    ones (a typo such as ``prefx=`` must not list a whole namespace)."""
    return query_args(request.query_string, known)


def only_args(known: set[str]) -> None:
    """Refuse a query parameter the route does not know: a typo (``dryrun=1``, ``prefx=``)
    must not start a rebalancing meant as a dry run, or list a whole namespace. The query is
    read as strictly as :func:`text_args` reads it."""
    query_args(request.query_string, known)


def int_arg(name: str, default: int | None = None) -> int:
    """Query parameter ``name`` of the current request, as a non-negative integer."""
    return int_value(name, request.args.get(name), default)
