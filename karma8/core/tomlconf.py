"""Strict readers for TOML configuration (scenarios, server config). Pure.

A typo must never silently turn a setting off: unknown keys, wrong types and out-of-range
values raise :class:`ConfigError` naming the key and, where it can be found, the line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from karma8.core.units import parse_size


class ConfigError(ValueError):
    """A configuration that cannot be used, with what and where."""


class TableReader:
    """Pulls typed values out of one TOML table, remembering which keys were used."""

    def __init__(self, source: ConfigSource, table: Mapping[str, Any], path: str) -> None:
        self._source = source
        self._table = table
        self._path = path
        self._used: set[str] = set()

    def fail(self, key: str, message: str) -> ConfigError:
        return self._source.error(self._path, key, message)

    def get(self, key: str, default: Any) -> Any:
        self._used.add(key)
        return self._table.get(key, default)

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, f"expected a number, got {value!r}")
        if value < minimum:
            raise self.fail(key, f"must be >= {minimum}, got {value}")
        return float(value)

    def integer(
        self, key: str, default: int, *, minimum: int = 0, maximum: int | None = None
    ) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {value!r}")
        if value < minimum:
            raise self.fail(key, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.fail(key, f"must be <= {maximum}, got {value}")
        return value

    def size(self, key: str, default: int, *, minimum: int = 0) -> int:
        return self._size(key, self.get(key, default), minimum)

    def sizes(
        self, key: str, default: int | tuple[int, ...], *, count: int, each: str, minimum: int = 0
    ) -> int | tuple[int, ...]:
        """One size, or an array of exactly ``count`` sizes, one per ``each`` (a tuple)."""
        value = self.get(key, default)
        if not isinstance(value, (list, tuple)):
            return self._size(key, value, minimum)
        if len(value) != count:
            raise self.fail(
                key, f"expected one size or {count} sizes (one per {each}), got {len(value)}"
            )
        return tuple(self._size(key, item, minimum, f"item {i}: ") for i, item in enumerate(value))

    def _size(self, key: str, value: object, minimum: int, where: str = "") -> int:
        try:
            size = parse_size(value)
        except ValueError as exc:
            raise self.fail(key, f"{where}{exc}") from None
        if size < minimum:
            raise self.fail(key, f"{where}must be >= {minimum} bytes, got {size}")
        return size

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {value!r}")
        return value

    def string(self, key: str, default: str) -> str:
        value = self.get(key, default)
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {value!r}")
        return value

    def number_range(self, key: str, default: tuple[float, float]) -> tuple[float, float]:
        value = self.get(key, list(default))
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        ):
            raise self.fail(key, f"expected [low, high] numbers, got {value!r}")
        lo, hi = float(value[0]), float(value[1])
        if not 0 <= lo <= hi:
            raise self.fail(key, f"expected 0 <= low <= high, got {value!r}")
        return lo, hi

    def size_range(self, key: str, default: tuple[int, int]) -> tuple[int, int]:
        value = self.get(key, list(default))
        if not isinstance(value, list) or len(value) != 2:
            raise self.fail(key, f"expected [smallest, largest] sizes, got {value!r}")
        try:
            lo, hi = parse_size(value[0]), parse_size(value[1])
        except ValueError as exc:
            raise self.fail(key, str(exc)) from None
        if lo > hi:
            raise self.fail(key, f"smallest is larger than largest: {value!r}")
        return lo, hi

    def table(self, key: str) -> TableReader:
        value = self.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, "expected a table")
        return TableReader(self._source, value, f"{self._path}.{key}" if self._path else key)

    def finish(self) -> None:
        unknown = sorted(set(self._table) - self._used)
        if unknown:
            raise self.fail(unknown[0], f"unknown key (known: {', '.join(sorted(self._used))})")


class ConfigSource:
    def __init__(
        self, origin: str, text: str, *, error_type: type[ConfigError] = ConfigError
    ) -> None:
        self.origin = origin
        self._error_type = error_type
        self.lines = text.splitlines()

    def error(self, table: str, key: str, message: str) -> ConfigError:
        where = f"{table}.{key}" if table else key
        line = self._line_of(table, key)
        at = f"{self.origin}:{line}" if line else self.origin
        return self._error_type(f"{at}: {where}: {message}")

    def _line_of(self, table: str, key: str) -> int | None:
        # Tables of the array [[events]] are addressed as events[i].
        base = re.sub(r"\[\d+\]$", "", table)
        index = int(m.group(1)) if (m := re.search(r"\[(\d+)\]$", table)) else 0
        current, seen = "", -1
        for number, raw in enumerate(self.lines, start=1):
            line = raw.strip()
            header = re.fullmatch(r"\[\[?\s*([^\]]+?)\s*\]\]?", line)
            if header:
                current = header.group(1)
                if current == base:
                    seen += 1
                continue
            if current == base and seen in (index, -1) and re.match(rf"{re.escape(key)}\s*=", line):
                return number
        return None
