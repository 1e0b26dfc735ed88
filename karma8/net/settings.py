"""``karma8 serve --config FILE``: the TOML file read strictly into a :class:`NetConfig`.

Top-level keys are :class:`NetConfig`'s fields; the tables ``[rebalance]`` and ``[repair]``
hold the rebalancer's and repair's settings under the names a scenario's tables use. Every default
comes from the configs themselves (``NetConfig``, and through it the actors' configs), so there
is one definition of each. See docs/configuration.md.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import attrs

from karma8.actors.rebalancer import read_rebalance
from karma8.actors.repair import read_repair
from karma8.core.errors import InvalidName
from karma8.core.names import check_namespace
from karma8.core.tomlconf import ConfigError, ConfigSource, TableReader
from karma8.net.locate import discovery_urls
from karma8.net.netconfig import NetConfig

SIZES = ("capacity", "stripe_unit", "max_file_size", "reserve_step", "volume_size")
OPTIONAL_STRINGS = ("secret", "metadata_url")
PORT_MAX = 65535
MIN_NODES = 5  # the embedded cluster's storage nodes: a file takes 5
METADATA_SCHEMES = ("postgresql://", "postgres://")
NAME_LISTS = ("namespaces", "public_namespaces")
# Durations where 0 means "never keep" rather than a stall.
ZERO_SECONDS = ("access_cache_ttl",)
# Counts where 0 would refuse or stall every request.
POSITIVE = (
    "max_connections",
    "max_uploads",
    "node_connections",
    "discovery_connections",
    "staging_uploads",
    "metadata_connections",
)


def load_net_config(
    path: Path | None,
    overrides: dict[str, Any],
    rebalance_overrides: dict[str, Any] | None = None,
) -> NetConfig:
    """NetConfig from a TOML file plus command-line overrides (``None`` values are unset)."""
    base = NetConfig()
    values: dict[str, Any] = {}
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
            data = tomllib.loads(text)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): not TOML") from None
        reader = TableReader(ConfigSource(str(path), text), data, "")
        for field in attrs.fields(NetConfig):
            default = getattr(base, field.name)
            if field.name == "rebalance":
                values[field.name] = read_rebalance(reader.table("rebalance"), default)
            elif field.name == "repair":
                values[field.name] = read_repair(reader.table("repair"), default)
            elif field.name in SIZES:
                values[field.name] = reader.size(field.name, default, minimum=1)
            elif field.name == "small_part_max":
                values[field.name] = reader.size(field.name, default, minimum=0)
            elif field.name in OPTIONAL_STRINGS:
                raw = reader.get(field.name, default)
                if raw is not None and not isinstance(raw, str):
                    raise reader.fail(field.name, "expected a string")
                if field.name == "metadata_url" and raw is not None:
                    _check_metadata_url(reader, raw)
                if field.name == "secret" and raw is not None and not raw.strip():
                    # Not "no secret": that leaves discovery and the nodes open to anyone.
                    raise reader.fail(field.name, "is empty (leave it out for no secret)")
                values[field.name] = raw
            elif field.name == "discovery_url":
                values[field.name] = _discovery(reader, field.name, default)
            elif field.name in NAME_LISTS:
                values[field.name] = _names(reader, field.name, default)
            elif field.name == "gateway_workers":
                values[field.name] = reader.integer(field.name, default, minimum=1)
            elif field.name == "host":
                values[field.name] = reader.string(field.name, default)
            elif isinstance(default, bool):
                values[field.name] = reader.boolean(field.name, default)
            elif isinstance(default, float):
                minimum = 0.0 if field.name in ZERO_SECONDS else 0.001
                values[field.name] = reader.number(field.name, default, minimum=minimum)
            elif field.name.endswith("_port"):
                values[field.name] = reader.integer(field.name, default, maximum=PORT_MAX)
            elif field.name == "storage_nodes":
                values[field.name] = reader.integer(field.name, default, minimum=MIN_NODES)
            else:
                minimum = 1 if field.name in POSITIVE else 0
                values[field.name] = reader.integer(field.name, default, minimum=minimum)
        reader.finish()
    given = {k: v for k, v in overrides.items() if v is not None}
    _check_flags(given)
    values.update(given)
    config = attrs.evolve(base, **values)
    unknown = sorted(set(config.public_namespaces or ()) - set(config.namespaces))
    if unknown:
        raise ConfigError(
            f"{path or 'configuration'}: public_namespaces names {', '.join(unknown)},"
            f" not in namespaces ({', '.join(config.namespaces) or 'none'})"
        )
    given = {k: v for k, v in (rebalance_overrides or {}).items() if v is not None}
    if given:
        config = attrs.evolve(config, rebalance=attrs.evolve(config.rebalance, **given))
    return config


def _check_flags(given: dict[str, Any]) -> None:
    """The command line's values (``karma8 serve``'s flags), held to what the file's are."""
    nodes, capacity = given.get("storage_nodes"), given.get("capacity")
    if nodes is not None and nodes < MIN_NODES:
        raise ConfigError(f"--nodes must be at least {MIN_NODES}, got {nodes}")
    if capacity is not None and capacity < 1:
        raise ConfigError(f"--capacity must be at least 1 byte, got {capacity}")


def _check_metadata_url(reader: TableReader, url: str) -> None:
    if not url.startswith(METADATA_SCHEMES):
        raise reader.fail(
            "metadata_url", "expected a PostgreSQL URL, postgresql://USER@HOST[:PORT]/DATABASE"
        )


def _names(
    reader: TableReader, key: str, default: tuple[str, ...] | None
) -> tuple[str, ...] | None:
    """A list of namespace names, each checked as discovery would."""
    raw = reader.get(key, None)
    if raw is None:
        return default
    if not isinstance(raw, list) or not all(isinstance(n, str) for n in raw):
        raise reader.fail(key, "expected a list of namespace names")
    for name in raw:
        try:
            check_namespace(name)
        except InvalidName as exc:
            raise reader.fail(key, exc.message) from None
    return tuple(raw)


def _discovery(reader: TableReader, key: str, default: str | None) -> str | None:
    """One discovery URL, several comma-separated, or a list of them: as one
    comma-separated string (:func:`karma8.net.locate.discovery_urls`)."""
    raw = reader.get(key, None)
    if raw is None:
        return default
    if isinstance(raw, list) and all(isinstance(u, str) for u in raw):
        raw = ",".join(raw)
    if not isinstance(raw, str):
        raise reader.fail(key, "expected a URL or a list of URLs")
    try:
        return ",".join(discovery_urls(raw))
    except ConfigError as exc:
        raise reader.fail(key, str(exc)) from None
