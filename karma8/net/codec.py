"""JSON forms of the core records and errors, for the internal HTTP APIs.

Every record crosses the wire as a plain JSON object whose keys are the attrs field names;
decoding validates types, so a malformed message from a peer is an ``InvalidRequest``, never a
``KeyError`` deep inside an actor.
"""

from __future__ import annotations

from typing import Any

from karma8.core.access import NamespaceInfo, TokenInfo
from karma8.core.errors import InvalidRequest, Karma8Error
from karma8.core.layout import StripeLayout
from karma8.core.model import (
    FileEntry,
    FileVersion,
    NodeRef,
    NodeRegistration,
    NodeState,
    NodeStatus,
    PartPlacement,
    PartReceipt,
    RebalanceStatus,
    VersionState,
)
from karma8.core.rebalance_report import (
    STATES,
    NodePlan,
    PlanSummary,
    RebalanceReport,
    RebalanceSettings,
)
from karma8.ports import StoredPart

# What each error code means at the HTTP edge.
STATUS_BY_CODE: dict[str, int] = {
    "not_found": 404,
    "invalid_name": 400,
    "invalid_request": 400,
    "too_large": 413,
    "unauthorized": 401,
    "forbidden": 403,
    "precondition_failed": 412,
    "range_not_satisfiable": 416,
    "upload_conflict": 409,
    "move_conflict": 409,
    "not_enough_nodes": 503,
    "storage_failure": 502,
    "integrity_error": 502,
    "unavailable": 503,
    "disk_full": 507,
    "internal": 500,
}


def error_status(error: Karma8Error) -> int:
    return STATUS_BY_CODE.get(error.code, 500)


def error_headers(error: Karma8Error) -> list[tuple[bytes, bytes]]:
    """Headers an error's response carries: a 401 names the scheme it wants (RFC 6750)."""
    if error.code == "unauthorized":
        return [(b"www-authenticate", b'Bearer realm="karma8"')]
    return []


def error_body(error: Karma8Error) -> dict[str, Any]:
    return {"error": {"code": error.code, "message": error.message}}


Json = dict[str, Any]


