"""Checksumming bytes on their way over HTTP (the storage client's transfer checks).

hashlib releases the GIL while it hashes a buffer, so a big chunk hashed through a
:class:`~karma8.ports.BlockingRunner` (a worker thread) runs on another core while the event
loop keeps moving bytes. Small chunks are hashed in place: for them the hop would cost more
than the hash.
"""

from __future__ import annotations

import hashlib
from functools import partial

from karma8.ports import BlockingRunner

OFFLOAD_BYTES = 1 << 16


async def update_digest(digest: hashlib._Hash, chunk: bytes, blocking: BlockingRunner) -> None:
    """``digest.update(chunk)``, in the runner when the chunk is big enough to be worth it."""
    if len(chunk) >= OFFLOAD_BYTES:
        await blocking(partial(digest.update, chunk))
    else:
        digest.update(chunk)
