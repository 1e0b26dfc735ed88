"""Loads bench/worker_parts.py's experiment into every process of an embedded cluster (the
parent and its gateway workers, which inherit this directory on ``PYTHONPATH``) when
``KARMA8_WORKER_PARTS`` names a scratch directory; see that module."""

import os
import sys
from pathlib import Path

if os.environ.get("KARMA8_WORKER_PARTS"):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import worker_parts

    worker_parts.install()
