"""The ``karma8`` command: wiring of the worlds to the actors.

karma8 sim SCENARIO.toml [--seed N] [--json] [--check-determinism] [--plot FILE.svg|.png]
karma8 serve [--role all|gw|discovery|storage] [--config FILE] [--data DIR] ...
karma8 status [--watch [S]] [--json]  the cluster on one screen
karma8 nodes [--json]                 storage nodes as discovery sees them, and rebalancing
karma8 nodes forget NODE_ID [--json]  an unavailable node is gone for good: rebuild its parts
karma8 stat NAMESPACE/NAME [--json]   a file's version, layout and parts
karma8 scrub [--json]                 verify every part on every node now
karma8 rebalance [--dry-run] [--json] rebalance now, or show the next round's plan
karma8 namespace create NAME [--public] | list | disable NAME
karma8 token create NAMESPACE [--read] [--write] | list [NAMESPACE] | revoke ID
karma8 put FILE NAMESPACE/NAME | get NAMESPACE/NAME [FILE|-] | ls NAMESPACE/[PREFIX] | rm ...
karma8 db version | upgrade [--metadata-url URL | --config FILE | --data DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

from karma8.core.errors import Karma8Error, NodeForgotten, Unavailable
from karma8.core.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from karma8.core.status import repair_line
from karma8.core.tomlconf import ConfigError
from karma8.core.units import parse_size
from karma8.metadata.schema import SchemaError
from karma8.net.access_admin import add_access_commands, check_arguments, run_access
from karma8.net.client import COMMANDS as CLIENT_COMMANDS
from karma8.net.client import add_client_commands, run_client, split_path, wrong_role
from karma8.net.dbadmin import add_db_commands, run_db
from karma8.net.locate import DATABASE_FILE, DEFAULT_DATA, ClusterRef, given_secrets, locate_cluster
from karma8.sim.fillseries import DEFAULT_INTERVAL

# A reader that closed stdout early (``karma8 nodes | head -1``), and Ctrl-C: the statuses a
# shell shows for a program killed by SIGPIPE or SIGINT (128 + the signal's number).
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
EXIT_INTERRUPTED = 128 + signal.SIGINT
ROLES = ("all", "gw", "discovery", "storage")
SECRET_HELP = "cluster secret (visible in `ps`: prefer --secret-file or KARMA8_SECRET)"
SECRET_FILE_HELP = "file holding the cluster secret (or KARMA8_SECRET_FILE)"
WATCH_EVERY = 2.0  # seconds between redraws of `karma8 status --watch`


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="karma8", description="A distributed HTTP file store.")
    commands = parser.add_subparsers(dest="command", required=True)

    sim = commands.add_parser("sim", help="run a scenario in the deterministic simulator")
    sim.add_argument("scenario", nargs="?", help="scenario file (TOML), see docs/scenarios.md")
    sim.add_argument("--seed", type=int, help="override the scenario's seed (swarm: first seed)")
    sim.add_argument(
        "--swarm",
        type=int,
        metavar="N",
        help="run N random scenarios (seeds from --seed, default 1); stop at the first failure",
    )
    sim.add_argument("--json", action="store_true", help="print one JSON object")
    sim.add_argument(
        "--check-determinism",
        action="store_true",
        help="run twice in this process and fail unless both traces are identical",
    )
    sim.add_argument(
        "--plot",
        metavar="FILE",
        help="draw each node's fill over simulated time into FILE (.svg or .png)",
    )
    sim.add_argument(
        "--sample-interval",
        type=float,
        default=DEFAULT_INTERVAL,
        metavar="S",
        help=f"virtual seconds between fill samples (default {DEFAULT_INTERVAL};"
        " long runs thin them)",
    )

    serve = commands.add_parser("serve", help="run karma8 services on real sockets")
    serve.add_argument(
        "--role",
        choices=ROLES,
        default="all",
        help="which service to run (default: the whole cluster, embedded)",
    )
    serve.add_argument("--config", type=Path, help="TOML file, see docs/configuration.md")
    serve.add_argument(
        "--data", type=Path, help=f"data directory (default ./{DEFAULT_DATA}; storage: its own dir)"
    )
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (0 = any free port)")
    serve.add_argument(
        "--discovery",
        help="discovery URL, or several comma-separated (gw and storage roles)",
        metavar="URL[,URL...]",
    )
    serve.add_argument("--secret", help=SECRET_HELP)
    serve.add_argument("--secret-file", type=Path, metavar="PATH", help=SECRET_FILE_HELP)
    serve.add_argument("--capacity", help="storage capacity, e.g. '20 GiB'")
    serve.add_argument("--nodes", type=int, help="storage nodes of --role all (default 6)")
    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="gateway processes sharing the gateway's port (all and gw roles; default: 1 per core)",
    )
    # A gateway worker started by another gateway (karma8/net/workers.py): it binds a port
    # that others share, and exits with its parent.
    serve.add_argument("--shared-port", action="store_true", help=argparse.SUPPRESS)
    # ... and reads its parent's metadata and small parts directly (karma8/net/direct.py).
    serve.add_argument("--read-from", type=Path, help=argparse.SUPPRESS)
    serve.add_argument("--handoff", metavar="PATH", help=argparse.SUPPRESS)
    serve.add_argument("--writes", metavar="PATH", help=argparse.SUPPRESS)
    serve.add_argument(
        "--rebalance-bandwidth",
        metavar="SIZE",
        help="bytes per second the rebalancer may copy, e.g. '16 MiB'; 0 = unthrottled"
        " (all and discovery roles)",
    )
    serve.add_argument(
        "--no-rebalance",
        action="store_true",
        help="do not rebalance on its own; `karma8 rebalance` still does (all and discovery)",
    )
    serve.add_argument(
        "-v", "--verbose", action="store_true", help="log more: one line per request too"
    )
    serve.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines as text (default) or one JSON object per line",
    )

    for name, help_text in (
        ("status", "the cluster on one screen: nodes, fill, files, uploads, rebalancing"),
        ("nodes", "list storage nodes"),
        ("stat", "show a file's parts"),
        ("scrub", "verify every part on every node now; quarantine corrupt ones"),
        ("rebalance", "move parts towards even filling now, or show the plan (--dry-run)"),
    ):
        admin = commands.add_parser(name, help=help_text)
        if name == "stat":
            admin.add_argument("path", help="NAMESPACE/NAME")
        if name == "status":
            admin.add_argument(
                "--watch",
                type=float,
                nargs="?",
                const=WATCH_EVERY,
                metavar="S",
                help=f"redraw every S seconds (default {WATCH_EVERY:g}) until Ctrl-C",
            )
        if name == "nodes":
            actions = admin.add_subparsers(dest="action", metavar="{forget}")
            forget = actions.add_parser(
                "forget",
                help="declare an unavailable node gone for good (its disk died): its parts"
                " are lost now, those of raid1 and parity files rebuilt elsewhere at once;"
                " its id may never register again",
            )
            forget.add_argument("node_id", metavar="NODE_ID", help="the node's id (karma8 nodes)")
            _cluster_args(forget)
        if name == "rebalance":
            admin.add_argument(
                "--dry-run",
                action="store_true",
                help="show the next round's moves per node; move nothing",
            )
        _cluster_args(admin)
    add_access_commands(commands, _cluster_args)
    add_client_commands(commands)
    add_db_commands(commands)
    return parser


def _cluster_args(admin: argparse.ArgumentParser) -> None:
    """The options of an admin command: where the cluster is, and --json."""
    admin.add_argument(
        "--discovery",
        metavar="URL[,URL...]",
        help="discovery URL, or several comma-separated (or KARMA8_DISCOVERY)",
    )
    admin.add_argument("--secret", help=SECRET_HELP)
    admin.add_argument("--secret-file", type=Path, metavar="PATH", help=SECRET_FILE_HELP)
    admin.add_argument("--config", type=Path, help="TOML file with discovery_url and secret")
    admin.add_argument(
        "--data",
        type=Path,
        help=f"the embedded cluster's directory, holding cluster.json (else ./{DEFAULT_DATA})",
    )
    admin.add_argument("--json", action="store_true", help="print JSON")


# -- serve -------------------------------------------------------------------------------


def _locate(args: argparse.Namespace, config: Any | None) -> ClusterRef:
    """The cluster a command uses (order: karma8/net/locate.py), announced on stderr.

    Stdout stays for the command's output (``--json``); the line says which cluster and
    where it came from, so that a stale ``cluster.json`` cannot be followed silently.
    """
    ref = locate_cluster(
        discovery=args.discovery,
        secret=args.secret,
        secret_file=args.secret_file,
        environ=os.environ,
        config_path=args.config,
        config_url=config.discovery_url if config is not None else None,
        config_secret=config.secret if config is not None else None,
        data=args.data,
    )
    if not getattr(args, "shared_port", False):  # a gateway worker: its parent said it
        print(f"karma8: {ref.describe()}", file=sys.stderr, flush=True)
    return ref


async def _until_signalled(run: Callable[[trio.Nursery], Awaitable[None]]) -> None:
    """Run services until SIGINT/SIGTERM, then cancel them (they shut down cleanly)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            # Start-up runs beside the signal loop: a node still waiting for discovery must
            # stop on SIGTERM too.
            nursery.start_soon(run, nursery)
            async for signum in signals:
                print(f"karma8: {signal.Signals(signum).name}, shutting down", file=sys.stderr)
                nursery.cancel_scope.cancel()
                break


