"""The checker catches broken behaviour (so a green scenario means something)."""

from __future__ import annotations

from pathlib import Path

from karma8.sim.monitor import FaultTimeline
from karma8.sim.workload import History, Op, read_violation

ROOT = Path(__file__).resolve().parent.parent


def history(*ops: Op) -> History:
    h = History()
    for op in ops:
        h.add(op)
    return h


def put(value: str, start: float, end: float, ok: bool = True) -> Op:
    return Op(kind="put", name="f", start=start, end=end, value=value, ok=ok)


def get(value: str | None, start: float, end: float) -> Op:
    return Op(kind="get", name="f", start=start, end=end, value=value, ok=True)


def test_read_of_bytes_nobody_wrote_is_a_violation() -> None:
    h = history(put("a", 0, 1))
    assert read_violation(h, get("torn", 2, 3)) is not None
    assert read_violation(h, get("a", 2, 3)) is None


def test_stale_read_after_a_completed_overwrite_is_a_violation() -> None:
    h = history(put("a", 0, 1), put("b", 2, 3))
    assert read_violation(h, get("a", 4, 5)) is not None
    assert read_violation(h, get("b", 4, 5)) is None
    # Concurrent with the overwrite, either value is fine.
    assert read_violation(h, get("a", 2.5, 2.6)) is None


def test_failed_put_must_never_be_visible_and_not_found_only_before_writes() -> None:
    h = history(put("a", 0, 1), put("b", 2, 3, ok=False))
    assert read_violation(h, get("b", 4, 5)) is not None
    assert read_violation(h, get(None, 4, 5)) is not None
    assert read_violation(h, get(None, 0.5, 0.7)) is None


def test_a_fault_explains_what_overlaps_it_on_the_actors_it_touched() -> None:
    timeline = FaultTimeline()
    timeline.add("crash", 1.0, 2.0, ["node-a"])
    timeline.add("partition", 5.0, 6.0, ["gateway", "node-b"])
    timeline.add("lossy_link", 8.0, 9.0, ["node-c", "*"])
    breaks = frozenset({"crash", "partition", "lossy_link"})
    assert timeline.touches(1.5, 3.0, {"node-a"}, breaks) is not None
    assert timeline.touches(2.5, 3.0, {"node-a"}, breaks) is None  # after it
    assert timeline.touches(1.5, 3.0, {"node-b"}, breaks) is None  # another node
    assert timeline.touches(1.5, 3.0, {"*"}, breaks) is not None  # any actor
    assert timeline.touches(1.5, 3.0, {"node-a"}, frozenset({"disk_full"})) is None
    assert timeline.touches(8.5, 8.6, {"node-z"}, breaks) is not None  # "*" is everyone


def test_a_link_is_broken_by_a_crash_of_either_end_or_a_fault_between_them() -> None:
    timeline = FaultTimeline()
    timeline.add("crash", 1.0, 2.0, ["discovery"])
    timeline.add("partition", 5.0, 6.0, ["gateway", "node-b"])
    timeline.add("lossy_link", 8.0, 9.0, ["node-c", "*"])
    timeline.add("slow_link", 10.0, 11.0, ["gateway", "discovery"])
    assert timeline.link_broken(0.0, 1.5, "gateway", "discovery")
    assert timeline.link_broken(5.5, 7.0, "gateway", "node-b")
    assert not timeline.link_broken(5.5, 7.0, "gateway", "node-a")
    assert not timeline.link_broken(5.5, 7.0, "discovery", "node-b")  # not their link
    assert timeline.link_broken(8.5, 8.6, "gateway", "node-c")
    assert not timeline.link_broken(10.0, 11.0, "gateway", "discovery")  # only slow