def _get(obj: Json, key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
    if not isinstance(obj, dict):
        raise InvalidRequest("expected a JSON object")
    value = obj.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise InvalidRequest(f"field {key!r} must be a number")
    if not isinstance(value, kind):
        raise InvalidRequest(f"field {key!r} is missing or has the wrong type")
    return value


def encode_layout(layout: StripeLayout) -> Json:
    return {"parts": layout.parts, "unit": layout.unit}


def decode_layout(obj: Json) -> StripeLayout:
    try:
        return StripeLayout(parts=_get(obj, "parts", int), unit=_get(obj, "unit", int))
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def encode_placement(p: PartPlacement) -> Json:
    return {
        "index": p.index,
        "key": p.key,
        "node_id": p.node.node_id,
        "url": p.node.url,
        "size": p.size,
        "checksum": p.checksum,
    }


def decode_placement(obj: Json) -> PartPlacement:
    return PartPlacement(
        index=_get(obj, "index", int),
        key=_get(obj, "key", str),
        node=NodeRef(node_id=_get(obj, "node_id", str), url=_get(obj, "url", str)),
        size=_get(obj, "size", int, optional=True),
        checksum=_get(obj, "checksum", str, optional=True),
    )


def encode_version(v: FileVersion) -> Json:
    return {
        "version_id": v.version_id,
        "namespace": v.namespace,
        "name": v.name,
        "state": v.state.value,
        "size": v.size,
        "layout": encode_layout(v.layout),
        "parts": [encode_placement(p) for p in v.parts],
        "created_at": v.created_at,
        "committed_at": v.committed_at,
        "etag": v.etag,
    }


def decode_version(obj: Json) -> FileVersion:
    try:
        state = VersionState(_get(obj, "state", str))
    except ValueError:
        raise InvalidRequest("unknown version state") from None
    return FileVersion(
        version_id=_get(obj, "version_id", str),
        namespace=_get(obj, "namespace", str),
        name=_get(obj, "name", str),
        state=state,
        size=_get(obj, "size", int, optional=True),
        layout=decode_layout(_get(obj, "layout", dict)),
        parts=tuple(decode_placement(p) for p in _get(obj, "parts", list)),
        created_at=float(_get(obj, "created_at", (int, float))),
        committed_at=_get(obj, "committed_at", (int, float), optional=True),
        etag=_get(obj, "etag", str, optional=True),
    )


def encode_receipt(r: PartReceipt) -> Json:
    return {"index": r.index, "size": r.size, "checksum": r.checksum}


def decode_receipt(obj: Json) -> PartReceipt:
    return PartReceipt(
        index=_get(obj, "index", int),
        size=_get(obj, "size", int),
        checksum=_get(obj, "checksum", str),
    )


def encode_registration(r: NodeRegistration) -> Json:
    return {
        "node_id": r.node_id,
        "url": r.url,
        "capacity_bytes": r.capacity_bytes,
        "disk_used_bytes": r.disk_used_bytes,
    }


def decode_registration(obj: Json) -> NodeRegistration:
    return NodeRegistration(
        node_id=_get(obj, "node_id", str),
        url=_get(obj, "url", str),
        capacity_bytes=_get(obj, "capacity_bytes", int),
        disk_used_bytes=_get(obj, "disk_used_bytes", int),
    )


def encode_node(n: NodeStatus) -> Json:
    return {
        "node_id": n.node_id,
        "url": n.url,
        "state": n.state.value,
        "capacity_bytes": n.capacity_bytes,
        "used_bytes": n.used_bytes,
        "reserved_bytes": n.reserved_bytes,
        "parts": n.parts,
        "last_seen": n.last_seen,
        "failed_at": n.failed_at,
    }


def decode_node(obj: Json) -> NodeStatus:
    try:
        state = NodeState(_get(obj, "state", str))
    except ValueError:
        raise InvalidRequest("unknown node state") from None
    return NodeStatus(
        node_id=_get(obj, "node_id", str),
        url=_get(obj, "url", str),
        state=state,
        capacity_bytes=_get(obj, "capacity_bytes", int),
        used_bytes=_get(obj, "used_bytes", int),
        reserved_bytes=_get(obj, "reserved_bytes", int),
        parts=_get(obj, "parts", int),
        last_seen=float(_get(obj, "last_seen", (int, float))),
        failed_at=_get(obj, "failed_at", (int, float), optional=True),
    )


def encode_entry(e: FileEntry) -> Json:
    return {"name": e.name, "size": e.size, "etag": e.etag, "committed_at": e.committed_at}


def decode_entry(obj: Json) -> FileEntry:
    return FileEntry(
        name=_get(obj, "name", str),
        size=_get(obj, "size", int),
        etag=_get(obj, "etag", str),
        committed_at=float(_get(obj, "committed_at", (int, float))),
    )


def encode_stored(s: StoredPart) -> Json:
    return {"key": s.key, "size": s.size, "checksum": s.checksum}


def decode_stored(obj: Json) -> StoredPart:
    return StoredPart(
        key=_get(obj, "key", str),
        size=_get(obj, "size", int),
        checksum=_get(obj, "checksum", str),
    )


def _number(obj: Json, key: str, *, optional: bool = False) -> Any:
    value = _get(obj, key, (int, float), optional=optional)
    return None if value is None else float(value)


def encode_status(s: RebalanceStatus) -> Json:
    return {
        "spread_pp": s.spread_pp,
        "imbalance_pp": s.imbalance_pp,
        "remaining_bytes": s.remaining_bytes,
        "moving_bytes": s.moving_bytes,
        "moving_parts": s.moving_parts,
        "moved_bytes": s.moved_bytes,
        "moved_parts": s.moved_parts,
        "rate_bytes_per_s": s.rate_bytes_per_s,
        "eta_seconds": s.eta_seconds,
        "active": s.active,
    }


def decode_status(obj: Json) -> RebalanceStatus:
    return RebalanceStatus(
        spread_pp=_number(obj, "spread_pp"),
        imbalance_pp=_number(obj, "imbalance_pp"),
        remaining_bytes=_get(obj, "remaining_bytes", int),
        moving_bytes=_get(obj, "moving_bytes", int),
        moving_parts=_get(obj, "moving_parts", int),
        moved_bytes=_get(obj, "moved_bytes", int),
        moved_parts=_get(obj, "moved_parts", int),
        rate_bytes_per_s=_number(obj, "rate_bytes_per_s"),
        eta_seconds=_number(obj, "eta_seconds", optional=True),
        active=_get(obj, "active", bool),
    )


def encode_report(r: RebalanceReport) -> Json:
    """The status's fields at the top level, then ``state`` and ``settings``."""
    s = r.settings
    settings = {
        "enabled": s.enabled,
        "interval": s.interval,
        "start_pp": s.start_pp,
        "tolerance_pp": s.tolerance_pp,
        "bandwidth": s.bandwidth,
        "concurrency": s.concurrency,
    }
    return {**encode_status(r.status), "state": r.state, "settings": settings}


def decode_report(obj: Json) -> RebalanceReport:
    state = _get(obj, "state", str)
    if state not in STATES:
        raise InvalidRequest(f"unknown rebalancing state {state!r}")
    s = _get(obj, "settings", dict)
    return RebalanceReport(
        status=decode_status(obj),
        state=state,
        settings=RebalanceSettings(
            enabled=_get(s, "enabled", bool),
            interval=_number(s, "interval"),
            start_pp=_number(s, "start_pp"),
            tolerance_pp=_number(s, "tolerance_pp"),
            bandwidth=_number(s, "bandwidth"),
            concurrency=_get(s, "concurrency", int),
        ),
    )


def encode_node_plan(n: NodePlan) -> Json:
    return {
        "node_id": n.node_id,
        "capacity_bytes": n.capacity,
        "live_bytes": n.live,
        "target_bytes": n.target,
        "after_bytes": n.after,
        "fill_percent": round(n.fill_percent, 3),
        "target_percent": round(n.target_percent, 3),
        "fill_after_percent": round(n.after_percent, 3),
    }


def decode_node_plan(obj: Json) -> NodePlan:
    return NodePlan(
        node_id=_get(obj, "node_id", str),
        capacity=_get(obj, "capacity_bytes", int),
        live=_get(obj, "live_bytes", int),
        target=_get(obj, "target_bytes", int),
        after=_get(obj, "after_bytes", int),
    )


def encode_plan(p: PlanSummary) -> Json:
    return {
        "nodes": [encode_node_plan(n) for n in p.nodes],
        "moves": p.moves,
        "move_bytes": p.move_bytes,
        "remaining_bytes": p.remaining_bytes,
        "spread_pp": p.spread_pp,
        "spread_after_pp": p.spread_after_pp,
    }


def decode_plan(obj: Json) -> PlanSummary:
    return PlanSummary(
        nodes=tuple(decode_node_plan(n) for n in _get(obj, "nodes", list)),
        moves=_get(obj, "moves", int),
        move_bytes=_get(obj, "move_bytes", int),
        remaining_bytes=_get(obj, "remaining_bytes", int),
        spread_pp=_number(obj, "spread_pp"),
        spread_after_pp=_number(obj, "spread_after_pp"),
    )


def encode_namespace(n: NamespaceInfo) -> Json:
    return {"name": n.name, "public": n.public, "enabled": n.enabled, "created_at": n.created_at}


def decode_namespace(obj: Json) -> NamespaceInfo:
    return NamespaceInfo(
        name=_get(obj, "name", str),
        public=_get(obj, "public", bool),
        enabled=_get(obj, "enabled", bool),
        created_at=float(_get(obj, "created_at", (int, float))),
    )


def encode_token(t: TokenInfo) -> Json:
    """A token's record: never its secret."""
    return {
        "token_id": t.token_id,
        "namespace": t.namespace,
        "read": t.read,
        "write": t.write,
        "created_at": t.created_at,
        "revoked_at": t.revoked_at,
    }


def decode_token(obj: Json) -> TokenInfo:
    return TokenInfo(
        token_id=_get(obj, "token_id", str),
        namespace=_get(obj, "namespace", str),
        read=_get(obj, "read", bool),
        write=_get(obj, "write", bool),
        created_at=float(_get(obj, "created_at", (int, float))),
        revoked_at=_get(obj, "revoked_at", (int, float), optional=True),
    )
