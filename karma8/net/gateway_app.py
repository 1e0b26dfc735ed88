"""The gateway's public HTTP API.

    PUT    /{namespace}/{name}     store (streaming; chunked or Content-Length); 201
    GET    /{namespace}/{name}     stream back; Range (single), If-None-Match; 200/206/304
    HEAD   /{namespace}/{name}     headers only
    DELETE /{namespace}/{name}     204 (idempotent)
    GET    /{namespace}/?prefix=&after=&limit=    JSON listing, paginated
    GET    /healthz
    GET    /metrics                Prometheus metrics of the process (karma8.net.metrics)

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
from karma8.net.common import create_app, text_args
from karma8.net.exchange import int_value
from karma8.net.objects import ObjectRoutes, new_stats
from karma8.net.writepipe import SmallWrites


def gateway_app(
    gateway: Gateway,
    uploads: UploadGate | None = None,
    stats: dict[str, int] | None = None,
    parent: SmallWrites | None = None,
) -> QuartTrio:
    """``stats`` (PUTs stored, GETs begun, GETs that failed mid-stream) is what the object
    routes count, for the metrics; ``parent``: a worker's parent, which stores its small
    uploads."""
    app = create_app("gateway", secret=None)
    counts = stats if stats is not None else new_stats()
    # Quart's documented way to put ASGI middleware in front of an app.
    app.asgi_app = ObjectRoutes(gateway, counts, app.asgi_app, uploads, parent)  # type: ignore[method-assign]

    @app.route("/<namespace>/", methods=["GET"])
    async def listing(namespace: str) -> Response:
        token = bearer_token(request.headers.get("authorization"))
        await gateway.authorize(namespace, token, Right.READ)
        args = text_args({"prefix", "after", "limit"})
        limit = int_value("limit", args.get("limit"), 1000)
        entries = await gateway.list(
            namespace,
            prefix=args.get("prefix", ""),
            after=args.get("after", ""),
            limit=limit,
        )
        files = [encode(e) for e in entries]
        next_after = entries[-1].name if len(entries) == limit else None
        return jsonify({"namespace": namespace, "files": files, "next_after": next_after})

    return app
