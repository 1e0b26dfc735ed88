"""The work a SQLite connection does, counted in VM instructions: a bound on a query's cost
that does not depend on the machine's speed."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager


class Steps:
    """Hundreds of VM instructions run so far (:func:`sqlite_steps`)."""

    count = 0


@contextmanager
def sqlite_steps(db: sqlite3.Connection) -> Iterator[Steps]:
    """Count what ``db`` runs inside the block, in steps of 100 VM instructions."""
    steps = Steps()

    def step() -> int:
        steps.count += 1
        return 0  # go on

    db.set_progress_handler(step, 100)
    try:
        yield steps
    finally:
        db.set_progress_handler(None, 0)
