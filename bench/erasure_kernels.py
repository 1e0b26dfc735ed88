"""Parity coding rates of the two kernels of karma8.core.erasure: ISA-L and zfec.

    .venv/bin/python bench/erasure_kernels.py [--unit-mib 4] [--repeat 10]

Codes one row (5 data blocks of ``--unit-mib``) ``--repeat`` times per code (5+1, 5+2):
the parity of the row, then the rebuild of two data blocks (one for 5+1) from the rest;
prints MiB/s of data blocks in, the median of the repeats, and the speed-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from functools import partial

from karma8.core.erasure import KERNEL, Code


def rate(unit: int, repeat: int, run: Callable[[], object]) -> float:
    """MiB/s of data blocks in: the median of ``repeat`` runs of one row."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 5 * unit / 2**20 / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--unit-mib", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    unit = args.unit_mib * 2**20
    blocks = [os.urandom(unit) for _ in range(5)]
    print(f"kernel in use: {KERNEL}; rows of 5 x {args.unit_mib} MiB; MiB/s of data in")
    print(f"{'code':6} {'step':8} {'isa-l':>9} {'zfec':>9} {'x':>6}")
    for parity in (1, 2):
        coders = (Code(5, parity), Code(5, parity, kernel=None))
        coded = coders[1].encode(blocks)
        left = {n: b for n, b in enumerate([*blocks, *coded]) if n >= parity}
        for step in ("encode", "rebuild"):
            rates = [
                rate(unit, args.repeat, partial(c.encode, blocks))
                if step == "encode"
                else rate(unit, args.repeat, partial(c.rebuild, left))
                for c in coders
            ]
            ratio = rates[0] / rates[1]
            print(f"5+{parity:<4} {step:8} {rates[0]:9.0f} {rates[1]:9.0f} {ratio:6.1f}")


if __name__ == "__main__":
    main()
