"""Running trio deterministically: one seed, one schedule, virtual time.

trio randomises the order in which runnable tasks are scheduled (to flush out ordering
assumptions), from a module-level ``random.Random`` in ``trio._core._run``. Seeding that RNG is
not enough: trio only *uses* it deterministically when the ``_ALLOW_DETERMINISTIC_SCHEDULING``
flag is set (its Hypothesis plugin sets it); otherwise it reverses batches by coin flip and
sorts nothing. We set both for the duration of one run and restore them afterwards, and we run
on a :class:`trio.testing.MockClock` with ``autojump_threshold=0`` so that time only moves when
every task is blocked: simulated hours pass in milliseconds and timing is exact.

These are private names, so the trio version is pinned in pyproject.toml and
:func:`check_trio_internals` fails loudly at start-up if they move.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio
import trio.testing
from trio._core import _run as trio_run_module

T = TypeVar("T")

SUPPORTED_TRIO = "0.35.0"


class TrioInternalsChanged(RuntimeError):
    pass


def check_trio_internals() -> None:
    """Assert the scheduler hooks the simulator relies on exist in this trio."""
    missing = [
        name
        for name in ("_ALLOW_DETERMINISTIC_SCHEDULING", "_r")
        if not hasattr(trio_run_module, name)
    ]
    if missing or not isinstance(getattr(trio_run_module, "_r", None), random.Random):
        raise TrioInternalsChanged(
            f"trio {trio.__version__} lacks {missing or ['_r as random.Random']} in"
            f" trio._core._run; the simulator supports trio {SUPPORTED_TRIO}"
        )


def run_deterministic(fn: Callable[[], Awaitable[T]], *, seed: int) -> T:
    """``trio.run(fn)`` with a seeded, deterministic scheduler and an autojumping clock."""
    check_trio_internals()
    module = trio_run_module
    saved_flag = module._ALLOW_DETERMINISTIC_SCHEDULING
    saved_state = module._r.getstate()
    module._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
    module._r.seed(f"karma8-scheduler/{seed}")
    try:
        return trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        module._ALLOW_DETERMINISTIC_SCHEDULING = saved_flag  # type: ignore[misc]
        module._r.setstate(saved_state)
