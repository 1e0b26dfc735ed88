"""The internal APIs' JSON: the wire form of every record is pinned, decoding inverts encoding,
and malformed input is an InvalidRequest that names the field."""

from __future__ import annotations

import enum
import json
import types
import typing
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from karma8.core.errors import InvalidRequest
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
    PlaceRequest,
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
from karma8.net import codec
from karma8.ports import StoredPart

RECORD_TYPES = [
    StripeLayout,
    PartPlacement,
    FileVersion,
    PartReceipt,
    PlaceRequest,
    NodeRegistration,
    NodeStatus,
    FileEntry,
    StoredPart,
    RebalanceStatus,
    RebalanceReport,
    NodePlan,
    PlanSummary,
]
encode, decode = codec.encode, codec.decode


NODE = NodeRef(node_id="n1", url="http://127.0.0.1:9001")
PLACEMENT = PartPlacement(index=0, key="v1.0", node=NODE, size=3, checksum="crc:1")
PENDING = PartPlacement(index=1, key="v1.1", node=NODE)
VERSION = FileVersion(
    version_id="v1",
    namespace="default",
    name="docs/a.txt",
    state=VersionState.COMMITTED,
    size=11,
    layout=StripeLayout(parts=5, unit=4096),
    parts=(PLACEMENT, PENDING),
    created_at=1.5,
    committed_at=2.25,
    etag='"abc"',
)
STATUS = RebalanceStatus(
    spread_pp=12.5,
    imbalance_pp=3.0,
    remaining_bytes=100,
    moving_bytes=10,
    moving_parts=1,
    moved_bytes=50,
    moved_parts=5,
    rate_bytes_per_s=2.5,
    eta_seconds=None,
    active=True,
)
SETTINGS = RebalanceSettings(
    enabled=True, interval=30.0, start_pp=10.0, tolerance_pp=2.0, bandwidth=0.0, concurrency=4
)
NODE_PLAN = NodePlan(node_id="n1", capacity=3000, live=1000, target=1500, after=1400)

PLACEMENT_JSON = (
    '{"index": 0, "key": "v1.0", "node_id": "n1", "url": "http://127.0.0.1:9001", "size": 3,'
    ' "checksum": "crc:1"}'
)
PENDING_JSON = (
    '{"index": 1, "key": "v1.1", "node_id": "n1", "url": "http://127.0.0.1:9001", "size": null,'
    ' "checksum": null}'
)
STATUS_JSON = (
    '"spread_pp": 12.5, "imbalance_pp": 3.0, "remaining_bytes": 100, "moving_bytes": 10,'
    ' "moving_parts": 1, "moved_bytes": 50, "moved_parts": 5, "rate_bytes_per_s": 2.5,'
    ' "eta_seconds": null, "active": true'
)
NODE_PLAN_JSON = (
    '{"node_id": "n1", "capacity_bytes": 3000, "live_bytes": 1000, "target_bytes": 1500,'
    ' "after_bytes": 1400, "fill_percent": 33.333, "target_percent": 50.0,'
    ' "fill_after_percent": 46.667}'
)

