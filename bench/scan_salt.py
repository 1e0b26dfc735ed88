"""The recovery scan's cost per needle in a salted volume against one from before salts.

Each needle header's check is a BLAKE2b MAC keyed by the volume's salt, where it was a
CRC-32 (karma8/store/packed/format.py). Scans two in-memory images of 50,000 needles of 820
bytes (a 4 KiB file's part), alternately, 8 times each, and prints the median and the best
CPU time per needle.
    .venv/bin/python bench/scan_salt.py
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time

from karma8.store.packed.format import SALT_SIZE, encode, scan

NEEDLES = 50_000


def image(salt: bytes | None) -> bytes:
    parts = []
    for i in range(NEEDLES):
        data = os.urandom(820)
        key = f"{i:021x}.{i % 5}"
        parts.append(encode(key, data, sha256=hashlib.sha256(data).digest(), salt=salt))
    return b"".join(parts)


def main() -> None:
    salt = os.urandom(SALT_SIZE)
    images = {"unsalted": (None, image(None)), "salted": (salt, image(salt))}
    times: dict[str, list[float]] = {name: [] for name in images}
    for _ in range(8):
        for name, (volume_salt, data) in images.items():
            view = memoryview(data)

            def read(at: int, n: int, view: memoryview = view) -> bytes:
                return bytes(view[at : at + n])

            started = time.process_time()
            found = scan(read, len(data), volume_salt)
            times[name].append((time.process_time() - started) / NEEDLES * 1e6)
            assert len(found.needles) == NEEDLES
    for name, spent in times.items():
        print(f"{name}: median {statistics.median(spent):.2f} us per needle, best {min(spent):.2f}")


if __name__ == "__main__":
    main()
