"""``karma8 put | get | ls | rm``: a terminal client of the gateway's public API
(docs/http-api.md), for people who move files by hand.

Where it sends requests: ``--gateway``, else ``KARMA8_GATEWAY``, else the client file's
``gateway``, else the embedded cluster's ``cluster.json`` (``--data``, or ``./karma8-data``),
else ``http://127.0.0.1:8080``. The token: ``--token``, else ``KARMA8_TOKEN``, else the
client file's ``token``. The client file is ``--config FILE``, else
``$XDG_CONFIG_HOME/karma8/client.toml`` (``~/.config/...``) if it exists.

Transfers stream (memory stays flat whatever the size) and show a progress bar with the
throughput on a terminal. A download goes to ``FILE.karma8-partial`` and is renamed into
place once whole; an interrupted one resumes where it stopped the next time (a ``Range``
request with ``If-Range``: if the file changed meanwhile, it starts over).

Every failure is one line on stderr and a non-zero exit: 1 when the request failed (the
server's error code and message, or the gateway that could not be reached), 2 when the
command was wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tomllib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import quote

import attrs

from karma8.core.names import check_name, check_namespace
from karma8.core.tomlconf import ConfigError
from karma8.core.units import format_size
from karma8.net.locate import DEFAULT_DATA, read_cluster_info

if TYPE_CHECKING:  # httpx and rich are imported when a command runs: `karma8 sim` needs neither
    import httpx

DEFAULT_GATEWAY = "http://127.0.0.1:8080"
CHUNK = 1 << 20
PARTIAL = ".karma8-partial"
PAGE = 1000  # the listing's largest page
COMMANDS = ("put", "get", "ls", "rm")


class ClientError(Exception):
    """A request that failed: one line for the user. ``answered``: a server answered it (with
    an error status), rather than none being reached."""

    def __init__(self, message: str, *, answered: bool = False) -> None:
        super().__init__(message)
        self.answered = answered


@attrs.frozen
class Target:
    gateway: str
    token: str | None

    def url(self, namespace: str, name: str = "") -> str:
        return f"{self.gateway}/{namespace}/{quote(name, safe='/')}"

    def headers(self, **more: str) -> dict[str, str]:
        auth = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return {**auth, **more}


def add_client_commands(commands: Any) -> None:
    put = commands.add_parser("put", help="upload a file (FILE or - for stdin)")
    put.add_argument("file", metavar="FILE")
    put.add_argument("path", metavar="NAMESPACE/NAME")
    put.add_argument(
        "--if-absent", action="store_true", help="fail if the file exists (If-None-Match: *)"
    )
    get = commands.add_parser("get", help="download a file (to FILE, its name, or - for stdout)")
    get.add_argument("path", metavar="NAMESPACE/NAME")
    get.add_argument("file", metavar="FILE", nargs="?")
    ls = commands.add_parser("ls", help="list the files of a namespace")
    ls.add_argument("path", metavar="NAMESPACE[/PREFIX]")
    rm = commands.add_parser("rm", help="delete a file")
    rm.add_argument("path", metavar="NAMESPACE/NAME")
    for parser in (put, get, ls, rm):
        parser.add_argument("--gateway", help=f"gateway URL (or KARMA8_GATEWAY; {DEFAULT_GATEWAY})")
        parser.add_argument("--token", help="access token (or KARMA8_TOKEN)")
        parser.add_argument("--config", type=Path, help="client file (TOML: gateway, token)")
        parser.add_argument(
            "--data", type=Path, help=f"an embedded cluster's directory (else ./{DEFAULT_DATA})"
        )
        parser.add_argument("--json", action="store_true", help="print JSON")
        shown = parser.add_mutually_exclusive_group()
        shown.add_argument("--progress", action="store_true", help="always show progress")
        shown.add_argument("-q", "--quiet", action="store_true", help="never show progress")


def run_client(args: argparse.Namespace) -> int:
    """Run ``karma8 put|get|ls|rm``; the exit status."""
    import httpx

    target: Target | None = None
    try:
        target = find_target(args)
        with httpx.Client(timeout=httpx.Timeout(60.0, connect=10.0)) as http:
            out = _COMMANDS[args.command](http, target, args)
    except ConfigError as exc:
        print(f"karma8 {args.command}: {exc}", file=sys.stderr)
        return 2
    except ClientError as exc:
        print(f"karma8 {args.command}: {exc}", file=sys.stderr)
        hint = wrong_role(target.gateway, "gateway") if target and exc.answered else None
        if hint is not None:
            print(f"karma8 {args.command}: {hint}", file=sys.stderr)
        return 1
    if out:
        print(out)
    return 0


def find_target(args: argparse.Namespace) -> Target:
    """The gateway and token, by the order the module's docstring gives."""
    file = _client_file(args.config)
    gateway = args.gateway or os.environ.get("KARMA8_GATEWAY") or file.get("gateway")
    if not gateway:
        info = read_cluster_info(args.data or Path(DEFAULT_DATA))
        gateway = info.gateway if info is not None else DEFAULT_GATEWAY
    token = args.token or os.environ.get("KARMA8_TOKEN") or file.get("token")
    if not str(gateway).startswith(("http://", "https://")):
        raise ConfigError(f"gateway {gateway!r}: expected an http:// or https:// URL")
    return Target(gateway=str(gateway).rstrip("/"), token=token or None)