# Each record as the current peers put it on the wire: keys, their order, value types, nulls.
PINNED: list[tuple[Any, str]] = [
    (
        StripeLayout(parts=5, unit=4096),
        '{"parts": 5, "unit": 4096, "copies": 1, "parity": 0}',
    ),
    (PLACEMENT, PLACEMENT_JSON),
    (PENDING, PENDING_JSON),
    (
        VERSION,
        '{"version_id": "v1", "namespace": "default", "name": "docs/a.txt", "state": "committed",'
        ' "size": 11, "layout": {"parts": 5, "unit": 4096, "copies": 1, "parity": 0},'
        f' "parts": [{PLACEMENT_JSON}, {PENDING_JSON}], "created_at": 1.5, "committed_at": 2.25,'
        ' "etag": "\\"abc\\""}',
    ),
    (
        attrs.evolve(VERSION, state=VersionState.PENDING, size=None, parts=(), committed_at=None),
        '{"version_id": "v1", "namespace": "default", "name": "docs/a.txt", "state": "pending",'
        ' "size": null, "layout": {"parts": 5, "unit": 4096, "copies": 1, "parity": 0},'
        ' "parts": [], "created_at": 1.5, "committed_at": null, "etag": "\\"abc\\""}',
    ),
    (
        PartReceipt(index=2, size=7, checksum="crc:2"),
        '{"index": 2, "size": 7, "checksum": "crc:2"}',
    ),
    (
        NodeRegistration(node_id="n1", url="http://h:1", capacity_bytes=1 << 30, place="h:2:3"),
        '{"node_id": "n1", "url": "http://h:1", "capacity_bytes": 1073741824,'
        ' "disk_used_bytes": 0, "place": "h:2:3"}',
    ),
    (
        NodeStatus(
            node_id="n1",
            url="http://h:1",
            state=NodeState.SUSPECT,
            capacity_bytes=100,
            used_bytes=10,
            reserved_bytes=5,
            parts=3,
            last_seen=7.0,
            failed_at=6.5,
        ),
        '{"node_id": "n1", "url": "http://h:1", "state": "suspect", "capacity_bytes": 100,'
        ' "used_bytes": 10, "reserved_bytes": 5, "parts": 3, "last_seen": 7.0, "failed_at": 6.5,'
        ' "forgotten_at": null}',
    ),
    (
        NodeStatus(
            node_id="n2",
            url="http://h:2",
            state=NodeState.AVAILABLE,
            capacity_bytes=0,
            used_bytes=0,
            reserved_bytes=0,
            parts=0,
            last_seen=0.0,
        ),
        '{"node_id": "n2", "url": "http://h:2", "state": "available", "capacity_bytes": 0,'
        ' "used_bytes": 0, "reserved_bytes": 0, "parts": 0, "last_seen": 0.0,'
        ' "failed_at": null, "forgotten_at": null}',
    ),
    (
        FileEntry(name="a", size=1, etag='"e"', committed_at=3.0),
        '{"name": "a", "size": 1, "etag": "\\"e\\"", "committed_at": 3.0}',
    ),
    (
        StoredPart(key="v1.0", size=3, checksum="crc:1"),
        '{"key": "v1.0", "size": 3, "checksum": "crc:1"}',
    ),
    (STATUS, "{" + STATUS_JSON + "}"),
    (
        attrs.evolve(STATUS, eta_seconds=40.0, active=False),
        "{" + STATUS_JSON.replace('"eta_seconds": null', '"eta_seconds": 40.0')[:-4] + "false}",
    ),
    (
        RebalanceReport(status=STATUS, state="balanced", settings=SETTINGS),
        "{" + STATUS_JSON + ', "state": "balanced", "settings": {"enabled": true,'
        ' "interval": 30.0, "start_pp": 10.0, "tolerance_pp": 2.0, "bandwidth": 0.0,'
        ' "concurrency": 4}}',
    ),
    (NODE_PLAN, NODE_PLAN_JSON),
    (
        PlanSummary(
            nodes=(NODE_PLAN,),
            moves=2,
            move_bytes=400,
            remaining_bytes=500,
            spread_pp=20.0,
            spread_after_pp=4.5,
        ),
        f'{{"nodes": [{NODE_PLAN_JSON}], "moves": 2, "move_bytes": 400, "remaining_bytes": 500,'
        ' "spread_pp": 20.0, "spread_after_pp": 4.5}',
    ),
    (
        PlaceRequest(namespace="default", name="docs/a.txt", size=11),
        '{"namespace": "default", "name": "docs/a.txt", "size": 11, "if_absent": false}',
    ),
    (
        StripeLayout(parts=5, unit=4096, parity=2),
        '{"parts": 5, "unit": 4096, "copies": 1, "parity": 2}',
    ),
]


def test_every_record_type_is_pinned() -> None:
    assert {type(record) for record, _ in PINNED} == set(RECORD_TYPES)


@pytest.mark.parametrize(("record", "wire"), PINNED)
def test_the_wire_form_is_pinned(record: Any, wire: str) -> None:
    # json.dumps keeps key order and tells 1 from 1.0 and null from a missing key.
    assert json.dumps(encode(record)) == wire
    assert decode(json.loads(wire), type(record)) == record


def test_a_registration_of_a_node_that_names_no_place_decodes() -> None:
    # An older node's: discovery then compares no place for it (NodeConflict).
    wire = {"node_id": "n1", "url": "http://h:1", "capacity_bytes": 1, "disk_used_bytes": 0}
    assert decode(wire, NodeRegistration).place is None


def test_whole_numbers_decode_as_floats() -> None:
    wire = json.loads(PINNED[3][1]) | {"created_at": 2, "committed_at": 3}
    version = decode(wire, FileVersion)
    assert (version.created_at, version.committed_at) == (2.0, 3.0)
    assert type(version.created_at) is float


# --- round trips ------------------------------------------------------------------------------

_SPECIAL: dict[tuple[type, str], st.SearchStrategy[Any]] = {
    (StripeLayout, "parts"): st.integers(1, 64),
    (StripeLayout, "unit"): st.integers(1, 1 << 40),
    (StripeLayout, "copies"): st.just(1),
    (StripeLayout, "parity"): st.integers(0, 2),
    (RebalanceReport, "state"): st.sampled_from(STATES),
}