def _serve(args: argparse.Namespace) -> int:
    from karma8.net import serve as net
    from karma8.net.bounds import descriptors_short, raise_open_files_limit, settle_heap
    from karma8.net.clients import make_http_client
    from karma8.net.discovery_role import check_metadata, run_discovery
    from karma8.net.handoff import remove_orphaned
    from karma8.net.requestlog import configure_logging
    from karma8.net.settings import PORT_MAX, load_net_config
    from karma8.net.workers import READY_PREFIX, exit_with_parent

    configure_logging(
        level=logging.INFO if args.verbose else logging.WARNING,
        json_lines=args.log_format == "json",
        role=args.role,
    )
    try:
        overrides: dict[str, Any] = {
            "host": args.host,
            "storage_nodes": args.nodes,
            "secret": next(
                (s for s, _ in given_secrets(args.secret, args.secret_file, os.environ) if s),
                None,
            ),
            "capacity": _size_flag("--capacity", args.capacity) if args.capacity else None,
            "gateway_workers": args.workers,
        }
        rebalance: dict[str, Any] = {
            "bandwidth": _bandwidth(args.rebalance_bandwidth),
            "enabled": False if args.no_rebalance else None,
        }
        if args.workers is not None and args.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {args.workers}")
        if args.port is not None and not 0 <= args.port <= PORT_MAX:
            raise ConfigError(f"--port must be between 0 and {PORT_MAX}, got {args.port}")
        config = load_net_config(args.config, overrides, rebalance)
    except (ConfigError, ValueError) as exc:
        print(f"karma8 serve: {exc}", file=sys.stderr)
        return EXIT_USAGE
    role = args.role
    short = descriptors_short(config.max_connections, raise_open_files_limit()[0])
    if short is not None:
        logging.getLogger("karma8.serve").warning("%s", short)
    if role in ("all", "discovery"):
        try:
            check_metadata(config)
        except (ConfigError, SchemaError) as exc:
            print(f"karma8 serve: {exc}", file=sys.stderr)
            return EXIT_FAILED

    async def run(nursery: trio.Nursery) -> None:
        if role == "all":
            data = args.data or DEFAULT_DATA
            cfg = config
            if args.port is not None:
                cfg = attrs.evolve(cfg, gateway_port=args.port)
            info = await nursery.start(partial(net.run_cluster, cfg, data_dir=data))
            print(
                f"karma8 cluster up: gateway {info.gateway}{_processes(cfg.gateway_workers)}"
                f"  discovery {info.discovery}  data {info.data_dir}",
                flush=True,
            )
            public = cfg.public(embedded=True)
            for namespace in public:
                print(
                    f"namespace {namespace!r} is public: anyone who can reach"
                    f" {info.gateway} can read and write it",
                    flush=True,
                )
            print(
                "a private namespace: karma8 namespace create NAME;"
                " then karma8 token create NAME --read --write",
                flush=True,
            )
            if public:
                print(f"try: curl -T FILE {info.gateway}/{public[0]}/hello.txt", flush=True)
        elif role == "discovery":
            data = args.data or DEFAULT_DATA
            data.mkdir(parents=True, exist_ok=True)
            url = await nursery.start(
                partial(
                    run_discovery,
                    config,
                    database=data / DATABASE_FILE,
                    port=args.port,
                )
            )
            print(f"karma8 discovery up: {url}", flush=True)
        else:
            if role == "storage" and args.data is None:
                raise ConfigError("--role storage needs --data DIR (its own directory)")
            cluster = _locate(args, config)
            cfg = attrs.evolve(config, secret=cluster.secret)
            # The pool to discovery (nodes heartbeat through it; a gateway's calls to the
            # nodes have a pool of their own).
            http = make_http_client(cluster.secret, max_connections=cfg.discovery_connections)
            await nursery.start(_hold_client, http)
            if args.shared_port:
                left = [path for path in (args.handoff, args.writes) if path is not None]
                nursery.start_soon(
                    partial(
                        exit_with_parent,
                        nursery.cancel_scope,
                        on_gone=partial(remove_orphaned, left),
                    )
                )
            if role == "storage":
                url = await nursery.start(
                    partial(
                        net.run_storage,
                        cfg,
                        data_dir=args.data,
                        discovery_url=cluster.discovery,
                        discovery_from=cluster.discovery_from,
                        http=http,
                        port=args.port,
                    )
                )
                print(f"karma8 storage node {net.load_node_id(args.data)} up: {url}", flush=True)
            else:
                url = await nursery.start(
                    partial(
                        net.run_gateway,
                        cfg,
                        discovery_url=cluster.discovery,
                        discovery_from=cluster.discovery_from,
                        http=http,
                        port=args.port,
                        shared_port=args.shared_port,
                        read_from=args.read_from,
                        handoff=args.handoff,
                        writes=args.writes,
                    )
                )
                print(f"{READY_PREFIX} {url}{_processes(cfg.gateway_workers)}", flush=True)
        settle_heap()  # up: what start-up built stays out of every collection from now on

    try:
        trio.run(_until_signalled, run)
    except BaseException as exc:  # turned into one line, or re-raised
        error = _user_error(exc)
        if error is None:
            raise
        if isinstance(error, BrokenPipeError):
            raise error from None  # stdout's reader left: main() stops quietly
        message = _message(error)
        if isinstance(error, socket.gaierror):  # the address to listen on
            message = f"host {config.host!r} (--host or the config's host): {message}"
        if isinstance(error, NodeForgotten) and role == "storage" and args.data is not None:
            message = f"{message} (its directory: {args.data})"
        print(f"karma8 serve: {message}", file=sys.stderr)
        return EXIT_USAGE if isinstance(error, ConfigError) else EXIT_FAILED
    return EXIT_OK


