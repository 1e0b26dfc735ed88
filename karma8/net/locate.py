"""``cluster.json`` and how a command finds the cluster it talks to.

The embedded cluster writes ``cluster.json`` (URLs and secret) into its data directory. A
command that needs a running cluster (``serve --role storage|gw``, ``nodes``, ``stat``,
``scrub``) takes its discovery URL from the first of:

1. ``--discovery URL``;
2. ``$KARMA8_DISCOVERY``;
3. ``discovery_url`` in the ``--config`` file;
4. ``cluster.json`` in ``--data DIR``, then in DIR's parent (a node directory inside an
   embedded cluster's directory);
5. without ``--data``, ``./karma8-data/cluster.json`` in the working directory.

What the user named replaces the working directory: a ``cluster.json`` left behind by a
cluster that has stopped must not capture a command pointed elsewhere. The secret is
``--secret``, ``--secret-file PATH``, ``$KARMA8_SECRET``, ``$KARMA8_SECRET_FILE`` (a path),
the config file's ``secret``, else the secret of the
``cluster.json`` that gave the URL; for a URL given otherwise, that of a candidate
``cluster.json`` naming one of the same discovery URLs, so no cluster's secret is sent to
another.

A discovery URL may be a list: several discovery instances sharing one metadata database,
written ``URL,URL`` (``--discovery``, ``$KARMA8_DISCOVERY``) or as a TOML array
(``discovery_url``). Inside karma8 the list travels as that one comma-separated string;
:func:`discovery_urls` reads it, and the discovery client fails over between them.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from karma8.core.tomlconf import ConfigError

CLUSTER_FILE = "cluster.json"
DATABASE_FILE = "discovery.sqlite3"  # discovery's SQLite database, in its data directory
NODE_ID_FILE = "node_id"  # a storage node's permanent id, in its data directory
DEFAULT_DATA = Path("karma8-data")
ENV_DISCOVERY = "KARMA8_DISCOVERY"
ENV_SECRET = "KARMA8_SECRET"
ENV_SECRET_FILE = "KARMA8_SECRET_FILE"


def discovery_urls(spec: str) -> tuple[str, ...]:
    """The discovery URLs of ``URL[,URL...]``, without trailing slashes, each once.

    Raises:
        ConfigError: no URL, or one that is not ``http://`` or ``https://``.
    """
    urls: list[str] = []
    for part in spec.split(","):
        url = part.strip().rstrip("/")
        if not url:
            continue
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"discovery URL {url!r}: expected http://HOST:PORT")
        if url not in urls:
            urls.append(url)
    if not urls:
        raise ConfigError(f"no discovery URL in {spec!r}")
    return tuple(urls)


@attrs.frozen(kw_only=True)
class ClusterInfo:
    """What ``cluster.json`` records about a running embedded cluster."""

    gateway: str
    discovery: str
    secret: str
    data_dir: str


def read_cluster_info(data_dir: Path) -> ClusterInfo | None:
    """``data_dir/cluster.json``, or None if there is none; a broken one is a ConfigError."""
    path = data_dir / CLUSTER_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{_shown(path)}: cannot read: {exc.strerror}") from None
    try:
        raw: Any = json.loads(text)
        if not isinstance(raw, dict):
            raise TypeError("expected a JSON object")
        return ClusterInfo(
            gateway=str(raw["gateway"]),
            discovery=str(raw["discovery"]),
            secret=str(raw["secret"]),
            data_dir=str(raw.get("data_dir", data_dir)),
        )
    except KeyError as exc:
        problem = f"no {exc} key"
    except (ValueError, TypeError) as exc:
        problem = str(exc)
    raise ConfigError(f"{_shown(path)}: not a karma8 cluster file: {problem}")


def write_cluster_info(data_dir: Path, info: ClusterInfo) -> None:
    """Write ``cluster.json`` atomically, readable by its owner only (it holds the secret).

    A fresh temporary file each time (``mkstemp``: ``O_EXCL``, mode 0600 whatever the umask),
    so a stale one, whatever its mode, is never reused; fsynced, then renamed over the old.
    """
    text = json.dumps(attrs.asdict(info), indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{CLUSTER_FILE}.", suffix=".tmp", dir=data_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, data_dir / CLUSTER_FILE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_secret_file(path: Path | str) -> str:
    """The secret in ``path`` (``--secret-file``, ``$KARMA8_SECRET_FILE``), without the
    whitespace around it. Raises ConfigError if it cannot be read or is empty."""
    try:
        secret = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{_shown(Path(path))}: cannot read the secret: {exc}") from None
    if not secret:
        raise ConfigError(f"{_shown(Path(path))}: the secret file is empty")
    return secret


def given_secrets(
    secret: str | None, secret_file: Path | None, environ: Mapping[str, str]
) -> list[tuple[str | None, str]]:
    """The secrets given on the command line or in the environment, each with where it came
    from, first one first: ``--secret``, ``--secret-file``, ``$KARMA8_SECRET``,
    ``$KARMA8_SECRET_FILE``. A file is read only if nothing before it gave a secret.

    Raises:
        ConfigError: A secret given empty (``--secret ''``, ``$KARMA8_SECRET`` set to
            nothing), or a secret file that cannot be read or is empty.
    """
    # An empty secret is an error, as an empty secret file is: taken for "no secret", it
    # would leave discovery and the nodes open to anyone without a word.
    if secret is not None and not secret.strip():
        raise ConfigError("--secret is empty (leave it out for no secret)")
    if ENV_SECRET in environ and not environ[ENV_SECRET].strip():
        raise ConfigError(f"${ENV_SECRET} is set but empty (unset it for no secret)")
    given: list[tuple[str | None, str]] = [(secret, "--secret")]
    sources: list[tuple[str | Path | None, str, bool]] = [
        (secret_file, "--secret-file", True),
        (environ.get(ENV_SECRET), f"${ENV_SECRET}", False),
        (environ.get(ENV_SECRET_FILE), f"${ENV_SECRET_FILE}", True),
    ]
    for value, origin, is_file in sources:
        if is_file and value and not any(s for s, _ in given):
            given.append((read_secret_file(value), origin))
        else:
            given.append((None if is_file or not value else str(value), origin))
    return given


@attrs.frozen(kw_only=True)
class ClusterRef:
    """The discovery a command uses and its secret, each with where it came from.

    ``discovery`` is one URL or several, comma-separated (:func:`discovery_urls`).
    """

    discovery: str
    discovery_from: str
    secret: str | None
    secret_from: str | None

    @property
    def urls(self) -> tuple[str, ...]:
        return discovery_urls(self.discovery)

    def describe(self) -> str:
        """One line for stderr: ``cluster URL (from WHERE, with its secret)`` or the like."""
        if self.secret_from is None:
            secret = "; no secret"
        elif self.secret_from == self.discovery_from:
            secret = ", with its secret"
        else:
            secret = f"; secret from {self.secret_from}"
        urls = ", ".join(self.urls)
        return f"cluster {urls} (from {self.discovery_from}{secret})"


def locate_cluster(
    *,
    discovery: str | None,
    secret: str | None,
    environ: Mapping[str, str],
    secret_file: Path | None = None,
    config_path: Path | None = None,
    config_url: str | None = None,
    config_secret: str | None = None,
    data: Path | None = None,
    default_data: Path = DEFAULT_DATA,
) -> ClusterRef:
    """The cluster to use, in the order of the module docstring.

    Raises:
        ConfigError: nothing names a cluster (the message lists what was tried), or a
            ``cluster.json`` on the way cannot be read.
    """
    config = str(config_path) if config_path else "the config file"
    urls = [
        (discovery, "--discovery"),
        (environ.get(ENV_DISCOVERY), f"${ENV_DISCOVERY}"),
        (config_url, f"discovery_url in {config}"),
    ]
    secrets = [
        *given_secrets(secret, secret_file, environ),
        (config_secret, f"secret in {config}"),
    ]
    files = _candidate_dirs(data, default_data)
    given_secret, given_from = next(((s, f) for s, f in secrets if s), (None, None))
    given_url, url_from = next(((u, f) for u, f in urls if u), (None, None))
    if given_url is not None and url_from is not None:
        listed = discovery_urls(given_url)
        url = ",".join(listed)
        if given_secret is not None:
            return ClusterRef(
                discovery=url, discovery_from=url_from, secret=given_secret, secret_from=given_from
            )
        for directory in files:
            try:
                info = read_cluster_info(directory)
            except ConfigError:
                continue  # only looked at for a secret: a broken file must not block the URL
            if info is not None and info.discovery.rstrip("/") in listed:
                return ClusterRef(
                    discovery=url,
                    discovery_from=url_from,
                    secret=info.secret,
                    secret_from=_shown(directory / CLUSTER_FILE),
                )
        return ClusterRef(discovery=url, discovery_from=url_from, secret=None, secret_from=None)
    for directory in files:
        info = read_cluster_info(directory)
        if info is not None:
            origin = _shown(directory / CLUSTER_FILE)
            return ClusterRef(
                discovery=info.discovery,
                discovery_from=origin,
                secret=given_secret or info.secret,
                secret_from=given_from or origin,
            )
    tried = ", ".join(_shown(d / CLUSTER_FILE) for d in files)
    raise ConfigError(
        f"cannot find the cluster: pass --discovery URL, set ${ENV_DISCOVERY}, set discovery_url"
        f" in --config, or point --data at a cluster's directory (no {tried})"
    )


def _candidate_dirs(data: Path | None, default_data: Path) -> list[Path]:
    """Where ``cluster.json`` may be, in order, each directory once: ``data`` and its parent
    if given (a typo there must not fall back on the working directory's cluster), else the
    working directory's ``karma8-data``."""
    candidates = [data, data.parent] if data is not None else [default_data]
    seen: set[Path] = set()
    ordered: list[Path] = []
    for directory in candidates:
        key = directory.resolve()
        if key not in seen:
            seen.add(key)
            ordered.append(directory)
    return ordered


def _shown(path: Path) -> str:
    """An absolute path without ``..``: the file a user would open to check."""
    return os.path.abspath(path)