def _client_file(given: Path | None) -> dict[str, str]:
    if given is None:
        home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        path = home / "karma8" / "client.toml"
        if not path.exists():
            return {}
    else:
        path = given
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): not TOML") from None
    unknown = sorted(set(data) - {"gateway", "token"})
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]} (known: gateway, token)")
    if not all(isinstance(v, str) for v in data.values()):
        raise ConfigError(f"{path}: gateway and token are strings")
    return data


def wrong_role(url: str, expected: str) -> str | None:
    """After a request to ``url`` was answered with an error: if ``url`` (the first, of
    several comma-separated) is a karma8 service of another role (its ``/healthz`` says
    which), what to tell the user; else None. A hint never fails the command."""
    import httpx

    url = url.split(",")[0]
    try:
        role = httpx.get(f"{url}/healthz", timeout=2.0).json().get("role")
    except Exception:  # not reachable, not JSON, not a URL: no hint
        return None
    if not isinstance(role, str) or role == expected:
        return None
    option = "--gateway" if expected == "gateway" else "--discovery"
    return f"{url} is a karma8 {role}, not the {expected}: give the {expected}'s URL ({option})"


def split_path(path: str, *, name_required: bool) -> tuple[str, str]:
    """``(namespace, name)`` of ``NAMESPACE/NAME``; without a name required (a listing's
    ``NAMESPACE/PREFIX``), a bare ``NAMESPACE`` is its whole listing."""
    namespace, sep, name = path.partition("/")
    if name_required and not (sep and name):
        raise ConfigError(f"{path!r}: expected NAMESPACE/NAME, e.g. default/photos/cat.jpg")
    try:
        check_namespace(namespace)
        if name_required:
            check_name(name)
    except Exception as exc:  # InvalidName: a usage error here, before any request
        raise ConfigError(str(exc)) from None
    return namespace, name


# -- transfers ----------------------------------------------------------------------------


def _request(http: httpx.Client, method: str, url: str, **kwargs: Any) -> httpx.Response:
    import httpx

    try:
        response = http.request(method, url, **kwargs)
    except httpx.TransportError as exc:
        raise ClientError(f"cannot reach the gateway at {_origin(url)}: {_reason(exc)}") from None
    _raise_for_error(response)
    return response


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = json.loads(response.read())["error"]
        detail = f"{error['message']} ({response.status_code} {error['code']})"
    except (ValueError, KeyError, TypeError):
        detail = f"{response.status_code} {response.reason_phrase}"
    raise ClientError(detail, answered=True)


