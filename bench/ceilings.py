"""What bounds the targets on this machine, measured in the benchmark's own run.

Two ceilings, each next to the figures it bounds:

- the disk: the large file written into the stores' directory as fast as the disk takes it
  durably: write-back started as each MiB is written (``sync_file_range``, as karma8's part
  writer does), then one ``fdatasync``. Measured before the first round and after the last
  (the disk's rate for new blocks falls as a run writes them; probing every round would add
  to that and slow down the store that waits for its disk). A store that makes a PUT durable
  before it answers cannot take the bytes faster than the disk does; one that does not sync
  (nginx) can.
- the stack (system ``stack`` of ``bench/peers.py``): an in-memory store served the way
  karma8's gateway is, in one process. Whatever karma8 does per request comes on top of that
  server's own cost; more processes could at most multiply it by the number of cores.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from common import ratio

from karma8.store.groupsync import start_writeback

CHUNK = 1 << 20


def disk_write_rate(source: Path, target: Path) -> float:
    """Copy ``source`` to the new file ``target`` durably; MB/s from the open to the end of
    the ``fdatasync``. Write-back of each 1 MiB starts as soon as it is written.

    ``target`` is left in place: deleting it would hand its blocks, already allocated, to the
    next writer, which then writes faster than into new blocks.

    Raises:
        OSError: The copy or the sync failed (say, the disk is full).
    """
    started = time.perf_counter()
    written = 0
    buffer = bytearray(CHUNK)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with open(source, "rb", buffering=0) as src:
            while count := src.readinto(buffer):
                view = memoryview(buffer)[:count]
                while view:
                    view = view[os.write(fd, view) :]
                start_writeback(fd, written, count)
                written += count
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return written / 1e6 / (time.perf_counter() - started)


def ceiling_lines(
    medians: dict[str, dict[str, float | None]],
    disk: dict[str, float | None],
    cores: int,
    workers: int = 1,
) -> list[str]:
    """Sentences on what bounds the targets, from the run's medians (workload → system →
    median), the disk's rates (``before``/``after`` the rounds, None if that probe failed),
    the number of cores and of processes on the ceiling's port; empty if neither ceiling was
    measured."""

    def med(workload: str, system: str) -> float | None:
        value = medians.get(workload, {}).get(system)
        return value if value else None  # a failed measurement, or a rate of zero

    lines = []
    rates = {when: rate for when, rate in disk.items() if rate}
    if rates:
        best = max(rates.values())
        text = (
            "- **The disk**: the large file, written with write-back started as each MiB "
            "arrives and then `fdatasync`-ed, went to disk at "
            + " and ".join(f"{rate:,.0f} MB/s {when} the rounds" for when, rate in rates.items())
            + ". A durable PUT cannot take the bytes faster than the disk does."
        )
        nginx = med("large_put", "nginx")
        if nginx is not None:
            text += (
                f" nginx's large PUT (median), which does not sync, ran at"
                f" {ratio(nginx, best)} the disk's best rate"
                + ("; no durable store can match it here." if nginx > best else ".")
            )
        karma8 = med("large_put", "karma8")
        if karma8 is not None:
            text += f" karma8's ran at {ratio(karma8, best)} it."
        lines.append(text)
    parts = []
    for workload, label in (("small_put", "PUTs"), ("small_get", "GETs")):
        ceiling = med(workload, "stack")
        if ceiling is None:
            continue
        part = f"{ceiling:,.0f} small {label}/s"
        seaweed = med(workload, "seaweedfs")
        if seaweed is not None:
            part += f" ({ratio(ceiling, seaweed)} SeaweedFS"
            if workers < cores:
                part += (
                    f"; with a process per core, {cores} here, at most"
                    f" {ratio(cores * ceiling / workers, seaweed)}"
                )
            part += ")"
        karma8 = med(workload, "karma8")
        if karma8 is not None:
            part += f", of which karma8 reaches {karma8 / ceiling:.0%}"
        parts.append(part)
    if parts:
        lines.append(
            "- **The stack**: an in-memory store served as karma8's gateway is (the stack "
            f"ceiling: {workers} process{'es' if workers != 1 else ''} on the port, Hypercorn"
            " on trio, nothing on disk) answered "
            + "; ".join(parts)
            + ". Every store on this stack pays that server's cost per request, and the "
            "client shares the cores."
        )
    if not lines:
        return []
    return ["**Ceilings**, measured in the same run (`bench/ceilings.py`):", "", *lines]