def _values(hint: Any) -> st.SearchStrategy[Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return st.one_of(*(_values(a) for a in args))
    if origin is tuple:
        return st.lists(_values(args[0]), max_size=6).map(tuple)
    if hint is type(None):
        return st.none()
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.integers(-(1 << 62), 1 << 62)
    if hint is float:
        return st.floats(allow_nan=False, allow_infinity=False)
    if hint is str:
        return st.text(max_size=20)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return st.sampled_from(hint)
    return records(hint)


def records(cls: type[Any]) -> st.SearchStrategy[Any]:
    """Any instance of the attrs record ``cls``, every field drawn from its annotation."""
    hints = typing.get_type_hints(cls)
    fields = {
        f.name: _SPECIAL[cls, f.name] if (cls, f.name) in _SPECIAL else _values(hints[f.name])
        for f in attrs.fields(cls)
    }
    return st.builds(cls, **fields)


@pytest.mark.parametrize("cls", RECORD_TYPES, ids=lambda c: c.__name__)
@given(data=st.data())
def test_decoding_inverts_encoding(cls: type[Any], data: st.DataObject) -> None:
    record = data.draw(records(cls))
    assert decode(json.loads(json.dumps(encode(record))), cls) == record


# --- malformed input --------------------------------------------------------------------------


def _wire(index: int) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(PINNED[index][1])
    return loaded


@pytest.mark.parametrize(
    ("cls", "obj", "field"),
    [
        (FileVersion, _wire(3) | {"state": "lost"}, "state"),
        (FileVersion, _wire(3) | {"state": 1}, "state"),
        (FileVersion, _wire(3) | {"version_id": 7}, "version_id"),
        (FileVersion, _wire(3) | {"size": "11"}, "size"),
        (FileVersion, _wire(3) | {"size": 1.5}, "size"),
        (FileVersion, _wire(3) | {"size": True}, "size"),
        (FileVersion, _wire(3) | {"created_at": "1.5"}, "created_at"),
        (FileVersion, _wire(3) | {"created_at": False}, "created_at"),
        (FileVersion, _wire(3) | {"committed_at": "x"}, "committed_at"),
        (FileVersion, _wire(3) | {"parts": {"0": {}}}, "parts"),
        (FileVersion, _wire(3) | {"parts": "ab"}, "parts"),
        (FileVersion, _wire(3) | {"layout": {"parts": 0, "unit": 1}}, "parts"),
        (FileVersion, _wire(3) | {"layout": [5, 4096]}, "layout"),
        (FileVersion, {k: v for k, v in _wire(3).items() if k != "name"}, "name"),
        (FileVersion, _wire(3) | {"parts": [_wire(1) | {"size": "3"}]}, "size"),
        (FileVersion, _wire(3) | {"parts": [_wire(1) | {"url": None}]}, "url"),
        (PartPlacement, _wire(1) | {"node_id": 1}, "node_id"),
        (NodeRegistration, _wire(6) | {"capacity_bytes": "big"}, "capacity_bytes"),
        (NodeStatus, _wire(7) | {"state": "gone"}, "state"),
        (PlaceRequest, _wire(len(PINNED) - 1) | {"size": "11"}, "size"),
        (PlaceRequest, {"namespace": "default", "size": 11}, "name"),
        (NodeStatus, _wire(7) | {"last_seen": None}, "last_seen"),
        (RebalanceStatus, _wire(11) | {"active": 1}, "active"),
        (RebalanceReport, _wire(13) | {"state": "asleep"}, "state"),
        (RebalanceReport, _wire(13) | {"settings": None}, "settings"),
        (
            RebalanceReport,
            _wire(13) | {"settings": _wire(13)["settings"] | {"concurrency": 2.5}},
            "concurrency",
        ),
        (PlanSummary, _wire(15) | {"nodes": [_wire(14) | {"live_bytes": None}]}, "live_bytes"),
    ],
)
def test_malformed_input_is_an_invalid_request_naming_the_field(
    cls: type[Any], obj: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidRequest, match=field):
        decode(obj, cls)


@pytest.mark.parametrize("obj", [None, [], "x", 3])
@pytest.mark.parametrize("cls", RECORD_TYPES, ids=lambda c: c.__name__)
def test_anything_but_an_object_is_an_invalid_request(cls: type[Any], obj: Any) -> None:
    with pytest.raises(InvalidRequest):
        decode(obj, cls)
