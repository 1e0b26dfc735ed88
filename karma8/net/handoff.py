"""Write connections handed from gateway workers to the gateway that started them.

A gateway worker reaches discovery and the storage nodes over HTTP, where the parent gateway
calls them in-process, so a write costs the worker several times what it costs the parent.
A worker therefore peeks at each new connection's first bytes (``MSG_PEEK``: nothing is
consumed) and, when its first request's method is neither GET nor HEAD, sends the
connection's descriptor to the parent over a Unix stream socket (``SCM_RIGHTS``) and closes
its own copy; the parent serves it as a connection it accepted itself. Reads, bytes that are
not a request line, and anything the handoff cannot deliver stay with the worker, and so do
later requests on a kept-alive connection: only the first request decides.

The parent's socket lives in a private directory (0700) that it removes at exit
(:func:`handoff_socket`); a worker dials it when it first needs it (:class:`Handoff`);
:func:`serve_handoffs` takes the descriptors and validates each (closing strays), and
serves every adopted connection with the handler the parent gives it.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import shutil
import socket
import stat
import struct
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Iterator
from functools import partial
from typing import Literal

import trio

from karma8.net.metrics import Sample

log = logging.getLogger("karma8.handoff")

READS = frozenset({b"GET", b"HEAD"})  # the methods a worker serves itself
METHOD_MAX = 7  # the longest standard method (OPTIONS, CONNECT): a longer first word stays
MESSAGE = b"C"  # the one byte each descriptor travels with
FDS_MAX = 4  # room for this many descriptors per message: more than one is refused
SOCKET_NAME = "handoff.sock"
DIRECTORY_PREFIX = "karma8-handoff-"  # the parent's private directory for its sockets
SUN_PATH_MAX = 108  # bytes of a Unix socket's path, its terminating NUL included (Linux)
ACCEPT_RETRY = 0.1  # seconds before accepting again after an error (out of descriptors)

HEAD_MAX = 8192  # the bytes a worker peeks at for a write's Content-Length

Kind = Literal["read", "write", "small_write", "other"]


def classify(head: bytes, small_max: int | None = None) -> Kind | None:
    """What a connection's first bytes say about its first request: ``read`` (GET, HEAD),
    ``write`` (any other method), ``other`` (not a request line); None: too few bytes yet.

    With ``small_max``, a PUT whose head (within :data:`HEAD_MAX` bytes) declares a
    ``Content-Length`` of at most ``small_max`` (and no ``Transfer-Encoding``) is
    ``small_write``: a worker that can send small uploads to its parent keeps it. Lines may
    end in a bare LF, as h11 accepts."""
    word, space, _ = head.partition(b" ")
    if len(word) > METHOD_MAX or (word and not (word.isalpha() and word.isupper())):
        return "other"
    if not space:
        return None
    if not word:
        return "other"
    if word in READS:
        return "read"
    if small_max is None or word != b"PUT":
        return "write"
    ends = [i for i in (head.find(b"\n\n"), head.find(b"\n\r\n")) if i >= 0]
    if not ends:
        return None if len(head) < HEAD_MAX else "write"
    length = declared_length(head[: min(ends)])
    return "small_write" if length is not None and length <= small_max else "write"


def declared_length(head: bytes) -> int | None:
    """The one ``Content-Length`` of a request head (request line and header lines), or None
    if it has none, several, a malformed one, or a ``Transfer-Encoding``."""
    length = None
    for line in head.split(b"\n")[1:]:
        field, colon, value = line.removesuffix(b"\r").partition(b":")
        if not colon:
            return None
        field = field.lower()
        if field == b"transfer-encoding":
            return None
        if field == b"content-length":
            value = value.strip()
            if length is not None or not value.isdigit() or len(value) > 19:
                return None
            length = int(value)
    return length


async def first_request_kind(sock: trio.socket.SocketType, small_max: int | None = None) -> Kind:
    """Peek at ``sock`` until its first bytes :func:`classify` (with ``small_max``). An
    undecided prefix of n bytes waits for byte n + 1 (``SO_RCVLOWAT``), not in a loop; the
    option is put back before this returns. The end of the stream, or an error, is
    ``other``."""
    lowat = 1
    peek = METHOD_MAX + 1 if small_max is None else HEAD_MAX
    try:
        while True:
            head = await sock.recv(peek, socket.MSG_PEEK)
            kind = classify(head, small_max) if head else "other"
            if kind is not None:
                return kind
            if len(head) < lowat:  # readable, yet no new byte: the peer closed its side
                return "other"
            lowat = len(head) + 1
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
            await trio.lowlevel.wait_readable(sock)
    except OSError:
        return "other"
    finally:
        if lowat != 1:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


class Handoff:
    """A worker's end: :meth:`divert` hands a write connection to the parent at ``path``.

    The connection to the parent is dialled on first use and again after it broke; a send
    never waits (a parent that is not taking descriptors leaves the connection here).
    ``timeout``: how long a connection may take to show its first request's method, the
    header timeout the worker's Hypercorn applies to it. ``small_max``: a worker that sends
    small uploads to its parent (:mod:`karma8.net.writepipe`) keeps the connections whose
    first request is a PUT of at most this many bytes.
    """

    def __init__(self, path: str, *, timeout: float, small_max: int | None = None) -> None:
        self.path = path
        self.timeout = timeout
        self.small_max = small_max
        self._parent: socket.socket | None = None
        self.handed = 0  # connections the parent took

    async def divert(self, stream: trio.SocketStream) -> bool:
        """True: ``stream`` is no longer this worker's (the parent took it, or it showed no
        method in time, or a PUT no whole head, and is closed as the header timeout closes
        it). False: serve it."""
        with trio.move_on_after(self.timeout):
            kind = await first_request_kind(stream.socket, self.small_max)
            if kind != "write" or not self._send(stream.socket.fileno()):
                return False
            self.handed += 1
        await stream.aclose()  # this copy; the parent's stays open
        return True

    def _send(self, fd: int) -> bool:
        for _ in range(2):  # a broken connection (the parent restarted its socket) once again
            parent = self._parent or self._dial()
            if parent is None:
                return False
            try:
                socket.send_fds(parent, [MESSAGE], [fd], socket.MSG_NOSIGNAL)
                return True
            except BlockingIOError:
                return False  # the parent is behind: this worker serves it
            except OSError as exc:
                log.debug("handing a connection to the gateway failed: %s", exc)
                parent.close()
                self._parent = None
        return False

    def _dial(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            log.debug("cannot reach the gateway's handoff socket %s: %s", self.path, exc)
            return None
        self._parent = sock
        return sock

    async def samples(self) -> Iterable[Sample]:
        """For ``/metrics`` (each process counts its own)."""
        return [
            (
                "karma8_gateway_handed_off",
                "counter",
                "Connections this gateway worker handed to its parent (a first request that"
                " writes)",
                {},
                self.handed,
            )
        ]

    def close(self) -> None:
        if self._parent is not None:
            self._parent.close()
            self._parent = None


@contextlib.contextmanager
def handoff_socket(enabled: bool = True) -> Iterator[str | None]:
    """The path for a parent's handoff socket, in a private directory (0700) removed on exit;
    None when not ``enabled`` (no workers, nothing to hand off)."""
    if not enabled:
        yield None
        return
    directory = tempfile.mkdtemp(prefix=DIRECTORY_PREFIX)
    if len(os.fsencode(os.path.join(directory, SOCKET_NAME))) >= SUN_PATH_MAX:
        os.rmdir(directory)  # a long TMPDIR: a Unix socket's path is short
        directory = tempfile.mkdtemp(prefix=DIRECTORY_PREFIX, dir="/tmp")
    try:
        yield os.path.join(directory, SOCKET_NAME)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def remove_orphaned(paths: Iterable[str]) -> None:
    """What a parent killed outright (SIGKILL) left behind, removed by its worker once it is
    gone: each path that is a socket, then their directory if it is one of
    :func:`handoff_socket`'s and now empty. Nothing else is ever removed."""
    directories = set()
    for path in paths:
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        directories.add(os.path.dirname(path))
    for directory in directories:
        if os.path.basename(directory).startswith(DIRECTORY_PREFIX):
            with contextlib.suppress(OSError):  # not empty, or another worker was first
                os.rmdir(directory)


