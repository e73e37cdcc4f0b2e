"""The replies of one StepStream call, in request order: each reading's slot, filled by the
batcher like a future, and the wake-ups of the call's reader and writer."""

from __future__ import annotations

import asyncio
from collections import deque

from cellstream.engine import StepResult
from cellstream.ids import MAX_ID_BYTES

UNNAMED = "\x00"  # a model label no served model has: counted as "unknown"


class StreamCall:
    """The replies of one StepStream call, in request order, and the reader/writer wake-ups.

    A future per reading would wake the writer once per reply; here the batcher fills slots and
    the writer is woken once per completed run, then sends every reply that is ready.
    """

    __slots__ = ("_loop", "_space", "_waiter", "errors", "replied", "slots", "window")

    def __init__(self, loop: asyncio.AbstractEventLoop, window: int) -> None:
        self._loop = loop
        self.window = window
        self.replied = 0  # replies sent, errors among them: the call's access line
        self.errors = 0
        self.slots: deque[Slot] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._space: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def freed(self) -> None:
        space = self._space
        if space is not None and not space.done() and len(self.slots) < self.window:
            space.set_result(None)

    async def wait_for_space(self) -> None:
        while len(self.slots) >= self.window:
            self._space = self._loop.create_future()
            try:
                await self._space
            finally:
                self._space = None


class Slot:
    """One StepStream reading's place in the reply order; the batcher fills it like a future.

    It keeps only what the reply needs (never the request: a client that does not read its
    replies must not make the server hold its messages), each client string cut to the id limit.
    """

    __slots__ = ("call", "error", "finished", "model", "request_id", "result", "started", "stream_id")

    def __init__(self, call: StreamCall, stream_id: str, model: str, request_id: int, started: float) -> None:
        self.call = call
        self.stream_id = stream_id if len(stream_id) <= MAX_ID_BYTES else ""
        self.model = model if len(model) <= MAX_ID_BYTES else UNNAMED
        self.request_id = request_id
        self.started = started
        self.result: StepResult | None = None
        self.error: BaseException | None = None
        self.finished = False

    def done(self) -> bool:
        return self.finished

    def set_result(self, result: StepResult) -> None:
        self.result = result
        self.finished = True
        self.call.wake()

    def set_exception(self, exception: BaseException) -> None:
        self.error = exception
        self.finished = True
        self.call.wake()
