"""The reply order of a bidirectional streaming call (StepStream, ModelStreamInfer): one reply
per request, in request order, with at most `window` unsent.

Requests are read and queued as they come, so that one call carrying many sequences batches like
many callers; the batcher fills each request's slot as it would a future, and the writer, woken
once per completed run rather than once per reply, sends every reply that is ready at the head.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from cellstream.engine import StepResult

UNNAMED = "\x00"  # a model label no served model has: counted as "unknown"

R = TypeVar("R")


class Slot:
    """One request's place in the reply order. `note` is what its reply needs, kept small: never
    the request itself (a client that does not read its replies must not make the server hold
    its messages)."""

    __slots__ = ("_order", "error", "finished", "note", "result", "started")

    def __init__(self, order: Order, started: float, note: Any) -> None:
        self._order = order
        self.started = started
        self.note = note
        self.result: StepResult | None = None
        self.error: BaseException | None = None
        self.finished = False

    def done(self) -> bool:
        return self.finished

    def set_result(self, result: StepResult) -> None:
        self.result = result
        self.finished = True
        self._order.wake()

    def set_exception(self, exception: BaseException) -> None:
        self.error = exception
        self.finished = True
        self._order.wake()


class Order:
    """The slots of one call, and the reader's and the writer's wake-ups."""

    __slots__ = ("_loop", "_space", "_waiter", "slots", "window")

    def __init__(self, window: int) -> None:
        self._loop = asyncio.get_running_loop()
        self.window = window
        self.slots: deque[Slot] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._space: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _freed(self) -> None:
        space = self._space
        if space is not None and not space.done() and len(self.slots) < self.window:
            space.set_result(None)

    async def _wait_for_space(self) -> None:
        while len(self.slots) >= self.window:
            self._space = self._loop.create_future()
            try:
                await self._space
            finally:
                self._space = None

    async def serve(
        self, requests: AsyncIterator[R], start: Callable[[R, Order], Slot]
    ) -> AsyncIterator[Slot]:
        """Read `requests`, `start` each (it queues the work, or fails its slot at once), and
        yield the finished slots in request order. A failed read (the client went away) ends
        the call with its error; slots left unanswered are marked finished, so the batcher skips
        readings whose caller is gone."""
        slots = self.slots

        async def read() -> None:
            try:
                async for request in requests:
                    slots.append(start(request, self))
                    # The window is the flow control: with `window` replies unsent, reading stops,
                    # and HTTP/2 pushes back on the client instead of the server buffering.
                    if len(slots) >= self.window:
                        await self._wait_for_space()
            finally:
                self.wake()

        reader = asyncio.create_task(read())
        try:
            while True:
                while slots and slots[0].finished:
                    slot = slots.popleft()
                    self._freed()
                    yield slot
                if not slots and reader.done():
                    break
                await self._wait()
            await reader
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            for slot in slots:
                slot.finished = True
