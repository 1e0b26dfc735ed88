"""``karma8 namespace ...`` and ``karma8 token ...``: namespaces and access tokens, managed
through discovery's internal API (see docs/operations.md).

The HTTP client is imported only when a command runs: building the parser must stay cheap
for every other command (``karma8 sim``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import trio

from karma8.core.access import NamespaceInfo, TokenInfo
from karma8.core.errors import InvalidName, NotFound
from karma8.core.layout import ENGINES, engine_redundancy
from karma8.core.names import check_namespace
from karma8.core.tomlconf import ConfigError
from karma8.net.codec import encode

NOT_SHOWN_AGAIN = (
    "keep this token now: it is not shown again (discovery stores only its hash);"
    " send it as 'Authorization: Bearer TOKEN'"
)


def add_access_commands(
    commands: Any, cluster_args: Callable[[argparse.ArgumentParser], None]
) -> None:
    """The ``namespace`` and ``token`` commands; ``cluster_args`` adds the options that find
    the cluster (as ``karma8 nodes`` has)."""
    namespace = commands.add_parser("namespace", help="create, list or disable namespaces")
    actions = namespace.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a namespace (private unless --public)")
    create.add_argument("name")
    create.add_argument(
        "--public", action="store_true", help="anyone may read and write it, without a token"
    )
    create.add_argument(
        "--engine",
        choices=ENGINES,
        default="raid0",
        help="raid0: 5 parts (default); raid1: each part on --copies nodes;"
        " parity: 5 parts and --parity parity parts",
    )
    create.add_argument("--copies", type=int, help="raid1: copies of each part (default 2)")
    create.add_argument("--parity", type=int, help="parity: parity parts, 1 or 2 (default 1)")
    actions.add_parser("list", help="list namespaces")
    show = actions.add_parser("show", help="one namespace: access, state and engine")
    show.add_argument("name")
    disable = actions.add_parser("disable", help="refuse every request (404); files are kept")
    disable.add_argument("name")
    token = commands.add_parser("token", help="create, list or revoke access tokens")
    token_actions = token.add_subparsers(dest="action", required=True)
    create = token_actions.add_parser("create", help="a new token (printed once)")
    create.add_argument("namespace")
    create.add_argument("--read", action="store_true", help="it may GET, HEAD and list")
    create.add_argument("--write", action="store_true", help="it may PUT and DELETE")
    listing = token_actions.add_parser("list", help="tokens (never their secrets)")
    listing.add_argument("namespace", nargs="?")
    revoke = token_actions.add_parser("revoke", help="refuse a token from now on")
    revoke.add_argument("token_id", metavar="ID")
    for parser in (*actions.choices.values(), *token_actions.choices.values()):
        cluster_args(parser)


def run_access(args: argparse.Namespace, url: str, secret: str | None) -> tuple[str, str | None]:
    """Run ``karma8 namespace|token ACTION``: what to print on stdout, and on stderr."""
    check_arguments(args)
    result = trio.run(_call, args, url, secret)
    as_json = args.json
    if isinstance(result, tuple):  # token create
        token, info = result
        if as_json:
            return json.dumps({"token": token, **encode(info)}, indent=2), NOT_SHOWN_AGAIN
        return token, f"token {info.token_id} for {info.namespace} ({info.rights}): " + (
            NOT_SHOWN_AGAIN
        )
    if isinstance(result, NamespaceInfo | TokenInfo):
        result = [result]
    if args.command == "namespace":
        namespaces = [r for r in result if isinstance(r, NamespaceInfo)]
        if as_json:
            return json.dumps([encode(n) for n in namespaces], indent=2), None
        return namespaces_table(namespaces), None
    tokens = [r for r in result if isinstance(r, TokenInfo)]
    if as_json:
        return json.dumps([encode(t) for t in tokens], indent=2), None
    return tokens_table(tokens), None


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse a token without rights, a malformed name or engine setting here, as discovery
    would (the same checks), so that it is a usage error (exit 2) before anything is asked
    or the cluster is even looked for."""
    if args.command == "token" and args.action == "create" and not (args.read or args.write):
        raise ConfigError("give --read, --write or both")
    namespace = getattr(args, "name", None)
    if namespace is None:
        namespace = getattr(args, "namespace", None)
    try:
        if namespace is not None:
            check_namespace(namespace)
        if args.command == "namespace" and args.action == "create":
            engine_redundancy(args.engine, copies=args.copies, parity=args.parity)
    except (InvalidName, ValueError) as exc:
        raise ConfigError(str(exc)) from None


async def _call(args: argparse.Namespace, url: str, secret: str | None) -> Any:
    from karma8.net.clients import HttpDiscoveryClient, make_http_client  # httpx: only here

    async with make_http_client(secret, timeout=10.0) as http:
        discovery = HttpDiscoveryClient(http, url)
        match args.command, args.action:
            case "namespace", "create":
                return await discovery.create_namespace(
                    namespace=args.name,
                    public=args.public,
                    engine=args.engine,
                    copies=args.copies,
                    parity=args.parity,
                )
            case "namespace", "show":
                for info in await discovery.list_namespaces():
                    if info.name == args.name:
                        return info
                raise NotFound(f"namespace {args.name!r} does not exist")
            case "namespace", "list":
                return await discovery.list_namespaces()
            case "namespace", "disable":
                return await discovery.disable_namespace(namespace=args.name)
            case "token", "create":
                return await discovery.create_token(
                    namespace=args.namespace, read=args.read, write=args.write
                )
            case "token", "list":
                return await discovery.list_tokens(namespace=args.namespace)
            case "token", "revoke":
                return await discovery.revoke_token(token_id=args.token_id)
    raise AssertionError(f"unknown command {args.command} {args.action}")


def namespaces_table(namespaces: list[NamespaceInfo]) -> str:
    from karma8.net.admin import table

    rows = [("NAME", "ACCESS", "STATE", "ENGINE", "CREATED")]
    for n in namespaces:
        access = "public (anyone reads and writes)" if n.public else "tokens"
        state = "enabled" if n.enabled else "disabled"
        rows.append((n.name, access, state, engine_label(n), _time(n.created_at)))
    return table(rows)


def engine_label(n: NamespaceInfo) -> str:
    """``raid0``, ``raid1 x2`` or ``parity 5+1``, with the failures it tolerates."""
    if n.engine == "raid1":
        return f"raid1 x{n.copies} (survives {n.copies - 1} lost node)"
    if n.engine == "parity":
        return f"parity 5+{n.parity} (survives {n.parity} lost node{'s' if n.parity > 1 else ''})"
    return "raid0"


def tokens_table(tokens: list[TokenInfo]) -> str:
    from karma8.net.admin import table

    rows = [("ID", "NAMESPACE", "RIGHTS", "CREATED", "REVOKED")]
    for t in tokens:
        revoked = _time(t.revoked_at) if t.revoked_at is not None else "-"
        rows.append((t.token_id, t.namespace, t.rights, _time(t.created_at), revoked))
    return table(rows)


def _time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
