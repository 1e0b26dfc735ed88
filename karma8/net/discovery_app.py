"""Discovery's internal HTTP API (authenticated with the cluster secret). JSON in, JSON out.

POST   /v1/uploads                         begin: {namespace,name,size_hint,if_absent}
POST   /v1/uploads/{version_id}/commit     {size, receipts:[{index,size,checksum}], if_absent}
POST   /v1/uploads/{version_id}/abort
POST   /v1/uploads/{version_id}/parts/{index}/replace   {failed_node_id} -> the new placement
GET    /v1/files/{namespace}/{name}        the committed version (404 if none)
DELETE /v1/files/{namespace}/{name}        {"deleted": bool}
GET    /v1/files/{namespace}?prefix=&after=&limit=
PUT    /v1/namespaces/{namespace}
POST   /v1/nodes                           register {node_id,url,capacity_bytes,...}
POST   /v1/nodes/{node_id}/heartbeat       {registration, deleted:[keys]} -> {garbage:[keys]}
POST   /v1/nodes/{node_id}/unknown-parts   {keys:[keys]} -> {unknown:[keys]}
POST   /v1/nodes/{node_id}/failures        {reason}: the node is suspect
GET    /v1/nodes
"""

from __future__ import annotations

from quart import Response, jsonify, request
from quart_trio import QuartTrio

from karma8.actors.discovery import Discovery
from karma8.core.errors import InvalidRequest
from karma8.net.codec import (
    decode_receipt,
    decode_registration,
    encode_entry,
    encode_node,
    encode_placement,
    encode_version,
)
from karma8.net.common import create_app, int_arg, json_body


def discovery_app(discovery: Discovery, *, secret: str | None) -> QuartTrio:
    app = create_app("discovery", secret=secret)

    @app.route("/v1/uploads", methods=["POST"])
    async def begin() -> tuple[Response, int]:
        body = await json_body()
        size_hint = body.get("size_hint")
        if size_hint is not None and (
            not isinstance(size_hint, int) or isinstance(size_hint, bool)
        ):
            raise InvalidRequest("size_hint must be an integer or null")
        version = await discovery.begin_upload(
            namespace=str(body.get("namespace", "")),
            name=str(body.get("name", "")),
            size_hint=size_hint,
            if_absent=bool(body.get("if_absent", False)),
        )
        return jsonify(encode_version(version)), 201

    @app.route("/v1/uploads/<version_id>/commit", methods=["POST"])
    async def commit(version_id: str) -> Response:
        body = await json_body()
        receipts = body.get("receipts")
        size = body.get("size")
        if not isinstance(receipts, list) or not isinstance(size, int):
            raise InvalidRequest("commit needs size and receipts")
        version = await discovery.commit_upload(
            version_id=version_id,
            size=size,
            receipts=[decode_receipt(r) for r in receipts],
            if_absent=bool(body.get("if_absent", False)),
        )
        return jsonify(encode_version(version))

    @app.route("/v1/uploads/<version_id>/abort", methods=["POST"])
    async def abort(version_id: str) -> Response:
        return jsonify(encode_version(await discovery.abort_upload(version_id=version_id)))

    @app.route("/v1/uploads/<version_id>/parts/<int:index>/replace", methods=["POST"])
    async def replace_part(version_id: str, index: int) -> Response:
        failed = (await json_body()).get("failed_node_id")
        if not isinstance(failed, str) or not failed:
            raise InvalidRequest("failed_node_id must be a node id")
        placement = await discovery.replace_part(
            version_id=version_id, index=index, failed_node_id=failed
        )
        return jsonify(encode_placement(placement))

    @app.route("/v1/files/<namespace>/<path:name>", methods=["GET"])
    async def resolve(namespace: str, name: str) -> Response:
        return jsonify(encode_version(await discovery.resolve(namespace=namespace, name=name)))

    @app.route("/v1/files/<namespace>/<path:name>", methods=["DELETE"])
    async def delete(namespace: str, name: str) -> Response:
        return jsonify({"deleted": await discovery.delete_file(namespace=namespace, name=name)})

    @app.route("/v1/files/<namespace>", methods=["GET"])
    async def list_files(namespace: str) -> Response:
        entries = await discovery.list_files(
            namespace=namespace,
            prefix=request.args.get("prefix", ""),
            after=request.args.get("after", ""),
            limit=int_arg("limit", 1000),
        )
        return jsonify({"files": [encode_entry(e) for e in entries]})

    @app.route("/v1/namespaces/<namespace>", methods=["PUT"])
    async def create_namespace(namespace: str) -> tuple[str, int]:
        await discovery.create_namespace(namespace=namespace)
        return "", 204

    @app.route("/v1/nodes", methods=["POST"])
    async def register() -> tuple[str, int]:
        await discovery.register_node(decode_registration(await json_body()))
        return "", 204

    @app.route("/v1/nodes/<node_id>/heartbeat", methods=["POST"])
    async def heartbeat(node_id: str) -> Response:
        body = await json_body()
        registration = decode_registration(body.get("registration", {}))
        if registration.node_id != node_id:
            raise InvalidRequest("node id in the path and the body differ")
        deleted = body.get("deleted", [])
        if not isinstance(deleted, list) or not all(isinstance(k, str) for k in deleted):
            raise InvalidRequest("deleted must be a list of part keys")
        garbage = await discovery.heartbeat(registration, deleted=deleted)
        return jsonify({"garbage": garbage})

    @app.route("/v1/nodes/<node_id>/unknown-parts", methods=["POST"])
    async def unknown_parts(node_id: str) -> Response:
        keys = (await json_body()).get("keys")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise InvalidRequest("keys must be a list of part keys")
        return jsonify({"unknown": await discovery.unknown_parts(node_id=node_id, keys=keys)})

    @app.route("/v1/nodes/<node_id>/failures", methods=["POST"])
    async def report_failure(node_id: str) -> tuple[str, int]:
        reason = (await json_body()).get("reason", "")
        if not isinstance(reason, str):
            raise InvalidRequest("reason must be a string")
        await discovery.report_node_failure(node_id=node_id, reason=reason)
        return "", 204

    @app.route("/v1/nodes", methods=["GET"])
    async def list_nodes() -> Response:
        return jsonify({"nodes": [encode_node(n) for n in await discovery.list_nodes()]})

    return app
