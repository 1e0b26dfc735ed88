"""ISA-L's GF(256) kernels (Intel's Intelligent Storage Acceleration Library), through ctypes.

ISA-L multiplies a matrix over GF(256) by k input buffers with the machine's widest vector
unit (AVX2, AVX-512, GFNI), far faster than zfec's table lookups, and ctypes lets go of the
GIL while it runs. karma8 keeps zfec's code (the parity bytes on disk are zfec's); ISA-L
only computes the same products: :mod:`karma8.core.erasure` hands it zfec's matrix. The
library is the one pyeclib's wheels bundle (pyeclib is ISA-L's Python distribution); only
its public C API is called: ``ec_init_tables``, ``ec_encode_data``, ``gf_invert_matrix``.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
from collections.abc import Sequence

Buffer = bytes | bytearray | memoryview
Matrix = Sequence[Sequence[int]]


def _library_path() -> str | None:
    """Where pyeclib's wheel put ``libisal``, or None (pyeclib missing, or built without it)."""
    try:
        files = importlib.metadata.files("pyeclib") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name.startswith("libisal") and ".so" in file.name:
            return str(file.locate())
    return None


class Isal:
    """The loaded library; :func:`load` makes one."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._lib = library
        library.ec_init_tables.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_char_p,
        ]
        library.ec_init_tables.restype = None
        library.ec_encode_data.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.POINTER(ctypes.c_char_p),
            ctypes.POINTER(ctypes.c_void_p),
        ]
        library.ec_encode_data.restype = None
        library.gf_invert_matrix.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
        library.gf_invert_matrix.restype = ctypes.c_int

    def tables(self, matrix: Matrix) -> Tables:
        """ISA-L's expanded form of ``matrix`` (rows of k coefficients), made once per code."""
        rows, k = len(matrix), len(matrix[0])
        coefficients = bytes(c for row in matrix for c in row)
        expanded = ctypes.create_string_buffer(32 * k * rows)
        self._lib.ec_init_tables(k, rows, coefficients, expanded)
        return Tables(self, rows, k, expanded)

    def invert(self, matrix: Matrix) -> list[list[int]]:
        """The inverse of a square GF(256) matrix.

        Raises:
            ValueError: the matrix is singular.
        """
        n = len(matrix)
        given = ctypes.create_string_buffer(bytes(c for row in matrix for c in row), n * n)
        inverse = ctypes.create_string_buffer(n * n)
        if self._lib.gf_invert_matrix(given, inverse, n) != 0:
            raise ValueError("singular matrix")
        raw = inverse.raw
        return [list(raw[r * n : (r + 1) * n]) for r in range(n)]

    def encode(self, tables: Tables, inputs: Sequence[Buffer], length: int) -> list[bytes]:
        """``tables``' matrix times the k inputs' first ``length`` bytes: one output per row.

        Raises:
            ValueError: not k inputs, or one shorter than ``length``.
        """
        if len(inputs) != tables.k:
            raise ValueError(f"{len(inputs)} inputs for a matrix of {tables.k} columns")
        sources = (ctypes.c_char_p * tables.k)(*(_readable(b, length) for b in inputs))
        outputs = [ctypes.create_string_buffer(length) for _ in range(tables.rows)]
        targets = (ctypes.c_void_p * tables.rows)(*(ctypes.addressof(o) for o in outputs))
        self._lib.ec_encode_data(length, tables.k, tables.rows, tables.expanded, sources, targets)
        return [o.raw for o in outputs]


class Tables:
    """A matrix in ISA-L's expanded form, for :meth:`Isal.encode`."""

    def __init__(self, isal: Isal, rows: int, k: int, expanded: ctypes.Array[ctypes.c_char]):
        self.isal, self.rows, self.k, self.expanded = isal, rows, k, expanded


def _readable(buffer: Buffer, length: int) -> bytes:
    """A bytes object holding at least ``buffer``'s first ``length`` bytes; ctypes passes a
    bytes object's own storage, so whole bytes (the usual chunk) are not copied."""
    if isinstance(buffer, memoryview):
        base = buffer.obj
        if isinstance(base, bytes) and buffer.contiguous and buffer.nbytes == len(base):
            buffer = base
    out = buffer if isinstance(buffer, bytes) else bytes(buffer)
    if len(out) < length:
        raise ValueError(f"an input of {len(out)} bytes, {length} wanted")
    return out


def load() -> Isal | None:
    """ISA-L from pyeclib's wheel, or None where it is not installed or does not load."""
    path = _library_path()
    if path is None:
        return None
    try:
        return Isal(ctypes.CDLL(path))
    except (OSError, AttributeError):
        return None
