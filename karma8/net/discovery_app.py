"""Discovery's internal HTTP API (authenticated with the cluster secret). JSON in, JSON out.

POST   /v1/uploads                         begin: {namespace,name,size_hint,if_absent}
POST   /v1/uploads/{version_id}/commit     {size, receipts:[{index,size,checksum}], if_absent}
POST   /v1/uploads/{version_id}/abort
POST   /v1/uploads/{version_id}/parts/{index}/replace   {failed_node_id} -> the new placement
GET    /v1/files/{namespace}/{name}        the committed version (404 if none)
DELETE /v1/files/{namespace}/{name}        {"deleted": bool}
GET    /v1/files/{namespace}?prefix=&after=&limit=
GET    /v1/namespaces                      {namespaces:[{name,public,enabled,created_at,
                                                        engine,copies,parity}]}
PUT    /v1/namespaces/{namespace}          create {public,engine,copies,parity}: the namespace
                                            (idempotent)
POST   /v1/namespaces/{namespace}/disable  the namespace, disabled
POST   /v1/tokens                          {namespace,read,write}: 201 {token, token_id, ...}
GET    /v1/tokens?namespace=               {tokens:[...]}, never their secrets
POST   /v1/tokens/{token_id}/revoke        the token, revoked
POST   /v1/access                          {namespace,token,right}: 204, or 401/403/404
POST   /v1/nodes                           register {node_id,url,capacity_bytes,...}
POST   /v1/nodes/{node_id}/heartbeat       {registration, deleted:[keys]} -> {garbage:[keys]}
POST   /v1/nodes/{node_id}/unknown-parts   {keys:[all it holds]} -> {unknown:[keys]}
POST   /v1/nodes/{node_id}/failures        {reason}: the node is suspect
POST   /v1/nodes/{node_id}/lost-parts      {keys, reason}: the node lost them; repair them
GET    /v1/nodes/{node_id}/parts           {keys:[...]}: current parts discovery knows there
POST   /v1/nodes/{node_id}/forget          an unavailable node is gone for good: the node
                                            (idempotent; 409 node_not_gone if heard lately)
GET    /v1/nodes
GET    /v1/status                          the cluster at a glance (``karma8 status``)
GET    /status                             the same as an HTML page (Basic auth: the secret)
GET    /metrics                            Prometheus metrics of the process (the secret)
GET    /v1/rebalance                       the rebalancer's status, state and settings
POST   /v1/rebalance                       rebalance now: 202 and the status
POST   /v1/rebalance?dry_run=1             the next round's plan, nothing moved
GET    /v1/repair                          lost parts, repairs under way and done
POST   /v1/repair                          look for lost parts now: 202 and the status
"""

from __future__ import annotations

import time

from quart import Response, jsonify, request
from quart_trio import QuartTrio

from karma8.actors.discovery import Discovery
from karma8.actors.rebalancer import Rebalancer
from karma8.actors.repair import Repairer
from karma8.core.access import parse_right
from karma8.core.errors import InvalidRequest
from karma8.core.model import NodeRegistration, PartReceipt, PlaceRequest
from karma8.core.rebalance_report import (
    RebalanceReport,
    RebalanceSettings,
    rebalance_state,
    summarize_plan,
)
from karma8.core.status import ClusterStatus
from karma8.net.codec import decode, encode
from karma8.net.common import (
    challenge,
    create_app,
    int_arg,
    json_body,
    only_args,
    secret_given,
)
from karma8.net.requestlog import RecentErrors
from karma8.net.status_page import render_status

# What ?dry_run= accepts, and what it means.
_FLAGS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


NAMESPACE_FIELDS = frozenset({"public", "engine", "copies", "parity"})  # PUT /v1/namespaces/…


