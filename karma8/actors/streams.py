"""Streams held open by tasks of their own, so that a reader can open several at once:
trio wants a context left by the task that entered it, and a reader that entered them one
after another would wait for each in turn (over HTTP, a round trip to its node each).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from types import TracebackType

import trio

from karma8.core.errors import Karma8Error


async def open_together(
    stack: AsyncExitStack,
    opens: Sequence[Callable[[], AbstractAsyncContextManager[AsyncIterator[bytes]]]],
) -> list[AsyncIterator[bytes] | Karma8Error | None]:
    """Open part streams at once, each its own task, and return each stream, or the error
    that kept it from opening; ``stack`` closes them. The first error answers at once:
    streams still opening are then None, and are cancelled as ``stack`` closes.

    Over HTTP opening a part costs a round trip to its node, and opened one after another
    they add up before the first byte. Each stream's context is entered and left by the task
    that holds it (a nursery ``stack`` closes), as trio requires. Closed by an exception,
    the streams are cancelled rather than read to their end (an HTTP stream closed normally
    drains its rest, to keep the connection). A lone stream is opened in the caller's task.
    An error while a stream that was opened closes normally is dropped: what it had to
    deliver was delivered or its reader raised.
    """
    if len(opens) <= 1:
        try:
            return [await stack.enter_async_context(open_()) for open_ in opens]
        except Karma8Error as exc:
            return [exc]
    opened: list[AsyncIterator[bytes] | Karma8Error | None] = [None] * len(opens)
    waiting = len(opens)
    answered = trio.Event()  # every stream opened, or one failed
    release = trio.Event()

    def settle(index: int, result: AsyncIterator[bytes] | Karma8Error) -> None:
        nonlocal waiting
        opened[index] = result
        waiting -= 1
        if not waiting or isinstance(result, Karma8Error):
            answered.set()

    async def hold(
        index: int, open_: Callable[[], AbstractAsyncContextManager[AsyncIterator[bytes]]]
    ) -> None:
        try:
            async with open_() as stream:
                settle(index, stream)
                await release.wait()
        except Karma8Error as exc:
            if opened[index] is None:
                settle(index, exc)

    nursery = await stack.enter_async_context(_holders())

    async def close(
        exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            release.set()
        else:
            nursery.cancel_scope.cancel()

    stack.push_async_exit(close)
    for index, open_ in enumerate(opens):
        nursery.start_soon(hold, index, open_)
    await answered.wait()
    return list(opened)


@asynccontextmanager
async def _holders() -> AsyncIterator[trio.Nursery]:
    """A nursery for tasks that hold streams open while the caller reads them: what the
    caller's block raises comes out as raised, not in a group with the holders' Cancelled
    (a holder raises nothing else but what a bug would)."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        cancelled, others = group.split(trio.Cancelled)
        if others is None and cancelled is not None:
            first = cancelled.exceptions[0]
            raise first from first.__cause__
        if others is not None and len(others.exceptions) == 1:
            only = others.exceptions[0]
            if not isinstance(only, BaseExceptionGroup):
                raise only from only.__cause__
        raise
