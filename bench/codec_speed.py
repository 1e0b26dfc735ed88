"""Codec speed: encode + decode of a FileVersion with 5 parts (what a gateway does with every
discovery answer on a small-file PUT/GET).

.venv/bin/python bench/codec_speed.py [--number 20000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import time
import timeit

from karma8.core.layout import StripeLayout
from karma8.core.model import FileVersion, NodeRef, PartPlacement, VersionState
from karma8.net.codec import decode, encode

VERSION = FileVersion(
    version_id="0190d5f0c2a47b3e9f1d2c3b4a5e6f70",
    namespace="default",
    name="docs/small-file.bin",
    state=VersionState.COMMITTED,
    size=4000,
    layout=StripeLayout(),
    parts=tuple(
        PartPlacement(
            index=i,
            key=f"0190d5f0c2a47b3e9f1d2c3b4a5e6f70.{i}",
            node=NodeRef(node_id=f"node-{i}", url=f"http://127.0.0.1:{9001 + i}"),
            size=800,
            checksum=f"crc32c:{i:08x}",
        )
        for i in range(5)
    ),
    created_at=1720000000.25,
    committed_at=1720000000.5,
    etag='"0123456789abcdef0123456789abcdef"',
)


def round_trip() -> None:
    decode(encode(VERSION), FileVersion)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--number", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    assert decode(encode(VERSION), FileVersion) == VERSION
    for name, fn in [
        ("encode", lambda: encode(VERSION)),
        ("decode", lambda: decode(WIRE, FileVersion)),
        ("encode+decode", round_trip),
    ]:
        # CPU time: another process on the machine disturbs it less than the wall clock.
        runs = timeit.repeat(fn, number=args.number, repeat=args.repeat, timer=time.process_time)
        best = min(runs) / args.number
        print(f"{name:14} {best * 1e6:7.2f} us")


WIRE = encode(VERSION)

if __name__ == "__main__":
    main()
