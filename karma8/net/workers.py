"""Gateway workers: more event loops behind one port.

One event loop runs all of a gateway's Python (HTTP parsing, the actors, trio's scheduler) on
one core. With ``gateway_workers = N`` a gateway (``--role gw``) starts N - 1 more gateways as
child processes that listen on the same port (the embedded cluster, with direct reads, starts
N and holds the port without serving it): each binds it with ``SO_REUSEPORT``, and the kernel
hands every new connection to one of the listening processes. The
children are this program itself, ``karma8 serve --role gw``, run with the parent's effective
configuration; they reach discovery and the storage nodes over HTTP. Why this layout, and what
was measured against it: docs/architecture.md, "Gateway workers".

Lifecycle, in the parent's nursery: :func:`run_gateway_workers` reports ready once every worker
printed its "up" line. A worker that exits while the parent runs brings the parent down with
:class:`WorkerExited`, naming the worker and its status: restarting it would hide a worker that
crashes again and again, and whatever supervises the parent (systemd, a container runtime)
restarts the whole, configuration included. Cancelling the parent (SIGINT, SIGTERM) terminates
every worker (SIGTERM, then SIGKILL after trio's grace) and waits for it to exit. Workers run in
a session of their own, so that a terminal's Ctrl-C reaches the parent alone, which stops them
in order. A worker also stops once the parent is gone, however it went (even SIGKILL): its
stdin is a pipe that only the parent holds open (:func:`exit_with_parent`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import trio

from karma8.net.locate import ENV_SECRET, ENV_SECRET_FILE
from karma8.net.requestlog import JsonFormatter

if TYPE_CHECKING:
    from karma8.net.netconfig import NetConfig

log = logging.getLogger("karma8.workers")

READY_PREFIX = "karma8 gateway up:"  # what ``karma8 serve --role gw`` prints once it listens
SHARED_PORT_FLAG = "--shared-port"  # the CLI's hidden flag: bind with SO_REUSEPORT
READ_FROM_FLAG = "--read-from"  # the CLI's hidden flag: a data directory to read directly
HANDOFF_FLAG = "--handoff"  # the CLI's hidden flag: the parent's socket for write connections
WRITES_FLAG = "--writes"  # the CLI's hidden flag: the parent's socket for small uploads


class WorkerExited(ChildProcessError):
    """A gateway worker exited on its own while the cluster ran."""


def check_port_free(host: str, port: int) -> None:
    """Raise OSError (EADDRINUSE) unless ``host:port`` could be bound now, as Hypercorn binds
    (port 0 always can), leaving nothing open either way."""
    if not port:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Hypercorn binds
        probe.bind((host.strip("[]"), port))


def shared_port_socket(host: str, port: int, *, joining: bool = False) -> socket.socket:
    """A TCP socket bound to ``host:port`` that other processes may bind too
    (``SO_REUSEPORT``, same user); port 0 picks a free port, which they then bind.

    Unless ``joining`` (a worker binding the port its parent bound), the port must be free,
    as for a plain bind: ``SO_REUSEPORT`` alone would let a second karma8 started on the
    same port join the first one's gateways, and the kernel would split connections between
    two clusters. Raises OSError (EADDRINUSE) then.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if not joining:
        check_port_free(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host.strip("[]"), port))  # Hypercorn calls listen()
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def exit_with_parent(
    scope: trio.CancelScope, *, on_gone: Callable[[], None] | None = None
) -> None:
    """A worker's watch on its parent: cancel ``scope`` once the pipe on this process's stdin,
    which the parent holds open, ends (the parent exited, however it did), after calling
    ``on_gone`` (to remove what a parent killed outright could not)."""
    async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as stdin:
        while await stdin.receive_some():
            pass
    print("karma8: the gateway that started this worker is gone, shutting down", file=sys.stderr)
    if on_gone is not None:
        on_gone()
    scope.cancel()


def worker_config_toml(config: NetConfig) -> str:
    """``config``'s top-level settings as a config file (``karma8/net/settings.py`` reads it
    back): a worker runs with exactly its parent's settings. The secret is left out."""
    lines = ["# A gateway worker's settings, written by its parent (karma8/net/workers.py)"]
    for field in attrs.fields(type(config)):
        value = getattr(config, field.name)
        if field.name in ("secret", "rebalance", "repair") or value is None:  # (not a gateway's)
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        elif isinstance(value, str):
            text = json.dumps(value)
        else:
            text = json.dumps(list(value))
        lines.append(f"{field.name} = {text}")
    return "\n".join(lines) + "\n"


