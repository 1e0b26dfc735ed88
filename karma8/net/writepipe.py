"""Small uploads a gateway worker has parsed, stored by the gateway that started it.

In the embedded cluster the parent gateway calls discovery and the nodes in-process, a worker
over HTTP; and parsing a request with Hypercorn costs about as much CPU as storing a small
file. So a worker keeps the connections whose first request is a small write (its
``Content-Length`` at most ``small_file_max``, :func:`karma8.net.handoff.first_request_kind`),
parses each such request, reads its body whole, and sends the parent only what the store
needs over a Unix stream socket in the parent's private directory: the parent runs
:meth:`karma8.actors.gateway.Gateway.put` and sends back the version or the error. HTTP is
then parsed on the worker's core and the parent's loop only stores.

One request at a time per connection: a worker keeps a pool of connections, dials another
when all are busy, and closes one whose call was cancelled. A frame is a fixed header
(``>II``: JSON length, body length), a JSON object, then the body; an answer is ``>I`` and a
JSON object: ``{"stored": ...}`` (the :class:`~karma8.core.model.StoredVersion` a PUT
answers with, no more) or ``{"error": {"code", "message"}}`` (the codec's wire form). The
worker has already authorized the request; the parent trusts what comes from a process of
its own user through its private directory, and checks the sizes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable, Mapping
from functools import partial
from typing import Any, Protocol

import trio

from karma8.actors.gateway import Gateway
from karma8.core.errors import Karma8Error, Unavailable, error_from_code
from karma8.core.model import FileVersion, StoredVersion
from karma8.net import requestlog
from karma8.net.bounds import UploadGate
from karma8.net.codec import error_body
from karma8.net.exchange import INTERNAL_ERROR
from karma8.net.handoff import accept_workers
from karma8.net.metrics import Sample
from karma8.store.tiered import OneChunk

log = logging.getLogger("karma8.writepipe")

SOCKET_NAME = "writes.sock"  # beside the handoff socket, in the parent's private directory
_REQUEST = struct.Struct(">II")  # JSON length, body length
_ANSWER = struct.Struct(">I")  # JSON length
JSON_MAX = 64 << 10  # a request's or answer's JSON: a namespace, a name, a request id
IDLE_MAX = 64  # connections a worker keeps open for later calls
DIAL_PATIENCE = 1.0  # seconds a worker retries a parent whose backlog is full


class PipeBroken(Exception):
    """The connection ended or sent something that is not a frame."""


class PipeEnded(PipeBroken):
    """The connection ended (mid-frame too: a worker's call was cancelled while sending)."""


class _Frames:
    """Exact reads from a stream, over its ``receive_some`` chunks."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = bytearray()

    async def read(self, size: int) -> bytes:
        while len(self._buffer) < size:
            chunk = await self.stream.receive_some(max(size - len(self._buffer), 65536))
            if not chunk:
                raise PipeEnded("the connection ended")
            self._buffer += chunk
        with memoryview(self._buffer) as view:
            data = bytes(view[:size])
        del self._buffer[:size]
        return data

    async def read_json(self, size: int) -> dict[str, Any]:
        if size > JSON_MAX:
            raise PipeBroken(f"a frame's JSON of {size} bytes")
        try:
            obj = json.loads(await self.read(size))
        except ValueError as exc:
            raise PipeBroken(f"a frame's JSON is malformed: {exc}") from None
        if not isinstance(obj, dict):
            raise PipeBroken("a frame's JSON is not an object")
        return obj


class SmallWrites(Protocol):
    """How a gateway worker has a small upload, read whole, stored: :class:`ParentWrites`
    (the parent stores it), or :class:`karma8.net.loanwrites.WorkerWrites` (the worker
    writes its parts, the parent commits)."""

    async def put(
        self, namespace: str, name: str, data: bytes, *, if_absent: bool
    ) -> StoredVersion:
        """The version stored; raises ParentUnreachable if nothing reached the parent."""
        ...


class ParentWrites:
    """A worker's end: :meth:`put` has the parent at ``path`` store a small upload."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._idle: list[_Frames] = []
        self.sent = 0  # uploads the parent stored or refused

    async def put(
        self, namespace: str, name: str, data: bytes, *, if_absent: bool
    ) -> StoredVersion:
        """The version the parent stored ``data`` as; raises what its gateway raised, or
        Unavailable when the parent could not be asked or did not answer.

        Raises:
            ParentUnreachable: Nothing was sent (no parent): the caller may store it itself.
        """
        answer = await self.call(
            {
                "namespace": namespace,
                "name": name,
                "if_absent": if_absent,
                "request_id": requestlog.current.get(),
            },
            data,
        )
        self.sent += 1
        return answered(answer)

    async def call(self, request: dict[str, Any], data: bytes = b"") -> dict[str, Any]:
        """The parent's answer to one frame (``request`` and a body); raises Unavailable
        when it could not be asked or did not answer, ParentUnreachable when nothing was
        sent."""
        conn = self._idle.pop() if self._idle else await self._dial()
        header = json.dumps(request).encode()
        ok = False
        try:
            try:
                await conn.stream.send_all(_REQUEST.pack(len(header), len(data)) + header + data)
                (size,) = _ANSWER.unpack(await conn.read(_ANSWER.size))
                answer = await conn.read_json(size)
            except (trio.BrokenResourceError, trio.ClosedResourceError, PipeBroken) as exc:
                raise Unavailable(f"the gateway did not answer for this upload: {exc}") from None
            ok = True
        finally:
            if ok and len(self._idle) < IDLE_MAX:
                self._idle.append(conn)
            else:  # cancelled, broken or surplus: its answer (if any) is never read
                await trio.aclose_forcefully(conn.stream)
        return answer

    async def _dial(self) -> _Frames:
        """A new connection to the parent. A full backlog (``EAGAIN``: a Unix socket's
        connect is never in progress) is retried for :data:`DIAL_PATIENCE`; ``connect`` is
        called directly, as trio's would take ``EAGAIN`` for "in progress" and hand back a
        socket that is not connected."""
        deadline = trio.current_time() + DIAL_PATIENCE
        pause = 0.001
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(self.path)  # done, refused, or EAGAIN: never in progress
            except BlockingIOError as exc:
                sock.close()
                if trio.current_time() >= deadline:
                    raise ParentUnreachable(f"{self.path}: {exc}") from None
                await trio.sleep(pause)
                pause = min(pause * 2, 0.05)
                continue
            except OSError as exc:
                sock.close()
                raise ParentUnreachable(f"{self.path}: {exc}") from None
            return _Frames(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await trio.aclose_forcefully(conn.stream)

    async def samples(self) -> Iterable[Sample]:
        """For ``/metrics`` (each process counts its own)."""
        return [
            (
                "karma8_gateway_sent_to_parent",
                "counter",
                "Small uploads this gateway worker parsed and its parent stored (or refused)",
                {},
                self.sent,
            )
        ]


def writes_socket(handoff: str) -> str:
    """The parent's socket for small uploads, in the private directory of its handoff
    socket (:func:`karma8.net.handoff.handoff_socket`)."""
    return os.path.join(os.path.dirname(handoff), SOCKET_NAME)


class ParentUnreachable(Exception):
    """No connection to the parent could be opened: nothing was sent."""


def raise_error(answer: dict[str, Any]) -> None:
    """Raise the error an answer carries, if it carries one."""
    error = answer.get("error")
    if isinstance(error, dict):
        raise error_from_code(str(error.get("code")), str(error.get("message")))


def answered(answer: dict[str, Any]) -> StoredVersion:
    """The stored version an answer to a PUT carries, or the error it carries, raised."""
    raise_error(answer)
    stored = answer.get("stored")
    if not isinstance(stored, dict):
        raise Unavailable("the gateway's answer for this upload was neither version nor error")
    version_id, namespace, name = stored.get("id"), stored.get("ns"), stored.get("name")
    size, etag = stored.get("size"), stored.get("etag")
    if not (
        isinstance(version_id, str)
        and isinstance(namespace, str)
        and isinstance(name, str)
        and isinstance(size, int)
        and (etag is None or isinstance(etag, str))
    ):
        raise Unavailable(f"the gateway's answer for this upload is malformed: {stored!r}")
    return StoredVersion(
        version_id=version_id, namespace=namespace, name=name, size=size, etag=etag
    )


Handler = Callable[[dict[str, Any], bytes], Awaitable[dict[str, Any]]]


async def serve_writes(
    path: str,
    gateway: Gateway,
    *,
    body_max: int,
    at_once: int,
    uploads: UploadGate | None = None,
    ops: Mapping[str, Handler] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen at ``path`` until cancelled, storing the uploads workers send with
    ``gateway``, at most ``at_once`` at a time (a frame's body is read only once it may run,
    so that the bodies this process holds are bounded as its own uploads are); a body over
    ``body_max`` bytes, or anything that is not a frame, closes that connection. Each
    upload that ends is counted in ``uploads`` (for :func:`give_back_memory`). Reports once
    workers can connect. A frame whose JSON names an ``op`` is answered by that handler of
    ``ops`` (:mod:`karma8.net.loanwrites`); one without is an upload."""
    handlers: dict[str, Handler] = {"put": partial(_store, gateway), **(ops or {})}
    serve = partial(_serve_worker, handlers, body_max, trio.CapacityLimiter(at_once), uploads)
    await accept_workers(path, serve, what="write", task_status=task_status)


async def _serve_worker(
    handlers: Mapping[str, Handler],
    body_max: int,
    limiter: trio.CapacityLimiter,
    uploads: UploadGate | None,
    sock: trio.socket.SocketType,
    _: trio.Nursery,
) -> None:
    """One connection's uploads, one at a time, until the worker closes it."""
    stream = trio.SocketStream(sock)
    frames = _Frames(stream)
    async with stream:
        while True:
            try:
                json_size, body_size = _REQUEST.unpack(await frames.read(_REQUEST.size))
                if body_size > body_max:
                    raise PipeBroken(f"a body of {body_size} bytes (at most {body_max})")
                try:  # without a pass of the scheduler when a token is free (nearly always)
                    limiter.acquire_nowait()
                except trio.WouldBlock:
                    await limiter.acquire()
                failed = True
                try:
                    request = await frames.read_json(json_size)
                    data = await frames.read(body_size)
                    handler = handlers.get(str(request.get("op", "put")))
                    if handler is None:
                        raise PipeBroken(f"a frame of an unknown op {request.get('op')!r}")
                    answer = await handler(request, data)
                    failed = "error" in answer
                finally:
                    limiter.release()
                    if uploads is not None:
                        uploads.count_end(failed=failed)
                out = json.dumps(answer).encode()
                await stream.send_all(_ANSWER.pack(len(out)) + out)
            except (PipeEnded, trio.BrokenResourceError):
                return  # the worker closed it: its exit, or a call cancelled (mid-frame too)
            except PipeBroken as exc:
                log.warning("a gateway worker's upload was not a frame: %s", exc)
                return


async def _store(gateway: Gateway, request: dict[str, Any], data: bytes) -> dict[str, Any]:
    namespace, name = request.get("namespace"), request.get("name")
    if not isinstance(namespace, str) or not isinstance(name, str):
        raise PipeBroken("an upload without namespace and name")
    given = request.get("request_id")
    token = requestlog.current.set(
        requestlog.accept_request_id(given if isinstance(given, str) else None)
    )
    try:
        version = await gateway.put(
            namespace,
            name,
            OneChunk(data),
            content_length=len(data),
            if_absent=request.get("if_absent") is True,
        )
    except Karma8Error as exc:
        return error_body(exc)
    except Exception:  # as the HTTP routes answer it: a 500, and this process goes on
        log.exception("storing %s/%s for a gateway worker failed", namespace, name)
        return INTERNAL_ERROR
    finally:
        requestlog.current.reset(token)
    return stored_answer(version)


def stored_answer(version: FileVersion) -> dict[str, Any]:
    """A PUT's answer: the few fields the worker answers with (a whole FileVersion, its parts
    and their nodes, cost both sides more to encode and decode than the rest of the frame)."""
    assert version.size is not None
    return {
        "stored": {
            "id": version.version_id,
            "ns": version.namespace,
            "name": version.name,
            "size": version.size,
            "etag": version.etag,
        }
    }