async def serve_handoffs(
    path: str,
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen at ``path`` until cancelled; run ``handler`` on every connection a worker hands
    over, closing the stream after it (as :func:`trio.serve_listeners` does). Reports once
    workers can connect."""
    await accept_workers(
        path, partial(_take_from, handler), what="handoff", task_status=task_status
    )


async def accept_workers(
    path: str,
    serve: Callable[[trio.socket.SocketType, trio.Nursery], Awaitable[None]],
    *,
    what: str,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen at ``path`` (a Unix socket in a private directory) until cancelled; start
    ``serve(sock, nursery)`` on every connection from a process of this user, closing any
    other. ``what`` names the socket in warnings. Reports once workers can connect."""
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with listener:
        await listener.bind(path)
        listener.listen(socket.SOMAXCONN)
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                try:
                    worker, _ = await listener.accept()
                except OSError as exc:  # e.g. out of descriptors: the workers keep theirs
                    log.warning("accepting a gateway worker's %s connection: %s", what, exc)
                    await trio.sleep(ACCEPT_RETRY)
                    continue
                if peer_uid(worker) != os.getuid():
                    worker.close()  # the directory is private: nobody else should get here
                    continue
                nursery.start_soon(serve, worker, nursery)


def peer_uid(sock: trio.socket.SocketType) -> int | None:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _, uid, _ = struct.unpack("3i", creds)
    return int(uid)


async def _take_from(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    worker: trio.socket.SocketType,
    nursery: trio.Nursery,
) -> None:
    """One worker's descriptors, a byte each, until it disconnects."""
    with worker:
        while True:
            try:
                data, ancillary, flags, _ = await worker.recvmsg(
                    len(MESSAGE), socket.CMSG_SPACE(FDS_MAX * array.array("i").itemsize)
                )
            except OSError:
                return
            try:
                stream = adopt(data, _descriptors(ancillary), flags)
            except OSError as exc:
                log.warning("a handed-over connection could not be adopted: %s", exc)
                stream = None
            if stream is not None:
                nursery.start_soon(_serve, stream, handler)
            if not data:
                return


def _descriptors(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return list(fds)


def adopt(data: bytes, fds: list[int], flags: int) -> trio.SocketStream | None:
    """The stream a worker's message hands over, or None (every descriptor in a message that
    is not exactly one connected TCP socket with its byte is closed)."""
    if data != MESSAGE or len(fds) != 1 or flags & socket.MSG_CTRUNC:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        if data or fds:
            log.warning(
                "a gateway worker's handoff message was not one connection"
                " (%d bytes, %d descriptors, flags %#x): dropped",
                len(data),
                len(fds),
                flags,
            )
        if flags & socket.MSG_CTRUNC:
            log.warning("a handed-over connection was lost: out of descriptors?")
        return None
    try:
        sock = socket.socket(fileno=fds[0])
    except OSError as exc:  # not a socket
        os.close(fds[0])
        log.warning("a gateway worker handed over something that is not a socket: %s", exc)
        return None
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        log.warning("a gateway worker handed over a socket that is not TCP: dropped")
        sock.close()
        return None
    try:
        sock.getpeername()
    except OSError as exc:
        sock.close()
        if exc.errno != errno.ENOTCONN:
            log.warning("a handed-over connection could not be adopted: %s", exc)
        return None
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def _serve(
    stream: trio.SocketStream, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> None:
    try:
        await handler(stream)
    finally:
        await trio.aclose_forcefully(stream)
