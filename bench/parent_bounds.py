"""Upper bounds of a small PUT with parts of discovery's work taken out of the embedded
cluster's parent process: not stores (nothing they acknowledge is durable or even recorded),
experiments that say what moving that work elsewhere could gain.

    KARMA8_LAUNCH="$PWD/.venv/bin/python $PWD/bench/parent_bounds.py VARIANT" \\
        bench/put_cpu.sh "$PWD" 10

VARIANT:
- ``nowait``: discovery's SQL runs as it does, but no call waits for the log's sync (the
  cost of the metadata's durability waits);
- ``nosql``: placement from a view of the nodes read once, and commits that write nothing
  (the cost of discovery's SQL in the parent's event loop);
- ``apart``: a stored PUT (unlike the other two): a small upload's two discovery calls
  (place, commit) made by a second process, a discovery of its own on the same database,
  over a Unix socket with JSON frames (what moving discovery out of the parent would cost,
  built the plain way). Its CPU is counted among the workers' by ``bench/put_cpu.sh``.
- ``process``: a stored PUT: the cluster's one discovery in a child process that owns the
  database; every discovery call of the parent (the gateway's, the nodes' heartbeats) made
  over one Unix socket carrying many calls at once, pickled (a process of the same user, in
  a private temporary directory). Its CPU is counted among the workers' too.
- ``shared``: a stored PUT: the cluster's gateway (``gateway_workers = 1``: its own process
  parses and stores) binds its port with ``SO_REUSEPORT``, so that several independent
  clusters share one port (``bench/put_shared_nothing.sh``: each process stores what it
  parses, nothing between them: how far spreading whole PUTs over the cores goes).

- ``threadsql``: a stored PUT: discovery's calls queued to its log round, whose thread runs
  them in one transaction before the log's sync (the SQL off the parent's loop, in batches;
  placements still inline on the loop).

Variants join with ``+`` (``shared+nosql``: each shared-nothing cluster without discovery's
SQL). Then runs ``karma8`` with the remaining arguments. docs/benchmarks.md has the results.
"""

from __future__ import annotations

import atexit
import inspect
import json
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import trio

from karma8.core.layout import StripeLayout
from karma8.core.model import (
    FileVersion,
    NodeRef,
    PartPlacement,
    PartReceipt,
    VersionState,
    part_key,
)
from karma8.core.placement import NodeLoad
from karma8.metadata.store import SqlMetadataStore
from karma8.net.metasync import GroupCommitRunner
from karma8.store.groupsync import GroupSync

T = TypeVar("T")


def no_waits() -> None:
    async def call(self: GroupCommitRunner, fn: Callable[[], T]) -> T:
        await trio.lowlevel.checkpoint()
        return fn()

    GroupCommitRunner.__call__ = call  # type: ignore[method-assign]


def no_sql() -> None:
    views: dict[str, list[tuple[NodeLoad, str]]] = {}
    read_view = SqlMetadataStore.placement_view

    def view(
        self: SqlMetadataStore, namespace: str, name: str, *, if_absent: bool
    ) -> list[tuple[NodeLoad, str]]:
        if namespace not in views:
            views[namespace] = read_view(self, namespace, name, if_absent=if_absent)
        return views[namespace]

    def commit(
        self: SqlMetadataStore,
        *,
        version_id: str,
        namespace: str,
        name: str,
        layout: StripeLayout,
        nodes: Sequence[str],
        size: int,
        receipts: Sequence[PartReceipt],
        created_at: float,
        now: float,
        **_: Any,
    ) -> FileVersion:
        by_index = {r.index: r for r in receipts}
        parts = tuple(
            PartPlacement(
                index=i,
                key=part_key(version_id, i),
                node=NodeRef(node_id=node, url="http://unrecorded"),
                size=by_index[i].size,
                checksum=by_index[i].checksum,
            )
            for i, node in enumerate(nodes)
        )
        return FileVersion(
            version_id=version_id,
            namespace=namespace,
            name=name,
            state=VersionState.COMMITTED,
            size=size,
            layout=layout,
            parts=parts,
            created_at=created_at,
            committed_at=now,
            etag="unrecorded",
        )

    SqlMetadataStore.placement_view = view  # type: ignore[method-assign]
    SqlMetadataStore.commit_placed = commit  # type: ignore[method-assign]


