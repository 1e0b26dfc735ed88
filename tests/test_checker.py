"""The checker catches broken behaviour (so a green scenario means something)."""

from __future__ import annotations

from pathlib import Path

import pytest

from karma8.actors.gateway import Gateway
from karma8.core.model import FileVersion
from karma8.sim.runner import run_scenario
from karma8.sim.scenario import load_scenario
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


def test_a_gateway_that_does_not_clean_up_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_clean_up(
        self: Gateway, version: FileVersion, *, commit_attempted: bool
    ) -> FileVersion | None:
        return None

    monkeypatch.setattr(Gateway, "_clean_up", no_clean_up)
    result = run_scenario(load_scenario(ROOT / "scenarios" / "failed_write.toml"))
    assert not result.ok
    assert result.invariants["no_orphan_parts"] is False