def discovery_app(
    discovery: Discovery,
    *,
    secret: str | None,
    rebalancer: Rebalancer,
    repairer: Repairer,
    recent_errors: RecentErrors | None = None,
) -> QuartTrio:
    """Discovery's routes; ``rebalancer`` and ``repairer`` are the ones running beside it in
    this process, ``recent_errors`` what the status view shows of the process's log."""
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
        return jsonify(encode(version)), 201

    @app.route("/v1/placements", methods=["POST"])
    async def place() -> tuple[Response, int]:
        request = decode(await json_body(), PlaceRequest)
        version = await discovery.place_upload(
            namespace=request.namespace,
            name=request.name,
            size=request.size,
            if_absent=request.if_absent,
        )
        return jsonify(encode(version)), 201

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
            receipts=[decode(r, PartReceipt) for r in receipts],
            if_absent=bool(body.get("if_absent", False)),
        )
        return jsonify(encode(version))

    @app.route("/v1/uploads/<version_id>/abort", methods=["POST"])
    async def abort(version_id: str) -> Response:
        return jsonify(encode(await discovery.abort_upload(version_id=version_id)))

    @app.route("/v1/uploads/<version_id>/parts/<int:index>/replace", methods=["POST"])
    async def replace_part(version_id: str, index: int) -> Response:
        failed = (await json_body()).get("failed_node_id")
        if not isinstance(failed, str) or not failed:
            raise InvalidRequest("failed_node_id must be a node id")
        placement = await discovery.replace_part(
            version_id=version_id, index=index, failed_node_id=failed
        )
        return jsonify(encode(placement))

    @app.route("/v1/uploads/<version_id>/extend", methods=["POST"])
    async def extend(version_id: str) -> Response:
        size = (await json_body()).get("size")
        if not isinstance(size, int) or isinstance(size, bool):
            raise InvalidRequest("size must be an integer")
        await discovery.extend_upload(version_id=version_id, size=size)
        return jsonify({})

    @app.route("/v1/files/<namespace>/<path:name>", methods=["GET"])
    async def resolve(namespace: str, name: str) -> Response:
        return jsonify(encode(await discovery.resolve(namespace=namespace, name=name)))

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
        return jsonify({"files": [encode(e) for e in entries]})

    @app.route("/v1/namespaces", methods=["GET"])
    async def list_namespaces() -> Response:
        namespaces = await discovery.list_namespaces()
        return jsonify({"namespaces": [encode(n) for n in namespaces]})

    @app.route("/v1/namespaces/<namespace>", methods=["PUT"])
    async def create_namespace(namespace: str) -> Response:
        # No body: the defaults. A body that is not the JSON object of these fields is a 400,
        # never a namespace made with defaults it did not ask for (it is for good).
        body = await json_body() if (await request.get_data()).strip() else {}
        unknown = sorted(set(body) - NAMESPACE_FIELDS)
        if unknown:
            raise InvalidRequest(
                f"unknown field {', '.join(unknown)} (known: {', '.join(sorted(NAMESPACE_FIELDS))})"
            )
        public = body.get("public", False)
        if not isinstance(public, bool):
            raise InvalidRequest("public must be true or false")
        engine = body.get("engine", "raid0")
        if not isinstance(engine, str):
            raise InvalidRequest("engine must be raid0, raid1 or parity")
        copies, parity = body.get("copies"), body.get("parity")
        for field, value in (("copies", copies), ("parity", parity)):
            if value is not None and (type(value) is not int):
                raise InvalidRequest(f"{field} must be a whole number")
        info = await discovery.create_namespace(
            namespace=namespace, public=public, engine=engine, copies=copies, parity=parity
        )
        return jsonify(encode(info))

    @app.route("/v1/namespaces/<namespace>/disable", methods=["POST"])
    async def disable_namespace(namespace: str) -> Response:
        return jsonify(encode(await discovery.disable_namespace(namespace=namespace)))

    @app.route("/v1/tokens", methods=["POST"])
    async def create_token() -> tuple[Response, int]:
        body = await json_body()
        namespace, read, write = body.get("namespace"), body.get("read"), body.get("write")
        if not isinstance(namespace, str):
            raise InvalidRequest("namespace must be a string")
        if not isinstance(read, bool) or not isinstance(write, bool):
            raise InvalidRequest("read and write must be true or false")
        token, info = await discovery.create_token(namespace=namespace, read=read, write=write)
        return jsonify({"token": token, **encode(info)}), 201

    @app.route("/v1/tokens", methods=["GET"])
    async def list_tokens() -> Response:
        only_args({"namespace"})
        tokens = await discovery.list_tokens(namespace=request.args.get("namespace"))
        return jsonify({"tokens": [encode(t) for t in tokens]})

    @app.route("/v1/tokens/<token_id>/revoke", methods=["POST"])
    async def revoke_token(token_id: str) -> Response:
        return jsonify(encode(await discovery.revoke_token(token_id=token_id)))

    @app.route("/v1/access", methods=["POST"])
    async def check_access() -> tuple[str, int]:
        body = await json_body()
        namespace, token = body.get("namespace"), body.get("token")
        if not isinstance(namespace, str) or not (token is None or isinstance(token, str)):
            raise InvalidRequest("access needs a namespace and a token (or null)")
        right = parse_right(str(body.get("right", "")))
        await discovery.check_access(namespace=namespace, token=token, right=right)
        return "", 204

    @app.route("/v1/nodes", methods=["POST"])
    async def register() -> tuple[str, int]:
        await discovery.register_node(decode(await json_body(), NodeRegistration))
        return "", 204

    @app.route("/v1/nodes/<node_id>/heartbeat", methods=["POST"])
    async def heartbeat(node_id: str) -> Response:
        body = await json_body()
        registration = decode(body.get("registration", {}), NodeRegistration)
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

    @app.route("/v1/nodes/<node_id>/lost-parts", methods=["POST"])
    async def report_lost_parts(node_id: str) -> tuple[str, int]:
        body = await json_body()
        keys, reason = body.get("keys"), body.get("reason", "")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise InvalidRequest("keys must be a list of part keys")
        if not isinstance(reason, str):
            raise InvalidRequest("reason must be a string")
        await discovery.report_lost_parts(node_id=node_id, keys=keys, reason=reason)
        return "", 204

    @app.route("/v1/nodes/<node_id>/parts", methods=["GET"])
    async def expected_parts(node_id: str) -> Response:
        return jsonify({"keys": await discovery.expected_parts(node_id=node_id)})

    @app.route("/v1/nodes/<node_id>/failures", methods=["POST"])
    async def report_failure(node_id: str) -> tuple[str, int]:
        reason = (await json_body()).get("reason", "")
        if not isinstance(reason, str):
            raise InvalidRequest("reason must be a string")
        await discovery.report_node_failure(node_id=node_id, reason=reason)
        return "", 204

    @app.route("/v1/nodes/<node_id>/forget", methods=["POST"])
    async def forget_node(node_id: str) -> Response:
        only_args(set())
        node = await discovery.forget_node(node_id=node_id)
        repairer.request()  # its parts are due now: no wait for the next round
        return jsonify(encode(node))

    @app.route("/v1/nodes", methods=["GET"])
    async def list_nodes() -> Response:
        return jsonify({"nodes": [encode(n) for n in await discovery.list_nodes()]})

    async def report(*, requested: bool = False) -> RebalanceReport:
        status = await rebalancer.status()
        c = rebalancer.config
        return RebalanceReport(
            status=status,
            state=rebalance_state(status, start_pp=c.start_pp, requested=requested),
            settings=RebalanceSettings(
                enabled=c.enabled,
                interval=c.interval,
                start_pp=c.start_pp,
                tolerance_pp=c.tolerance_pp,
                bandwidth=c.bandwidth,
                concurrency=c.concurrency,
            ),
        )

    async def cluster_status() -> ClusterStatus:
        return ClusterStatus(
            time=time.time(),
            nodes=tuple(await discovery.list_nodes()),
            namespaces=tuple(await discovery.list_namespaces()),
            totals=await discovery.totals(),
            rebalance=await report(),
            repair=await repairer.status(),
            recent_errors=recent_errors.latest() if recent_errors is not None else (),
        )

    @app.route("/v1/status", methods=["GET"])
    async def status_json() -> Response:
        only_args(set())
        return jsonify(encode(await cluster_status()))

    @app.route("/status", methods=["GET"])
    async def status_page() -> Response | tuple[Response, int, dict[str, str]]:
        if secret is not None and not secret_given(secret):
            return challenge("the status page needs the cluster secret")
        page = render_status(await cluster_status())
        return Response(page, content_type="text/html; charset=utf-8")

    @app.route("/v1/rebalance", methods=["GET"])
    async def rebalance_status() -> Response:
        only_args(set())
        return jsonify(encode(await report()))

    @app.route("/v1/rebalance", methods=["POST"])
    async def rebalance() -> tuple[Response, int]:
        only_args({"dry_run"})
        raw = request.args.get("dry_run", "0")
        dry_run = _FLAGS.get(raw.strip().lower())
        if dry_run is None:
            raise InvalidRequest(f"dry_run must be 1 or 0 (or true/false), got {raw!r}")
        if not dry_run:
            rebalancer.request()
            return jsonify(encode(await report(requested=True))), 202
        plan = await rebalancer.plan()
        now = await report()
        summary = summarize_plan(
            plan,
            remaining_bytes=now.status.remaining_bytes,
            parts=discovery.config.layout.parts,
        )
        return jsonify({"dry_run": True, **encode(summary), "status": encode(now)}), 200

    @app.route("/v1/repair", methods=["GET"])
    async def repair_status() -> Response:
        only_args(set())
        return jsonify(encode(await repairer.status()))

    @app.route("/v1/repair", methods=["POST"])
    async def repair() -> tuple[Response, int]:
        only_args(set())
        repairer.request()
        return jsonify(encode(await repairer.status())), 202

    return app
