"""Request ids and the logs that carry them.

Every request a server answers has an id: the client's ``X-Request-Id`` if it is a sane
token, else a new one. It is returned in ``X-Request-Id`` (and in every error body), kept in
a context variable while the request is served, sent on every internal request made on its
behalf (the HTTP clients' request hook), and put on every log line written meanwhile, so one
PUT can be followed through the gateway, discovery and the storage nodes. Trio copies the
context into the tasks a request starts, so its part writers carry it too.

With ``-v`` every server logs one line per request (``karma8.access``, INFO): method, path,
status, bytes sent, seconds and the id. ``--log-format json`` writes one JSON object per line.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections import deque
from contextvars import ContextVar
from typing import Any

from karma8.core.status import LoggedError

REQUEST_ID_HEADER = "X-Request-Id"
_SANE = re.compile(r"[A-Za-z0-9._:-]{1,64}")

current: ContextVar[str | None] = ContextVar("karma8_request_id", default=None)
access_log = logging.getLogger("karma8.access")


def accept_request_id(given: str | None) -> str:
    """The client's id if it is 1-64 of ``A-Za-z0-9._:-`` (nothing that could forge a log
    line or a header), else a new one."""
    if given is not None and _SANE.fullmatch(given):
        return given
    return secrets.token_hex(8)


def outgoing_headers() -> dict[str, str]:
    """The header an internal request made on behalf of the current request carries."""
    request_id = current.get()
    return {REQUEST_ID_HEADER: request_id} if request_id is not None else {}


def log_access(
    method: str, path: str, status: int | None, sent: int, started: float, request_id: str
) -> None:
    """One line for a request that ended (``status`` None: it ended before any answer)."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    seconds = time.perf_counter() - started
    access_log.info(
        "%s %s %s %d %.4f",
        method,
        path,
        "-" if status is None else status,
        sent,
        seconds,
        extra={
            "request_id": request_id,
            "http": {
                "method": method,
                "path": path,
                "status": status,
                "bytes_sent": sent,
                "seconds": round(seconds, 6),
            },
        },
    )


def _utc(seconds: float | None) -> time.struct_time:
    return time.gmtime(seconds)


class RequestIdFilter(logging.Filter):
    """Puts the current request's id (or ``-``) on every record that has none."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current.get() or "-"
        return True


class TextFormatter(logging.Formatter):
    """``time logger LEVEL message``, and `` [request ID]`` while a request is served."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(name)s %(levelname)s %(message)s")
        self.converter = _utc

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", "-")
        if request_id == "-" or f"[request {request_id}]" in line:
            return line
        return f"{line} [request {request_id}]"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, and for access
    lines the request's method, path, status, bytes and seconds."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.converter = _utc
        self._role = role

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", "-")
        message = record.getMessage()
        if request_id != "-":  # the id has a field of its own: not told twice
            message = message.replace(f" [request {request_id}]", "")
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "role": self._role,
            "message": message,
            "request_id": request_id,
        }
        http = getattr(record, "http", None)
        if http is not None:
            line["http"] = http
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure_logging(*, level: int, json_lines: bool, role: str) -> None:
    """The root handler on stderr: text (with the request id) or JSON lines."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter(role) if json_lines else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the access lines say it once


class RecentErrors(logging.Handler):
    """Keeps the process's latest warnings and errors for the status view."""

    def __init__(self, capacity: int = 50) -> None:
        super().__init__(logging.WARNING)
        self._kept: deque[LoggedError] = deque(maxlen=capacity)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a record that cannot format: the handler must not raise
            message = str(record.msg)
        self._kept.append(
            LoggedError(
                time=record.created,
                level=record.levelname.lower(),
                logger=record.name,
                message=message,
                request_id=getattr(record, "request_id", None) or current.get() or "-",
            )
        )

    def latest(self) -> tuple[LoggedError, ...]:
        """Newest first."""
        return tuple(reversed(self._kept))
