"""What bounds the targets on this machine, measured in the benchmark's own run.

Two ceilings, each next to the figures it bounds:

- the disk: writing the large file once into the stores' directory and ``fdatasync``-ing it
  (what ``dd conv=fdatasync`` does), once per round just before the large PUTs. A durable
  store must do at least that for every PUT, so its PUT rate cannot exceed this one, while
  a store that does not sync (nginx) can.
- the stack (system ``stack`` of ``bench/peers.py``): an in-memory store served the way
  karma8's gateway is. Whatever karma8 does per request comes on top of that server's own
  cost, so karma8's small-file rates cannot exceed the stack's.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

CHUNK = 1 << 20


def disk_write_rate(source: Path, target: Path) -> float:
    """Copy ``source`` to the new file ``target`` in 1 MiB writes and ``fdatasync`` it; MB/s.

    The time runs from the open to the end of the sync; ``target`` is left in place, since
    deleting a large file makes the file system busy right before the next measurement.
    """
    started = time.perf_counter()
    written = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with open(source, "rb", buffering=0) as src:
            while chunk := src.read(CHUNK):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                written += len(chunk)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return written / 1e6 / (time.perf_counter() - started)


def _times(a: float, b: float) -> str:
    r = a / b
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.3f}x"


def ceiling_lines(medians: dict[str, dict[str, float | None]], disk: list[float]) -> list[str]:
    """Sentences on what bounds the targets, from the run's medians (workload → system →
    median) and the disk's rates by round; empty if neither ceiling was measured."""

    def med(workload: str, system: str) -> float | None:
        return medians.get(workload, {}).get(system)

    lines = []
    if disk:
        rate = statistics.median(disk)
        text = (
            f"- **The disk**: writing the large file once and `fdatasync`-ing it ran at "
            f"{rate:,.0f} MB/s (median; rounds {', '.join(f'{x:,.0f}' for x in disk)}). "
            "A durable PUT must do at least that."
        )
        nginx = med("large_put", "nginx")
        if nginx is not None:
            text += (
                f" nginx's large PUT, which does not sync, ran at {_times(nginx, rate)} that"
                f" rate{'; no durable store can match it here' if nginx > rate else ''}."
            )
        karma8 = med("large_put", "karma8")
        if karma8 is not None:
            text += f" karma8's is {_times(karma8, rate)} it."
        lines.append(text)
    stack = {w: med(w, "stack") for w in ("small_put", "small_get")}
    if any(v is not None for v in stack.values()):
        parts = []
        for workload, label in (("small_put", "PUTs"), ("small_get", "GETs")):
            ceiling = stack[workload]
            if ceiling is None:
                continue
            part = f"{ceiling:,.0f} small {label}/s"
            seaweed = med(workload, "seaweedfs")
            if seaweed is not None:
                part += f" ({_times(ceiling, seaweed)} SeaweedFS)"
            karma8 = med(workload, "karma8")
            if karma8 is not None:
                part += f", of which karma8 reaches {karma8 / ceiling:.0%}"
            parts.append(part)
        lines.append(
            "- **The stack**: an in-memory store served as karma8's gateway is (stack "
            "ceiling: one process, Hypercorn on trio, nothing on disk) answered "
            + "; ".join(parts)
            + ". karma8 does all its work on top of that server's own cost per request."
        )
    if not lines:
        return []
    return ["**Ceilings**, measured in the same run (`bench/ceilings.py`):", "", *lines]