_FRAME = struct.Struct(">I")


async def _read_frame(
    stream: trio.SocketStream, buffer: bytearray, loads: Callable[[bytes], Any] = json.loads
) -> Any:
    while True:
        if len(buffer) >= _FRAME.size:
            (size,) = _FRAME.unpack_from(buffer)
            if len(buffer) >= _FRAME.size + size:
                obj = loads(bytes(buffer[_FRAME.size : _FRAME.size + size]))
                del buffer[: _FRAME.size + size]
                return obj
        chunk = await stream.receive_some(1 << 20)
        if not chunk:
            raise EOFError
        buffer += chunk


def _frame(obj: Any) -> bytes:
    data = json.dumps(obj).encode()
    return _FRAME.pack(len(data)) + data


async def _serve_unix(
    path: str, report: str, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> None:
    """A child's listener on a Unix socket; ``report`` says "ready" once it listens."""
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(256)
    await trio.Path(report).write_text("ready")
    await trio.serve_listeners(handler, [trio.SocketListener(listener)])


def _run_reporting(serve: Callable[[], Awaitable[None]], report: str) -> None:
    """Run a child until SIGINT, then write its CPU seconds to ``report``."""
    try:
        trio.run(serve)
    except KeyboardInterrupt:
        pass
    finally:
        Path(report).write_text(f"{time.process_time():.3f}")


def discovery_child(database: str, path: str, report: str) -> None:
    """The ``apart`` variant's other process: a discovery of its own on the same database,
    placing and committing what the parent's gateway asks over a Unix socket."""
    from karma8.core.errors import Karma8Error
    from karma8.net.codec import encode, error_body
    from karma8.net.discovery_role import build_discovery, open_metadata
    from karma8.net.netconfig import NetConfig

    async def serve() -> None:
        config = NetConfig()
        discovery = build_discovery(config, open_metadata(config, Path(database)), embedded=True)

        async def connection(stream: trio.SocketStream) -> None:
            buffer = bytearray()
            while True:
                try:
                    call = await _read_frame(stream, buffer)
                except (EOFError, trio.BrokenResourceError):
                    return
                try:
                    if call["m"] == "place":
                        answer = await discovery.place_upload(**call["a"])
                    else:
                        receipts = [PartReceipt(**r) for r in call["a"].pop("receipts")]
                        answer = await discovery.commit_upload(**call["a"], receipts=receipts)
                    reply: Any = {"version": encode(answer)}
                except Karma8Error as exc:
                    reply = error_body(exc)
                await stream.send_all(_frame(reply))

        await _serve_unix(path, report, connection)

    _run_reporting(serve, report)


def discovery_apart() -> None:
    """Discovery's two calls of a small upload (place, commit) made by another process on the
    same database, over a Unix socket: the parent keeps its own discovery for the rest."""
    from karma8.actors.discovery import Discovery
    from karma8.core.errors import error_from_code
    from karma8.net import discovery_role
    from karma8.net.codec import decode, encode

    workdir = Path(tempfile.mkdtemp(prefix="karma8-apart-"))
    atexit.register(shutil.rmtree, workdir, True)  # registered first: runs after the report
    path, report = str(workdir / "discovery.sock"), str(workdir / "cpu")
    build = discovery_role.build_discovery
    idle: list[tuple[trio.SocketStream, bytearray]] = []

    async def call(method: str, arguments: dict[str, Any]) -> FileVersion:
        conn = idle.pop() if idle else (await trio.open_unix_socket(path), bytearray())
        await conn[0].send_all(_frame({"m": method, "a": arguments}))
        reply = await _read_frame(*conn)
        idle.append(conn)
        if "error" in reply:
            raise error_from_code(reply["error"]["code"], reply["error"]["message"])
        return decode(reply["version"], FileVersion)

    async def place(self: Discovery, **arguments: Any) -> FileVersion:
        return await call("place", arguments)

    async def commit(self: Discovery, *, receipts: Sequence[PartReceipt], **rest: Any) -> Any:
        return await call("commit", {**rest, "receipts": [encode(r) for r in receipts]})

    def build_then_start_child(config: Any, store: Any, **kwargs: Any) -> Discovery:
        discovery = build(config, store, **kwargs)
        child = subprocess.Popen(
            [sys.executable, __file__, "_child", store._path, path, report],
            stdin=subprocess.DEVNULL,
        )
        atexit.register(child.send_signal, signal.SIGINT)
        atexit.register(lambda: print(f"discovery apart: {Path(report).read_text()} s of CPU"))
        while not Path(report).exists():
            time.sleep(0.05)
        Discovery.place_upload = place  # type: ignore[method-assign]
        Discovery.commit_upload = commit  # type: ignore[method-assign]
        return discovery

    from karma8.net import serve

    setattr(serve, "build_discovery", build_then_start_child)  # noqa: B010  # it imported it


def _pickled(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _FRAME.pack(len(data)) + data


def process_child(config_file: str, database: str, path: str, report: str) -> None:
    """The ``process`` variant's other process: the cluster's only discovery, owning its
    database, answering every call the parent's proxies make over one Unix socket."""
    from karma8.net.discovery_role import build_discovery, open_metadata

    config = pickle.loads(Path(config_file).read_bytes())

    async def serve() -> None:
        discovery = build_discovery(config, open_metadata(config, Path(database)), embedded=True)

        async def connection(stream: trio.SocketStream) -> None:
            buffer = bytearray()
            lock = trio.Lock()

            async def run(call_id: int, method: str, args: Any, kwargs: Any) -> None:
                try:
                    reply = (call_id, True, await getattr(discovery, method)(*args, **kwargs))
                except Exception as exc:
                    reply = (call_id, False, exc)
                async with lock:
                    await stream.send_all(_pickled(reply))

            async with trio.open_nursery() as calls:
                while True:
                    try:
                        call = await _read_frame(stream, buffer, pickle.loads)
                    except (EOFError, trio.BrokenResourceError):
                        calls.cancel_scope.cancel()
                        return
                    calls.start_soon(run, *call)

        async with trio.open_nursery() as nursery:
            await nursery.start(discovery.run)
            await _serve_unix(path, report, connection)

    _run_reporting(serve, report)


def discovery_process() -> None:
    """Every discovery call of the parent made by another process, the only one writing the
    database, over one Unix socket with pickled calls (many in flight)."""
    from karma8.actors.discovery import Discovery
    from karma8.net import discovery_role

    workdir = Path(tempfile.mkdtemp(prefix="karma8-process-"))
    atexit.register(shutil.rmtree, workdir, True)  # registered first: runs after the report
    path, report = str(workdir / "discovery.sock"), str(workdir / "cpu")
    build = discovery_role.build_discovery
    state: dict[str, Any] = {"ids": 0, "waiting": {}}

    async def reader(stream: trio.SocketStream) -> None:
        buffer = bytearray()
        while True:
            call_id, ok, value = await _read_frame(stream, buffer, pickle.loads)
            event, box = state["waiting"].pop(call_id)
            box.append((ok, value))
            event.set()

    async def connect() -> trio.SocketStream:
        if "stream" not in state:
            state["stream"] = await trio.open_unix_socket(path)
            state["lock"] = trio.Lock()
            trio.lowlevel.spawn_system_task(reader, state["stream"])
        stream: trio.SocketStream = state["stream"]
        return stream

    def proxy(method: str) -> Any:
        async def call(self: Discovery, *args: Any, **kwargs: Any) -> Any:
            stream = await connect()
            state["ids"] += 1
            call_id = state["ids"]
            event, box = trio.Event(), []  # type: ignore[var-annotated]
            state["waiting"][call_id] = (event, box)
            async with state["lock"]:
                await stream.send_all(_pickled((call_id, method, args, kwargs)))
            await event.wait()
            ok, value = box[0]
            if not ok:
                raise value
            return value

        return call

    async def idle(self: Discovery, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def never_lead(self: Discovery, role: str) -> bool:
        return False

    def build_then_start_child(config: Any, store: Any, **kwargs: Any) -> Discovery:
        discovery = build(config, store, **kwargs)
        config_file = workdir / "config"
        config_file.write_bytes(pickle.dumps(config))
        child = subprocess.Popen(
            [sys.executable, __file__, "_process", str(config_file), store._path, path, report],
            stdin=subprocess.DEVNULL,
        )
        atexit.register(child.send_signal, signal.SIGINT)
        atexit.register(lambda: print(f"discovery process: {Path(report).read_text()} s of CPU"))
        while not Path(report).exists():
            time.sleep(0.05)
        for method, fn in list(vars(Discovery).items()):
            if inspect.iscoroutinefunction(fn) and not method.startswith("_"):
                setattr(Discovery, method, proxy(method))  # run and lead: below
        Discovery.run = idle  # type: ignore[method-assign]
        Discovery.lead = never_lead  # type: ignore[method-assign]
        return discovery

    from karma8.net import serve

    setattr(serve, "build_discovery", build_then_start_child)  # noqa: B010  # it imported it


def shared_port() -> None:
    """The gateway binds its port with SO_REUSEPORT even without workers."""
    from karma8.net import serve

    serve_gateway = serve.serve_gateway

    async def sharing(*args: Any, **kwargs: Any) -> None:
        # Every cluster joins the port: none is its first binder, which would refuse one in use.
        await serve_gateway(*args, **{**kwargs, "reuse_port": True, "join_port": True})

    setattr(serve, "serve_gateway", sharing)  # noqa: B010  # run_cluster looks it up there


def sql_in_rounds() -> None:
    """Discovery's calls run in its log round's thread, as one transaction per round, then
    the log's sync: the loop only queues them (placements still run inline, reading the
    connection between the thread's statements)."""
    queued: dict[int, list[list[Any]]] = {}
    taking: dict[int, list[list[Any]]] = {}
    original_init = GroupCommitRunner.__init__

    def init(self: GroupCommitRunner, store: Any, **kwargs: Any) -> None:
        original_init(self, store, **kwargs)
        queued[id(self)] = []

        def take() -> None:
            taking[id(self)], queued[id(self)] = queued[id(self)], []

        def round_() -> None:
            db = store._db
            calls = taking.pop(id(self), [])
            if calls:
                db.execute("BEGIN IMMEDIATE")
                for call in calls:
                    try:
                        call[1] = call[0]()
                    except Exception as exc:
                        call[2] = exc
                db.execute("COMMIT")
            store.sync_wal()
            if store.log_bytes() >= 4 << 20:
                store.checkpoint()

        self.group = GroupSync(round_, name="discovery log", prepare=take)

    async def call(self: GroupCommitRunner, fn: Callable[[], T]) -> T:
        await self._admit()
        entry: list[Any] = [fn, None, None]
        queued[id(self)].append(entry)
        await self.group.sync()
        if entry[2] is not None:
            raise entry[2]
        return entry[1]  # type: ignore[no-any-return]

    async def read_ahead(self: GroupCommitRunner, fn: Callable[[], T]) -> T:
        await self._admit()
        return fn()

    GroupCommitRunner.__init__ = init  # type: ignore[method-assign]
    GroupCommitRunner.__call__ = call  # type: ignore[method-assign]
    GroupCommitRunner.read_ahead = read_ahead  # type: ignore[method-assign]


VARIANTS = {
    "nowait": no_waits,
    "threadsql": sql_in_rounds,
    "nosql": no_sql,
    "apart": discovery_apart,
    "process": discovery_process,
    "shared": shared_port,
}

if __name__ == "__main__":
    if sys.argv[1] == "_process":
        process_child(*sys.argv[2:6])
        sys.exit(0)
    if sys.argv[1] == "_child":
        discovery_child(*sys.argv[2:5])
        sys.exit(0)
    for variant in sys.argv[1].split("+"):  # e.g. shared+nosql: both at once
        VARIANTS[variant]()
    from karma8.cli import main

    sys.argv = ["karma8", *sys.argv[2:]]
    main()