def _processes(workers: int) -> str:
    """How a gateway's ``up`` line names its workers, if it has any."""
    return f" ({workers} processes)" if workers > 1 else ""


def _bandwidth(raw: str | None) -> float | None:
    if raw is None:
        return None
    return float(_size_flag("--rebalance-bandwidth", raw))


def _size_flag(flag: str, raw: str) -> int:
    """A size given on the command line; an error names the flag."""
    try:
        return parse_size(raw)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def _user_error(exc: BaseException) -> Exception | None:
    """The configuration, OS or karma8 error inside ``exc`` (trio wraps them in groups)."""
    if isinstance(exc, ConfigError | OSError | Karma8Error):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _user_error(inner)
            if found is not None:
                return found
    return None


def _message(error: Exception) -> str:
    if isinstance(error, Karma8Error):
        return error.message
    if isinstance(error, OSError) and error.strerror and error.filename is None:
        return error.strerror  # karma8's own (a port, a node's directory): no "[Errno N]"
    return str(error)


async def _hold_client(http: Any, *, task_status: trio.TaskStatus[None]) -> None:
    async with http:
        task_status.started()
        await trio.sleep_forever()


# -- admin -------------------------------------------------------------------------------


def _admin(args: argparse.Namespace) -> int:
    from karma8.net import admin
    from karma8.net.codec import encode
    from karma8.net.settings import load_net_config

    url = None
    try:
        stat_path = None
        if args.command in ("namespace", "token"):
            check_arguments(args)
        elif args.command == "stat":
            stat_path = split_path(args.path, name_required=True)
        config = load_net_config(args.config, {}) if args.config is not None else None
        cluster = _locate(args, config)
        url, secret = cluster.discovery, cluster.secret
        if args.command == "nodes" and getattr(args, "action", None) == "forget":
            node = trio.run(admin.forget_node, url, secret, args.node_id)
            print(json.dumps(encode(node), indent=2) if args.json else admin.forgotten_text(node))
        elif args.command == "nodes":
            nodes, report, repair = trio.run(admin.fetch_nodes_and_movers, url, secret)
            print(
                json.dumps(admin.nodes_json(nodes, report, repair), indent=2)
                if args.json
                else "\n".join(
                    (admin.nodes_table(nodes), admin.rebalance_lines(report), repair_line(repair))
                )
            )
        elif args.command == "scrub":
            results = trio.run(admin.scrub_all, url, secret)
            print(json.dumps(results, indent=2) if args.json else admin.scrub_table(results))
            if any(r.get("corrupt") or "error" in r for r in results):
                return EXIT_FAILED
            if not any("checked" in r for r in results):
                print("karma8 scrub: no node could be scrubbed: none is up", file=sys.stderr)
                return EXIT_FAILED
        elif args.command == "status":
            _status(args, url, secret)
        elif args.command == "rebalance":
            _rebalance(args, url, secret)
        elif args.command in ("namespace", "token"):
            out, note = run_access(args, url, secret)
            print(out)
            if note is not None:
                print(f"karma8 {args.command} {args.action}: {note}", file=sys.stderr)
        else:
            assert stat_path is not None
            version, states = trio.run(admin.fetch_version, url, secret, *stat_path)
            print(
                json.dumps(admin.version_json(version, states), indent=2)
                if args.json
                else admin.version_table(version, states)
            )
    except ConfigError as exc:
        print(f"karma8 {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Unavailable as exc:
        print(
            f"karma8 {args.command}: cannot reach discovery at {url}: {exc.message}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except Karma8Error as exc:
        print(f"karma8 {args.command}: {exc.message}", file=sys.stderr)
        hint = wrong_role(url, "discovery") if url is not None else None
        if hint is not None:
            print(f"karma8 {args.command}: {hint}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _status(args: argparse.Namespace, url: str, secret: str | None) -> None:
    """``karma8 status``: once, or redrawn every ``--watch`` seconds until interrupted."""
    from rich.live import Live

    from karma8.net.codec import encode
    from karma8.net.status_view import fetch_status, make_console, render

    if args.watch is not None and not args.watch >= 0.1:
        raise ConfigError("--watch takes at least 0.1 seconds")
    status = trio.run(fetch_status, url, secret)
    if args.json:
        print(json.dumps(encode(status), indent=2))
        return
    console = make_console()
    if args.watch is None:
        console.print(render(status))
        return
    if not console.is_terminal:  # a pipe or a file: each screen after the last, as it comes
        while True:
            console.print(render(status), "")
            console.file.flush()
            time.sleep(args.watch)
            status = trio.run(fetch_status, url, secret)
    with Live(render(status), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(args.watch)
            live.update(render(trio.run(fetch_status, url, secret)), refresh=True)


def _rebalance(args: argparse.Namespace, url: str, secret: str | None) -> None:
    """``karma8 rebalance``: the plan (``--dry-run``), or start a pass; then the status."""
    from karma8.net import admin

    if args.dry_run:
        plan, report = trio.run(admin.fetch_plan, url, secret)
        print(
            json.dumps(admin.plan_json(plan, report), indent=2)
            if args.json
            else admin.plan_text(plan, report)
        )
        return
    report = trio.run(admin.start_rebalance, url, secret)
    print(
        json.dumps(admin.report_json(report), indent=2)
        if args.json
        else "rebalancing started: discovery runs a pass now, whatever the threshold\n"
        + admin.rebalance_lines(report)
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said with the command's own usage, not karma8's list of commands
        _innermost(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "sim":
            from karma8.sim.command import run_sim  # only here: an admin command needs none of it

            status = run_sim(args)
        elif args.command == "serve":
            status = _serve(args)
        elif args.command in CLIENT_COMMANDS:
            status = run_client(args)
        elif args.command == "db":
            status = run_db(args)
        else:
            status = _admin(args)
        sys.stdout.flush()  # a reader that left must show here, not when Python exits
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print(f"karma8 {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return status


def _innermost(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> argparse.ArgumentParser:
    """The (sub)command parser that parsed ``args``: ``karma8 db upgrade``'s, say."""
    while True:
        chosen = [
            action.choices[getattr(args, action.dest)]
            for action in parser._actions
            if isinstance(action, argparse._SubParsersAction)
            and getattr(args, action.dest, None) in action.choices
        ]
        if not chosen:
            return parser
        parser = chosen[0]


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's last flush at exit has nowhere to fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except OSError:  # stdout is not a file (a test's capture): nothing to flush into a pipe
        pass


if __name__ == "__main__":
    sys.exit(main())
