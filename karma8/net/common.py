"""What the three HTTP apps share: app creation, JSON errors, the cluster secret."""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

from quart import Response, jsonify, request
from quart_trio import QuartTrio

from karma8.core.errors import Forbidden, InvalidRequest, Karma8Error
from karma8.net.codec import error_body, error_status
from karma8.net.http_fixes import install_backpressure

SECRET_HEADER = "X-Karma8-Secret"
log = logging.getLogger("karma8.net")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

# HTTP responses of at most this many bytes are read whole before the status line goes out
# (one body write, and a failure is an error status rather than a body cut short); larger
# ones stream, so memory per request stays bounded either way.
WHOLE_BODY_BYTES = 64 * 1024


async def read_whole(opened: AbstractAsyncContextManager[AsyncIterator[bytes]]) -> bytes:
    """Open a stream of chunks, read it to the end and close it: a small response's body."""
    async with opened as chunks:
        return b"".join([chunk async for chunk in chunks])


def create_app(name: str, *, secret: str | None) -> QuartTrio:
    """A Quart-Trio app with streaming bodies, JSON errors and (if ``secret``) auth."""
    app = QuartTrio(name)
    install_backpressure(app)
    app.config["JSON_SORT_KEYS"] = False

    @app.errorhandler(Karma8Error)
    async def karma8_error(error: Karma8Error) -> tuple[Response, int]:
        return jsonify(error_body(error)), error_status(error)

    @app.errorhandler(404)
    async def no_route(_: Exception) -> tuple[Response, int]:
        return jsonify({"error": {"code": "not_found", "message": "no such route"}}), 404

    @app.errorhandler(405)
    async def bad_method(_: Exception) -> tuple[Response, int]:
        return jsonify(
            {"error": {"code": "method_not_allowed", "message": "method not allowed here"}}
        ), 405

    @app.errorhandler(Exception)
    async def internal(error: Exception) -> tuple[Response, int]:
        log.exception("unhandled error in %s", name, exc_info=error)
        return jsonify({"error": {"code": "internal", "message": "internal error"}}), 500

    if secret is not None:

        @app.before_request
        async def authenticate() -> None:
            if request.path == "/healthz":
                return
            given = request.headers.get(SECRET_HEADER, "")
            if not hmac.compare_digest(given.encode(), secret.encode()):
                raise Forbidden("missing or wrong cluster secret")

    @app.route("/healthz")
    async def healthz() -> Response:
        return jsonify({"ok": True, "role": name})

    return app


async def json_body() -> dict[str, Any]:
    data = await request.get_json(force=True, silent=True)
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    return data


def int_arg(name: str, default: int | None = None) -> int:
    raw = request.args.get(name)
    if raw is None:
        if default is None:
            raise InvalidRequest(f"query parameter {name!r} is required")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"query parameter {name!r} must be an integer") from None
    if value < 0:
        raise InvalidRequest(f"query parameter {name!r} must not be negative")
    return value
