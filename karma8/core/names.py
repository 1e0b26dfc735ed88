"""Naming rules for namespaces and file names.

Namespaces are short DNS-label-like identifiers so they are safe in URLs, paths and logs. File
names are the rest of the URL path: any UTF-8 text up to 1024 bytes, ``/`` allowed as a
separator, but no empty, ``.`` or ``..`` segments and no control characters, so a name never
means two things to two layers (a proxy normalising ``a//b`` or ``a/../b`` would otherwise read a
different file than the one written).
"""

from __future__ import annotations

import re

from karma8.core.errors import InvalidName

MAX_NAME_BYTES = 1024
_NAMESPACE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_namespace(namespace: str) -> str:
    """Return ``namespace`` if valid, else raise :class:`InvalidName`."""
    if not _NAMESPACE.fullmatch(namespace):
        raise InvalidName(
            f"invalid namespace {namespace!r}: use 1-63 of a-z, 0-9, '-' and '_',"
            " starting with a letter or digit"
        )
    return namespace


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid file name, else raise :class:`InvalidName`."""
    if not name:
        raise InvalidName("file name is empty")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidName(f"file name is longer than {MAX_NAME_BYTES} bytes")
    if _CONTROL.search(name):
        raise InvalidName("file name contains a control character")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidName("file name is not valid UTF-8") from None
    for segment in name.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidName(f"invalid file name {name!r}: no empty, '.' or '..' path segments")
    return name
