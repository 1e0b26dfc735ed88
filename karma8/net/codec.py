"""JSON forms of the core records and errors, for the internal HTTP APIs.

``encode(record)`` and ``decode(obj, Record)`` are a cattrs converter: a record crosses the
wire as a JSON object whose keys are its attrs field names, enums as their values, tuples as
lists, None as null. Two records write a field's record inline, its keys among their own (a
part placement's ``node``, a rebalance report's ``status``), and a node plan's byte counts end
in ``_bytes``, followed by its fill percentages (rounded; ignored when decoding).

Decoding is strict (an int is not a bool, a float or a string; a list is not any iterable;
only a field with a default may be left out) so a malformed message from a peer is an
``InvalidRequest`` that names the field, never a ``KeyError`` deep inside an actor.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.cols import list_structure_factory
from cattrs.errors import ClassValidationError, IterableValidationError, IterableValidationNote
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from karma8.core.errors import InvalidRequest, Karma8Error
from karma8.core.model import PartPlacement
from karma8.core.rebalance_report import STATES, NodePlan, RebalanceReport

T = TypeVar("T")
Json = dict[str, Any]

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
    "node_conflict": 409,
    "node_forgotten": 409,
    "node_not_gone": 409,
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


def error_body(error: Karma8Error, request_id: str | None = None) -> dict[str, Any]:
    """An error's JSON body, with the request's id where there is one to give."""
    body: dict[str, Any] = {"code": error.code, "message": error.message}
    if request_id is not None:
        body["request_id"] = request_id
    return {"error": body}


def encode(record: Any) -> Json:
    """The JSON object of an attrs record."""
    obj: Json = _json.unstructure(record)
    return obj


def decode(obj: object, cls: type[T]) -> T:
    """The ``cls`` record that ``obj`` (parsed JSON from a peer) holds; raises InvalidRequest."""
    try:
        return _json.structure(obj, cls)
    except (cattrs.BaseValidationError, _Malformed) as exc:
        raise InvalidRequest(f"malformed {cls.__name__}: {'; '.join(_problems(exc))}") from None


class _Malformed(TypeError):
    """A JSON value of the wrong kind; the message says what was expected."""


def _problems(exc: BaseException, path: str = "") -> list[str]:
    """``path: what is wrong`` for each error under ``exc`` (cattrs groups them by record and
    list), the path in JSON keys: renamed keys as on the wire, no step into an inline field."""
    if not isinstance(exc, ClassValidationError | IterableValidationError):
        what = "missing" if isinstance(exc, KeyError) else str(exc)
        return [f"{path.lstrip('.')}: {what}" if path else what]
    with_notes, without = exc.group_exceptions()
    problems = [p for sub in without for p in _problems(sub, path)]
    for sub, note in with_notes:
        if isinstance(note, IterableValidationNote):
            step = f"[{note.index}]"
        elif note.name == _INLINE.get(exc.cl):
            step = ""
        else:
            step = "." + _KEYS.get(exc.cl, {}).get(note.name, note.name)
        problems += _problems(sub, path + step)
    return problems


def _exactly(kind: type, expected: str) -> Any:
    def structure(value: object, _: object) -> object:
        if type(value) is kind:  # not isinstance: True is not an int
            return value
        raise _Malformed(f"expected {expected}")

    return structure


def _number(value: object, _: object) -> float:
    if type(value) is float or type(value) is int:
        return float(value)
    raise _Malformed("expected a number")


def _state(value: object, _: object) -> str:
    if type(value) is str and value in STATES:
        return value
    raise _Malformed(f"expected one of {', '.join(STATES)}")


_json = cattrs.Converter(unstruct_collection_overrides={tuple: list})
for _kind, _expected in [(str, "a string"), (int, "an integer"), (bool, "true or false")]:
    _json.register_structure_hook(_kind, _exactly(_kind, _expected))
_json.register_structure_hook(float, _number)

# Records that write a field's record inline, and attributes whose key is not their name.
_INLINE: dict[type, str] = {PartPlacement: "node", RebalanceReport: "status"}
_KEYS: dict[type, dict[str, str]] = {
    NodePlan: {f: f"{f}_bytes" for f in ("capacity", "live", "target", "after")}
}
_OVERRIDES: dict[type, dict[str, Any]] = {
    NodePlan: {name: override(rename=key) for name, key in _KEYS[NodePlan].items()},
    RebalanceReport: {"state": override(struct_hook=_state)},
}


def _origin(t: Any) -> object:
    return typing.get_origin(t)


@_json.register_structure_hook_factory(
    lambda t: _origin(t) in (typing.Union, types.UnionType) and type(None) in typing.get_args(t)
)
def _structure_optional(t: Any, converter: cattrs.Converter) -> Any:
    """``X | None`` (cattrs's own hook would look X's hook up on every call)."""
    (inner,) = (arg for arg in typing.get_args(t) if arg is not type(None))
    structure = converter.get_structure_hook(inner)
    return lambda value, _: None if value is None else structure(value, inner)


@_json.register_structure_hook_factory(lambda t: _origin(t) is tuple)
def _structure_tuple(t: Any, converter: cattrs.Converter) -> Any:
    items = list_structure_factory(t, converter)

    def structure(value: object, _: object) -> Any:
        if type(value) is not list:  # not any iterable: a string or an object
            raise _Malformed("expected a list")
        return tuple(items(value, t))

    return structure


@_json.register_structure_hook_factory(attrs.has)
def _structure_record(cls: type, converter: cattrs.Converter) -> Any:
    structure: Callable[[Json, type], Any] = make_dict_structure_fn(
        cls, converter, **_OVERRIDES.get(cls, {})
    )
    inline = _INLINE.get(cls)

    def structure_record(obj: object, _: object) -> Any:
        if type(obj) is not dict:
            raise _Malformed("expected an object")
        return structure({**obj, inline: obj} if inline else obj, cls)

    return structure_record


# The unstructure functions are cattrs's, but for the records whose JSON is not their fields.


def _unstructure_placement(p: PartPlacement) -> Json:
    """Written out: the node's keys go between the key and the size, and this is the hot path
    (every discovery answer holds a version's placements; flattening cattrs's dict costs 3x);
    ``reported_lost`` only where set."""
    node = p.node
    out: Json = {
        "index": p.index,
        "key": p.key,
        "node_id": node.node_id,
        "url": node.url,
        "size": p.size,
        "checksum": p.checksum,
    }
    if p.reported_lost is not None:  # rare: only then on the wire
        out["reported_lost"] = p.reported_lost
    return out


_report_rest = make_dict_unstructure_fn(RebalanceReport, _json, status=override(omit=True))
_node_plan_bytes = make_dict_unstructure_fn(NodePlan, _json, **_OVERRIDES[NodePlan])


def _unstructure_report(report: RebalanceReport) -> Json:
    return {**_json.unstructure(report.status), **_report_rest(report)}


def _unstructure_node_plan(plan: NodePlan) -> Json:
    return {
        **_node_plan_bytes(plan),
        "fill_percent": round(plan.fill_percent, 3),
        "target_percent": round(plan.target_percent, 3),
        "fill_after_percent": round(plan.after_percent, 3),
    }


_json.register_unstructure_hook(PartPlacement, _unstructure_placement)
_json.register_unstructure_hook(RebalanceReport, _unstructure_report)
_json.register_unstructure_hook(NodePlan, _unstructure_node_plan)