def _origin(url: str) -> str:
    import httpx

    parsed = httpx.URL(url)
    return f"{parsed.scheme}://{parsed.netloc.decode()}"


def _reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def _progress(args: argparse.Namespace, total: int | None) -> Any:
    """A rich progress bar on stderr (a terminal's, or any with --progress), or None."""
    if args.quiet or not (args.progress or sys.stderr.isatty()):
        return None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(stderr=True, force_terminal=args.progress or None)
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def _put(http: httpx.Client, target: Target, args: argparse.Namespace) -> str:
    namespace, name = split_path(args.path, name_required=True)
    headers = target.headers(**({"If-None-Match": "*"} if args.if_absent else {}))
    source: IO[bytes]
    if args.file == "-":
        source, size = sys.stdin.buffer, None
    else:
        try:
            source = open(args.file, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise ConfigError(f"{args.file}: {exc.strerror}") from None
        size = os.fstat(source.fileno()).st_size
        headers["Content-Length"] = str(size)
    progress = _progress(args, size)
    with source, progress or nullcontext():
        task = progress.add_task(f"put {name}", total=size) if progress else None

        def chunks() -> Iterator[bytes]:
            while chunk := source.read(CHUNK):
                if progress is not None:
                    progress.advance(task, len(chunk))
                yield chunk

        stored = _request(
            http, "PUT", target.url(namespace, name), content=chunks(), headers=headers
        ).json()
    if args.json:
        return json.dumps(stored)
    return (
        f"stored {stored['namespace']}/{stored['name']}: {format_size(stored['size'])}"
        f" ({stored['size']} bytes), version {stored['version']}, etag {stored['etag']}"
    )


def _get(http: httpx.Client, target: Target, args: argparse.Namespace) -> str:
    namespace, name = split_path(args.path, name_required=True)
    out = args.file or name.rsplit("/", 1)[-1]
    url = target.url(namespace, name)
    if out == "-":
        with _stream(http, url, target.headers()) as response:
            for chunk in response.iter_bytes(CHUNK):
                sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        return ""
    if Path(out).is_dir():
        raise ConfigError(f"{out}: is a directory; name the file to write in it")
    if not Path(out).parent.is_dir():
        raise ConfigError(f"{out}: no such directory {str(Path(out).parent)!r}")
    try:
        return _download(http, url, target, args, namespace, name, out)
    except OSError as exc:  # the partial file kept, if any, for a run that resumes
        raise ClientError(f"{out}: cannot write: {exc.strerror}") from None


def _download(
    http: httpx.Client,
    url: str,
    target: Target,
    args: argparse.Namespace,
    namespace: str,
    name: str,
    out: str,
) -> str:
    """``karma8 get`` into the file ``out``, resuming a partial download of the same version."""
    import httpx

    partial = Path(out + PARTIAL)
    etag_file = Path(out + PARTIAL + ".etag")
    have = partial.stat().st_size if partial.exists() and etag_file.exists() else 0
    headers = target.headers()
    with ExitStack() as stack:
        if have:
            sent = etag_file.read_text()
            ranged = {**headers, "Range": f"bytes={have}-", "If-Range": sent}
            response = stack.enter_context(_stream(http, url, ranged, allow=416))
            # A hop that dropped If-Range would answer for another version: trust a 206 or
            # a 416 only when it names the ETag the partial file is of.
            same = response.headers.get("ETag") == sent
            if response.status_code == 416 or (response.status_code == 206 and not same):
                whole = response.status_code == 416 and same and _whole_length(response) == have
                stack.close()
                if whole:  # a run stopped as it renamed it: nothing is left to fetch
                    return _finish(
                        args, namespace, name, out, partial, etag_file, size=have, resumed_at=have
                    )
                have = 0  # another version's, or longer (edited by hand): start over
        if not have:
            response = stack.enter_context(_stream(http, url, headers))
        resumed = response.status_code == 206
        if not resumed:
            have = 0
        etag_file.write_text(response.headers["ETag"])
        size = have + int(response.headers["Content-Length"])
        progress = _progress(args, size)
        written = have
        with open(partial, "ab" if resumed else "wb") as file, progress or nullcontext():
            task = (
                progress.add_task(f"get {name}", total=size, completed=have) if progress else None
            )
            try:
                for chunk in response.iter_bytes(CHUNK):
                    file.write(chunk)
                    written += len(chunk)
                    if progress is not None:
                        progress.advance(task, len(chunk))
            except httpx.TransportError as exc:
                raise ClientError(
                    f"the download stopped at {written} of {size} bytes ({_reason(exc)});"
                    " run the same command again to resume"
                ) from None
    if written != size:
        raise ClientError(
            f"the download stopped at {written} of {size} bytes; run the same command again"
            " to resume"
        )
    return _finish(
        args,
        namespace,
        name,
        out,
        partial,
        etag_file,
        size=size,
        resumed_at=have if resumed else None,
    )


def _whole_length(response: httpx.Response) -> int | None:
    """The version's length a 416's ``Content-Range: bytes */LENGTH`` gives, if it does."""
    match = re.fullmatch(r"bytes \*/([0-9]+)", response.headers.get("Content-Range", "").strip())
    return int(match[1]) if match else None


def _finish(
    args: argparse.Namespace,
    namespace: str,
    name: str,
    out: str,
    partial: Path,
    etag_file: Path,
    *,
    size: int,
    resumed_at: int | None,
) -> str:
    """Move the whole download (``partial``) into place; what ``karma8 get`` says of it."""
    partial.replace(out)
    etag_file.unlink()
    if args.json:
        return json.dumps({"file": out, "size": size, "resumed_at": resumed_at})
    note = f" (resumed at {resumed_at} bytes)" if resumed_at is not None else ""
    return f"{namespace}/{name} -> {out}: {format_size(size)} ({size} bytes){note}"


@contextmanager
def _stream(
    http: httpx.Client, url: str, headers: dict[str, str], *, allow: int | None = None
) -> Iterator[httpx.Response]:
    """``http.stream("GET", ...)``, with a failed request (but an ``allow`` status) as a
    ClientError."""
    import httpx

    try:
        with http.stream("GET", url, headers=headers) as response:
            if response.status_code != allow:
                _raise_for_error(response)
            yield response
    except httpx.TransportError as exc:
        raise ClientError(f"cannot reach the gateway at {_origin(url)}: {_reason(exc)}") from None


def _ls(http: httpx.Client, target: Target, args: argparse.Namespace) -> str:
    namespace, prefix = split_path(args.path, name_required=False)
    files: list[dict[str, Any]] = []
    after = ""
    while True:
        params = {"prefix": prefix, "after": after, "limit": str(PAGE)}
        page = _request(
            http, "GET", f"{target.gateway}/{namespace}/", params=params, headers=target.headers()
        ).json()
        files += page["files"]
        if page["next_after"] is None:
            break
        after = page["next_after"]
    if args.json:
        return json.dumps(files)
    lines = [
        f"{f['size']:>14}  {datetime.fromtimestamp(f['committed_at'], UTC):%Y-%m-%d %H:%M:%S}"
        f"  {f['name']}"
        for f in files
    ]
    total = sum(f["size"] for f in files)
    count = f"{len(files)} file{'' if len(files) == 1 else 's'}"
    lines.append(f"{count}, {format_size(total)} ({total} bytes)")
    return "\n".join(lines)


def _rm(http: httpx.Client, target: Target, args: argparse.Namespace) -> str:
    namespace, name = split_path(args.path, name_required=True)
    _request(http, "DELETE", target.url(namespace, name), headers=target.headers())
    return json.dumps({"deleted": f"{namespace}/{name}"}) if args.json else ""


_COMMANDS = {"put": _put, "get": _get, "ls": _ls, "rm": _rm}
