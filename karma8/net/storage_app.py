"""The storage node's internal HTTP API (authenticated with the cluster secret).

PUT    /v1/parts/{key}                    stream a part in; 201 + {"key","size","checksum"}
GET    /v1/parts/{key}?offset=&length=    bytes out (streamed above 64 KiB), Content-Length exact
HEAD   /v1/parts/{key}                    size and checksum headers
DELETE /v1/parts/{key}                    204, idempotent
GET    /v1/parts                          {"keys": [...]}
POST   /v1/scrub                          verify every part now
GET    /healthz

The part routes (the first four) are served by :mod:`karma8.net.parts` in front of Quart;
the rest are Quart routes.
"""

from __future__ import annotations

from quart import Response, jsonify
from quart_trio import QuartTrio

from karma8.actors.storage import StorageNode
from karma8.net.common import create_app
from karma8.net.parts import PartRoutes


def storage_app(node: StorageNode, *, secret: str | None) -> QuartTrio:
    app = create_app("storage", secret=secret)
    # Quart's documented way to put ASGI middleware in front of an app.
    app.asgi_app = PartRoutes(node, app.asgi_app, secret=secret)  # type: ignore[method-assign]

    @app.route("/v1/scrub", methods=["POST"])
    async def scrub() -> Response:
        report = await node.scrub()
        return jsonify(
            {"node_id": report.node_id, "checked": report.checked, "corrupt": list(report.corrupt)}
        )

    @app.route("/v1/parts", methods=["GET"])
    async def list_parts() -> Response:
        return jsonify({"keys": await node.part_keys()})

    return app