def worker_command(
    config_path: str,
    *,
    port: int,
    discovery_url: str,
    read_from: Path | None = None,
    handoff: str | None = None,
    writes: str | None = None,
) -> list[str]:
    """``karma8 serve --role gw`` as one worker of a shared port, logging as this process
    does (its level, text or JSON lines), handing write connections to ``handoff``;
    ``read_from``: the data directory it reads directly (:mod:`karma8.net.direct`);
    ``writes``: the parent's socket that stores small uploads (:mod:`karma8.net.writepipe`)."""
    root = logging.getLogger()
    verbose = root.isEnabledFor(logging.INFO)
    json_lines = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    return [
        sys.executable,
        "-P",  # not the working directory first: this process's path (worker_env)
        "-m",
        "karma8.cli",
        "serve",
        "--role",
        "gw",
        "--config",
        config_path,
        "--port",
        str(port),
        "--discovery",
        discovery_url,
        "--workers",
        "1",
        SHARED_PORT_FLAG,
        *([READ_FROM_FLAG, str(read_from)] if read_from is not None else []),
        *([HANDOFF_FLAG, handoff] if handoff is not None else []),
        *([WRITES_FLAG, writes] if writes is not None else []),
        *(["--verbose"] if verbose else []),
        *(["--log-format", "json"] if json_lines else []),
    ]


def worker_env(parent: Mapping[str, str], secret: str) -> dict[str, str]:
    """A worker's environment: its parent's, with the secret (a command line is visible in
    ``ps``), and this process's module search path as ``PYTHONPATH``, so that the worker
    (``python -P``) imports exactly the code its parent runs. ``python -m`` alone would put
    the working directory first: started in a checkout of another karma8 version, the
    workers would run that code beside this parent (the pipe and handoff formats are one
    build's)."""
    env = {**parent, ENV_SECRET: secret}
    env.pop(ENV_SECRET_FILE, None)
    env["PYTHONPATH"] = os.pathsep.join(entry or os.getcwd() for entry in sys.path)
    return env


async def run_gateway_workers(
    count: int,
    config: NetConfig,
    *,
    port: int,
    discovery_url: str,
    read_from: Path | None = None,
    handoff: str | None = None,
    writes: str | None = None,
    task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``count`` gateway workers on ``port`` until cancelled; reports their pids once
    every one listens. Raises :class:`WorkerExited` if one exits on its own. ``handoff``:
    the Unix socket the workers hand their write connections to (karma8/net/handoff.py);
    ``writes``: the one they send small uploads to (karma8/net/writepipe.py)."""
    assert config.secret is not None
    env = worker_env(os.environ, config.secret)
    fd, path = tempfile.mkstemp(prefix="karma8-gateway-worker-", suffix=".toml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(worker_config_toml(config))
        command = worker_command(
            path,
            port=port,
            discovery_url=discovery_url,
            read_from=read_from,
            handoff=handoff,
            writes=writes,
        )
        pids: list[int] = []

        async def start_one(nursery: trio.Nursery) -> None:
            pids.append(await nursery.start(_run_worker, command, env))

        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as starting:  # all at once: ready in one start-up
                for _ in range(count):
                    starting.start_soon(start_one, nursery)
            os.unlink(path)  # read by every worker at its start
            log.info("gateway workers %s listening on port %d", pids, port)
            task_status.started(pids)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def _run_worker(
    command: Sequence[str], env: dict[str, str], *, task_status: trio.TaskStatus[int]
) -> None:
    """One worker: started, ready once it prints its "up" line, its stdout drained after."""
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(_supervise, command, env)
        assert process.stdout is not None
        ready = await _wait_ready(process.stdout)
        if ready:
            task_status.started(process.pid)
            await _drain(process.stdout)
        await trio.sleep_forever()  # _supervise raises once the process has exited


async def _supervise(
    command: Sequence[str], env: dict[str, str], *, task_status: trio.TaskStatus[trio.Process]
) -> None:
    """Run the worker; once it has exited (not cancelled), raise :class:`WorkerExited`."""
    run = partial(
        trio.run_process,
        list(command),
        stdin=subprocess.PIPE,  # held open by this process: see exit_with_parent
        stdout=subprocess.PIPE,
        env=env,
        check=False,
        start_new_session=True,
    )
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(run)
        task_status.started(process)
    status = process.returncode
    assert status is not None
    how = (
        f"was killed by {signal.Signals(-status).name}"
        if status < 0
        else f"exited with status {status}"
    )
    raise WorkerExited(f"gateway worker {process.pid} {how}; stopping the cluster")


async def _wait_ready(stdout: trio.abc.ReceiveStream) -> bool:
    """Read lines until the worker says it is up (True), or its stdout closes (False)."""
    buffer = b""
    while True:
        chunk = await stdout.receive_some()
        if not chunk:
            return False
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.decode(errors="replace").startswith(READY_PREFIX):
                return True


async def _drain(stdout: trio.abc.ReceiveStream) -> None:
    while await stdout.receive_some():
        pass
