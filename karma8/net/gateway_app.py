"""The gateway's public HTTP API.

    PUT    /{namespace}/{name}     store (streaming; chunked or Content-Length); 201
    GET    /{namespace}/{name}     stream back; Range (single), If-None-Match; 200/206/304
    HEAD   /{namespace}/{name}     headers only
    DELETE /{namespace}/{name}     204 (idempotent)
    GET    /{namespace}/?prefix=&after=&limit=    JSON listing, paginated
    GET    /healthz
    GET    /metrics                counters: puts, gets, read_errors (JSON)

Every route on a namespace takes ``Authorization: Bearer <token>`` (none for a public
namespace): 401, 403 or 404 otherwise. Names may contain ``/``. Errors are JSON:
``{"error": {"code": ..., "message": ...}}``. The object routes (the first four) are served by
:mod:`karma8.net.objects` in front of Quart; the rest are Quart routes.
"""

from __future__ import annotations

from quart import Response, jsonify, request
from quart_trio import QuartTrio

from karma8.actors.gateway import Gateway
from karma8.core.access import Right, bearer_token
from karma8.net.bounds import UploadGate
from karma8.net.codec import encode
from karma8.net.common import create_app, int_arg
from karma8.net.objects import ObjectRoutes


def gateway_app(gateway: Gateway, uploads: UploadGate | None = None) -> QuartTrio:
    app = create_app("gateway", secret=None)
    stats = {"gets": 0, "puts": 0, "read_errors": 0}
    # Quart's documented way to put ASGI middleware in front of an app.
    app.asgi_app = ObjectRoutes(gateway, stats, app.asgi_app, uploads)  # type: ignore[method-assign]

    @app.route("/metrics", methods=["GET"])
    async def metrics() -> Response:
        """Counters since start: successful PUTs, GETs begun, GETs that failed mid-stream."""
        return jsonify(stats)

    @app.route("/<namespace>/", methods=["GET"])
    async def listing(namespace: str) -> Response:
        token = bearer_token(request.headers.get("authorization"))
        await gateway.authorize(namespace, token, Right.READ)
        limit = int_arg("limit", 1000)
        entries = await gateway.list(
            namespace,
            prefix=request.args.get("prefix", ""),
            after=request.args.get("after", ""),
            limit=limit,
        )
        files = [encode(e) for e in entries]
        next_after = entries[-1].name if len(entries) == limit else None
        return jsonify({"namespace": namespace, "files": files, "next_after": next_after})

    return app
