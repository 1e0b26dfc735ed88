"""Which discovery instance gets a call, and when the call moves on to the next.

Several discovery instances share one metadata database; a client names them all
(:func:`karma8.net.locate.discovery_urls`). :class:`Instances` sends a call to the instance that
answered last (sticky) and, when that one refuses or loses the connection, does not answer in
time, or answers 502/503/504 without an answer of karma8's own, to the next, all within one
time budget. A call that may have reached an instance before it failed is sent again only if
repeating it is safe (:class:`Resend`). Warnings about an instance that cannot be reached are
:class:`Reachability`'s, one per instance.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Sequence
from typing import Any

import httpx
import trio

from karma8.core.errors import Unavailable
from karma8.net.locate import discovery_urls

# The clients' logger: operators filter the "cannot reach discovery" warnings by its name.
log = logging.getLogger("karma8.net.clients")


class Reachability:
    """Warns that a service cannot be reached: at the first failure, then at most every
    ``every`` seconds while failures go on, and once when it answers again."""

    def __init__(self, what: str, *, every: float) -> None:
        self._what = what
        self._every = every
        self._down_since: float | None = None
        self._last_warning = 0.0

    def failed(self, error: str) -> None:
        now = trio.current_time()
        if self._down_since is None:
            self._down_since = self._last_warning = now
            log.warning("cannot reach %s: %s", self._what, error)
        elif now - self._last_warning >= self._every:
            self._last_warning = now
            down = now - self._down_since
            log.warning("still cannot reach %s, for %.0f s: %s", self._what, down, error)

    def answered(self) -> None:
        if self._down_since is not None:
            self._down_since = None
            log.warning("%s answers again", self._what)


class Resend(enum.Enum):
    """Whether a discovery call that failed after it may have reached an instance (a timeout,
    a connection lost mid-answer, a 502/503/504 from a proxy) is sent to the next one."""

    # Idempotent for the same arguments, or harmless to repeat: reads; heartbeats;
    # commit (an already committed version with the same receipts answers success); abort;
    # a begin or placement repeated leaves at most a pending upload that expires.
    ALWAYS = "always"
    # Only when it certainly did not arrive (the connection was never made): a second
    # token, or a namespace created twice (the second refused), is not what was asked.
    UNSENT = "unsent"


# Statuses on which a call moves to the next discovery instance, unless the answer is one of
# karma8's own errors other than ``unavailable`` (e.g. 503 not_enough_nodes is an answer).
FAILOVER_STATUSES = frozenset({502, 503, 504})
# Failures that prove a request never left: no connection was made (or none was free).
UNSENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# Seconds an attempt may take while another instance is left to try: discovery answers in
# milliseconds, so one that is silent this long is hung (stopped, partitioned), and the call
# moves on instead of spending half its budget there. The last attempt gets what is left.
ATTEMPT_TIMEOUT = 10.0


class Failed(Exception):
    """One instance's failure: its message, and whether the request may have arrived."""

    def __init__(self, message: str, *, maybe_arrived: bool) -> None:
        super().__init__(message)
        self.message = message
        self.maybe_arrived = maybe_arrived


class Instances:
    """The discovery instances of one client, and where its calls go.

    All the attempts of a call take at most ``budget`` seconds (default: the pool's read
    timeout, what one instance had), each but the last at most its share of what is left and
    at most ``attempt_timeout``, so that one instance that hangs leaves time for the next.
    With ``warn_every`` (seconds), failures to reach each instance are logged as
    :class:`Reachability` says, naming its URL and ``origin`` (where the URLs came from).
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        urls: str | Sequence[str],
        *,
        origin: str | None = None,
        warn_every: float | None = None,
        budget: float | None = None,
        attempt_timeout: float = ATTEMPT_TIMEOUT,
    ) -> None:
        self._client = client
        spec = urls if isinstance(urls, str) else ",".join(urls)
        self.urls = discovery_urls(spec)
        self.current = 0  # the instance that answered last
        self._budget = budget if budget is not None else (client.timeout.read or 60.0)
        self._attempt_timeout = attempt_timeout
        suffix = f" (from {origin})" if origin else ""
        self._reach = [
            Reachability(f"discovery at {url}{suffix}", every=warn_every)
            if warn_every is not None
            else None
            for url in self.urls
        ]

    async def call(
        self,
        method: str,
        path: str,
        *,
        resend: Resend = Resend.ALWAYS,
        only: int | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """The response of the first instance that answers, whatever its status; ``only``: that
        instance and no other. Raises Unavailable, naming what each instance tried did, when
        none answered (or when one that may have got the request failed and ``resend``
        forbids the next)."""
        count = len(self.urls)
        order = [only] if only is not None else [(self.current + i) % count for i in range(count)]
        deadline = trio.current_time() + self._budget
        failures: list[str] = []
        for position, index in enumerate(order):
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                failures.append(f"no time left within {self._budget:g} s")
                break
            left = len(order) - position
            seconds = remaining if left == 1 else min(remaining / left, self._attempt_timeout)
            try:
                response = await self._attempt(index, method, path, seconds, **kwargs)
            except Failed as failed:
                failures.append(failed.message)
                if failed.maybe_arrived and resend is Resend.UNSENT:
                    break
                continue
            self.current = index
            return response
        raise Unavailable("; ".join(failures))

    async def _attempt(
        self, index: int, method: str, path: str, seconds: float, **kwargs: Any
    ) -> httpx.Response:
        """One instance's answer, or Failed if it has none to give."""
        url = f"{self.urls[index]}{path}"
        reach = self._reach[index]
        if self._client.is_closed:  # this process is stopping (say, a clean-up shielded)
            raise Failed(
                f"{method} {url}: not sent, this process is shutting down", maybe_arrived=False
            )
        try:
            response = await self._client.request(
                method, url, timeout=within(self._client.timeout, seconds), **kwargs
            )
        except httpx.TransportError as exc:
            message = f"{method} {url}: {type(exc).__name__}"
            if reach is not None:
                reach.failed(message)
            raise Failed(message, maybe_arrived=not isinstance(exc, UNSENT_ERRORS)) from None
        if response.status_code in FAILOVER_STATUSES and not await answered(response):
            message = f"{method} {url}: HTTP {response.status_code}{said(response)}"
            if reach is not None:
                reach.failed(message)
            raise Failed(message, maybe_arrived=True)
        if reach is not None:
            reach.answered()
        return response


def within(timeout: httpx.Timeout, seconds: float) -> httpx.Timeout:
    """``timeout`` with no phase longer than ``seconds``."""

    def cap(phase: float | None) -> float:
        return min(math.inf if phase is None else phase, seconds)

    return httpx.Timeout(
        connect=cap(timeout.connect),
        read=cap(timeout.read),
        write=cap(timeout.write),
        pool=cap(timeout.pool),
    )


def said(response: httpx.Response) -> str:
    """`` (its message)`` of a karma8 error answer, else nothing."""
    try:
        return f" ({response.json()['error']['message']})"
    except (ValueError, KeyError, TypeError):
        return ""


async def answered(response: httpx.Response) -> bool:
    """Whether an error response is karma8's own answer to the request (a JSON error other than
    ``unavailable``), rather than a proxy's or an overloaded server's refusal."""
    await response.aread()
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(code, str) and code != "unavailable"
