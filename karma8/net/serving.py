"""What every net-mode role stands on: Hypercorn serving an app, the pools to discovery
and to the nodes, and the real world's clock, ids and worker threads."""

from __future__ import annotations

import contextlib
import errno
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import TypeVar

import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.typing import Framework
from quart_trio import QuartTrio

from karma8.net.clients import HttpStorageClient, make_http_client
from karma8.net.handoff import Handoff, serve_handoffs
from karma8.net.http_fixes import (
    cap_connections,
    connection_handler,
    patch_hypercorn,
    route_connections,
)
from karma8.net.metrics import METRICS
from karma8.net.netconfig import HEADER_TIMEOUT, MAX_CONNECTIONS, NetConfig
from karma8.net.workers import check_port_free, shared_port_socket

T = TypeVar("T")
HASH_THREADS = 8  # per HTTP storage client; hashing releases the GIL


class ThreadRunner:
    """:class:`karma8.ports.MetadataRunner` for net mode: at most ``threads`` worker threads.

    Hashing a chunk takes a while; running it in a thread keeps the event loop serving bytes
    (and hashlib, which releases the GIL, uses another core).
    """

    def __init__(self, threads: int = 1) -> None:
        self._limiter = trio.CapacityLimiter(threads)

    async def __call__(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, limiter=self._limiter)

    async def read_ahead(self, fn: Callable[[], T]) -> T:
        """As ``__call__``: each call commits (and so is durable) before it returns."""
        return await self(fn)


class WallClock:
    def now(self) -> float:
        return time.time()


class RandomIds:
    def __init__(self) -> None:
        # The time part of the last version id: each next one is later, by a microsecond at
        # least, so ids stay unique and ordered in this process even if the clock steps back.
        self._last = 0

    def new_id(self) -> str:
        return secrets.token_hex(8)

    def new_version_id(self) -> str:
        self._last = max(self._last + 1, time.time_ns() // 1000)
        return f"{self._last:013x}{secrets.token_hex(4)}"


async def serve_app(
    app: Framework,
    *,
    host: str,
    port: int,
    read_timeout: int | None = 60,
    header_timeout: float = HEADER_TIMEOUT,
    app_queue: int = 10,
    max_connections: int = MAX_CONNECTIONS,
    reuse_port: bool = False,
    join_port: bool = False,
    adopt_from: str | None = None,
    hand_off_to: str | None = None,
    keep_small_writes: int | None = None,
    listen: bool = True,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` with Hypercorn until cancelled; reports ``http://host:port``.

    ``reuse_port``: bind with ``SO_REUSEPORT``, so that other processes (gateway workers)
    can listen on the same port and the kernel spreads new connections over them; the
    first of them finds the port free, or fails as a plain bind would, and the others
    ``join_port``.
    ``adopt_from``: also serve the connections workers hand over on a Unix socket at this
    path; ``hand_off_to``: hand write connections to the gateway listening there
    (:mod:`karma8.net.handoff`), but those whose first request writes at most
    ``keep_small_writes`` bytes. Not ``listen``: only hold the port (bound with
    ``SO_REUSEPORT``, not listening, so the kernel gives its connections to the other
    processes on it) and serve what ``adopt_from`` brings.
    """
    patch_hypercorn()
    config = HypercornConfig()
    cap_connections(config, max_connections)
    handoff = None
    if hand_off_to is not None:
        handoff = Handoff(hand_off_to, timeout=header_timeout, small_max=keep_small_writes)
        route_connections(config, handoff.divert)
    held = None
    with _naming_the_port(host, port):
        if not listen:
            held = shared_port_socket(host, port)  # Hypercorn binds nothing: no config.bind
        elif reuse_port:
            # Hypercorn sets SO_REUSEPORT only for its own multi-worker mode; a socket handed
            # over by descriptor is taken as it is (and closed by Hypercorn).
            shared = shared_port_socket(host, port, joining=join_port)
            config.bind = [f"fd://{shared.detach()}"]
        else:
            check_port_free(host, port)  # (Hypercorn's bind leaks its socket when it fails)
            config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.read_timeout = read_timeout or None
    # Covers the wait for a request's headers too: Hypercorn's idle timer runs from the
    # connection's start (or the previous answer) until a whole request head has arrived.
    config.keep_alive_timeout = header_timeout
    # Messages (body pieces of up to http_fixes.RECEIVE_SIZE) queued for a request that is
    # not reading: Hypercorn's max_app_queue_size (default 10).
    config.max_app_queue_size = app_queue
    counted = METRICS.source(handoff.samples) if handoff else contextlib.nullcontext()
    try:
        with counted:
            async with trio.open_nursery() as nursery:
                if adopt_from is not None:
                    handler = connection_handler(app, config)
                    await nursery.start(serve_handoffs, adopt_from, handler)
                if held is None:
                    with _naming_the_port(host, port):
                        urls: list[str] = await nursery.start(hypercorn_serve, app, config)
                    task_status.started(urls[0])
                else:
                    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
                    task_status.started(f"http://{shown}:{held.getsockname()[1]}")
                    await trio.sleep_forever()  # holds the port until cancelled
    finally:
        if held is not None:
            held.close()
        if handoff is not None:
            handoff.close()


def serving(
    app: QuartTrio,
    config: NetConfig,
    port: int,
    *,
    app_queue: int = 10,
    reuse_port: bool = False,
    join_port: bool = False,
    adopt_from: str | None = None,
    hand_off_to: str | None = None,
    keep_small_writes: int | None = None,
    listen: bool = True,
) -> Callable[..., Awaitable[None]]:
    """``serve_app`` for ``app`` bound with the config's host and read timeout."""
    return partial(
        serve_app,
        app,
        host=config.host,
        port=port,
        read_timeout=config.read_timeout,
        header_timeout=config.header_timeout,
        app_queue=app_queue,
        max_connections=config.max_connections,
        reuse_port=reuse_port,
        join_port=join_port,
        adopt_from=adopt_from,
        hand_off_to=hand_off_to,
        keep_small_writes=keep_small_writes,
        listen=listen,
    )


def storage_client(config: NetConfig, http: httpx.AsyncClient) -> HttpStorageClient:
    """Storage nodes over ``http`` (a pool of its own), ``node_connections`` per node."""
    return HttpStorageClient(
        http, blocking=ThreadRunner(HASH_THREADS), node_connections=config.node_connections
    )


def data_pool(config: NetConfig) -> httpx.AsyncClient:
    """The pool to storage nodes: bounded per node by :func:`storage_client`."""
    return make_http_client(config.secret, max_connections=None)


def control_pool(config: NetConfig) -> httpx.AsyncClient:
    """The pool to discovery, apart from the nodes' one."""
    return make_http_client(config.secret, max_connections=config.discovery_connections)


@contextlib.contextmanager
def _naming_the_port(host: str, port: int) -> Iterator[None]:
    """A bind that fails because the address is taken says which one (the OS's message
    does not, and a cluster binds several)."""

    def taken(exc: BaseException) -> bool:
        return isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE

    try:
        yield
    except BaseException as exc:  # Hypercorn's bind fails inside its nurseries: in groups
        if isinstance(exc, BaseExceptionGroup):
            match, rest = exc.split(taken)
            found = match is not None and rest is None  # (a cancellation, say, goes on)
        else:
            found = taken(exc)
        if not found:
            raise
        raise OSError(
            errno.EADDRINUSE,
            f"{host}:{port} is already in use (another karma8, or another program)",
        ) from None
