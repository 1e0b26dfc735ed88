"""Where a small PUT's time goes in the embedded cluster's parent: each phase of
``Gateway.put`` and each sync round, timed, and the table appended to ``PHASES_OUT`` (default
``put_phases.txt``) as the parent exits. Timing is added, nothing else changed.

    KARMA8_LAUNCH="$PWD/.venv/bin/python $PWD/bench/put_phases.py" \\
        PHASES_OUT=/tmp/phases.txt bench/put_cpu.sh "$PWD" 8

Rows: ``put`` (the whole call), ``place``, ``parts`` (the five part writes, durable),
``commit``; ``round NAME`` (a sync round from the event loop's view) and, inside it, its
worker thread's ``steps`` (parts written) and ``sync``; ``thread start`` and ``thread
return``: from asking for the thread to its first line, and from its last line to the round
going on in the loop.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import karma8.store.groupsync as groupsync
from karma8.actors.discovery import Discovery
from karma8.actors.gateway import Gateway
from karma8.actors.uploader import Uploader

TIMES: defaultdict[str, list[float]] = defaultdict(list)


def timed(owner: Any, attribute: str, label: str | Callable[[Any], str]) -> None:
    real: Callable[..., Awaitable[Any]] = getattr(owner, attribute)

    async def timing(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return await real(self, *args, **kwargs)
        finally:
            TIMES[label if isinstance(label, str) else label(self)].append(
                time.perf_counter() - start
            )

    setattr(owner, attribute, timing)


def time_rounds() -> None:
    real_round = groupsync._round
    real_in_thread = groupsync._in_thread

    def round_(steps: list[Any], sync: Callable[[], None]) -> None:
        start = time.perf_counter()
        name = "syncfs" if getattr(sync, "func", None) is groupsync._syncfs else "log"

        def timed_sync() -> None:
            synced = time.perf_counter()
            TIMES[f"  steps {name}"].append(synced - start)
            try:
                sync()
            finally:
                TIMES[f"  sync {name}"].append(time.perf_counter() - synced)

        real_round(steps, timed_sync)

    async def in_thread(fn: Callable[[], None]) -> None:
        asked = time.perf_counter()
        seen: dict[str, float] = {}

        def run() -> None:
            seen["start"] = time.perf_counter()
            try:
                fn()
            finally:
                seen["end"] = time.perf_counter()

        try:
            await real_in_thread(run)
        finally:
            if "start" in seen:
                TIMES["  thread start"].append(seen["start"] - asked)
                TIMES["  thread return"].append(time.perf_counter() - seen["end"])

    groupsync._round = round_
    groupsync._in_thread = in_thread
    timed(
        groupsync.GroupSync,
        "_run_round",
        lambda group: "round syncfs" if group._name.startswith("syncfs") else "round log",
    )


def report() -> None:
    lines = [f"pid {os.getpid()}: {'':19} {'n':>7} {'mean ms':>8} {'p50':>7} {'p90':>7}"]
    order = ["put", "  place", "  parts", "  commit", "round syncfs", "  steps syncfs"]
    order += ["  sync syncfs", "round log", "  steps log", "  sync log"]
    order += ["  thread start", "  thread return"]
    for label in order:
        times = sorted(TIMES.get(label, ()))
        if not times:
            continue
        n = len(times)
        lines.append(
            f"{label:26} {n:7d} {1000 * sum(times) / n:8.2f}"
            f" {1000 * times[n // 2]:7.2f} {1000 * times[n * 9 // 10]:7.2f}"
        )
    with open(os.environ.get("PHASES_OUT", "put_phases.txt"), "a") as out:
        out.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    timed(Gateway, "put", "put")
    timed(Discovery, "place_upload", "  place")
    timed(Uploader, "write_held", "  parts")
    timed(Discovery, "commit_upload", "  commit")
    time_rounds()
    atexit.register(report)
    from karma8.cli import main

    sys.argv = ["karma8", *sys.argv[1:]]
    main()
