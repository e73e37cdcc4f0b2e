"""Client-side coalescing: many tasks' single readings travel as a few StepBatch calls.

    stepper = Stepper("127.0.0.1:50051")          # or Stepper(async_client, model="gru")
    # a cluster: Stepper(AsyncClusterClient(["cellstream-0:50051"])), batches split by owner
    reply = await stepper.step("sensor-1", reading)  # from any number of tasks at once
    await stepper.close()

Sending. A reading joins a queue and a flush is scheduled with `loop.call_soon`, so it runs
after the tasks that are already runnable have had their turn: those woken together by the
last reply all get into one batch, and a lone reading on an idle stepper leaves at once. There
is no timer. At most `max_in_flight` batches are outstanding; what arrives meanwhile waits for
the first reply and forms the next batch.

Order. The server applies a repeated id in order of position within one StepBatch, but two
StepBatch calls in flight are separate HTTP/2 streams: nothing guarantees that the server
submits them to its batcher in sending order. So a stream has readings in at most one batch in
flight: its later readings stay queued until that batch is answered (any number of them may
then go together in the next batch, in call order). Streams do not wait for each other.

Errors. Every failure is a `CellStreamError` (`StepError` is the same class). Readings are
checked here first (size, finite values, stream id) and a bad one fails only its caller with
InvalidArgument. A StepBatch is refused as a whole (nothing applied) when one item is bad; when
the server names the item (`stream_ids[i]...`, INVALID_ARGUMENT), that caller gets the error and
the rest is sent again. Any other failure goes to every caller of the batch. A caller that is
cancelled before its batch is sent is dropped; once sent, its reading is applied regardless.
Through an `AsyncClusterClient` a batch is one call per owner: where some parts were applied and
another failed (`CellStreamError.partial`), the applied readings' callers get their replies, and
the rule above applies to the rest.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc
import numpy as np

from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
from cellstream.client.aio import AsyncClient
from cellstream.client.errors import (
    Cancelled,
    CellStreamError,
    InvalidArgument,
    NotFound,
    PartialBatch,
    Unknown,
)
from cellstream.client.messages import ArrayLike, BatchReply, StepReply, as_floats
from cellstream.client.shapes import reading_problem
from cellstream.client.tls import TLS
from cellstream.ids import id_problem

_ITEM = re.compile(r"^stream_ids\[(\d+)\]")

# Kept for code written against the stepper's own error type: it is the client's one type now.
StepError = CellStreamError


class BatchClient(Protocol):
    """What a stepper sends through: an `AsyncClient`, or an `AsyncClusterClient`."""

    async def list_models(self) -> list[pb.ModelInfo]: ...

    async def step_batch(
        self, stream_ids: Sequence[str], inputs: np.ndarray, *, model: str = "", omit_state: bool = False
    ) -> BatchReply: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Contract:
    """What the stepper needs to know of its model, from ListModels."""

    model: str
    input_size: int
    states: tuple[tuple[str, tuple[int, ...]], ...]


@dataclass(eq=False, slots=True)
class _Item:
    stream_id: str
    x: np.ndarray
    future: asyncio.Future[StepReply]


@dataclass
class StepperStats:
    """Counters for tuning and benchmarks."""

    batches: int = 0
    readings: int = 0
    resent: int = 0
    largest: int = 0
    in_flight_peak: int = 0

    @property
    def mean_batch(self) -> float:
        return self.readings / self.batches if self.batches else 0.0


class Stepper:
    """Shared by many tasks: `await step(stream_id, reading)` per reading, sent in StepBatch calls.
    Given an address, it makes its own `AsyncClient` with `tls` and `token`; given an
    `AsyncClusterClient`, each batch goes to the streams' owners."""

    def __init__(
        self,
        client_or_address: BatchClient | str,
        model: str = "",
        *,
        max_in_flight: int = 2,
        max_batch: int = 10_000,
        want_state: bool = True,
        tls: TLS | None = None,
        token: str | None = None,
    ) -> None:
        if max_in_flight < 1 or max_batch < 1:
            raise ValueError("max_in_flight and max_batch must be at least 1")
        if not isinstance(client_or_address, str):
            for name, given in (("tls", tls), ("token", token)):
                if given is not None:
                    raise ValueError(f"{name} is for an address: a given AsyncClient brings its own channel")
        self._owns_client = isinstance(client_or_address, str)
        self._client: BatchClient = (
            AsyncClient(client_or_address, tls=tls, token=token)
            if isinstance(client_or_address, str)
            else client_or_address
        )
        self.model = model
        self.max_in_flight = max_in_flight
        self.max_batch = max_batch
        self.want_state = want_state
        self.stats = StepperStats()
        self._contract: Contract | None = None
        self._contract_task: asyncio.Task[Contract] | None = None
        self._queue: deque[_Item] = deque()
        self._busy: set[str] = set()  # streams with a reading in a batch in flight
        self._in_flight = 0
        self._flush_pending = False
        self._sends: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._client!r}, model={self.model!r})"

    async def __aenter__(self) -> Stepper:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def contract(self) -> Contract:
        """The model's contract, asked of the server once and shared by all callers."""
        if self._contract is not None:
            return self._contract
        if self._contract_task is None:
            self._contract_task = asyncio.get_running_loop().create_task(self._fetch_contract())
        task = self._contract_task
        try:
            self._contract = await asyncio.shield(task)
        except BaseException:
            if task.done() and self._contract_task is task:
                self._contract_task = None  # a failed look-up is tried again by the next caller
            raise
        return self._contract

    async def _fetch_contract(self) -> Contract:
        models = await self._client.list_models()
        for info in models:
            if (info.name == self.model) if self.model else info.is_default:
                states = tuple((s.name, tuple(int(d) for d in s.shape)) for s in info.states)
                return Contract(info.name, int(info.input_size), states)
        wanted = repr(self.model) if self.model else "a default model"
        raise NotFound(f"the server does not serve {wanted}; models: {sorted(m.name for m in models)}")

    async def step(self, stream_id: str, reading: ArrayLike) -> StepReply:
        """Apply one reading to one stream; returns when its batch is answered."""
        if self._closed:
            raise Cancelled("the stepper is closed")
        contract = self._contract or await self.contract()
        x = as_floats(reading, "reading")
        if x.ndim > 1:
            sizes = frozenset({contract.input_size})
            raise InvalidArgument(reading_problem(x.shape, f"model {contract.model!r}", sizes))
        x = x.ravel()
        if x.size != contract.input_size:
            raise InvalidArgument(
                f"input has {x.size} values, model {contract.model!r} expects {contract.input_size}"
            )
        problem = id_problem(stream_id)
        if problem is not None:
            raise InvalidArgument(problem)
        future: asyncio.Future[StepReply] = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(stream_id, x, future))
        self._idle.clear()
        self._schedule_flush()
        return await future

    def _schedule_flush(self) -> None:
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        while self._in_flight < self.max_in_flight and self._queue:
            batch, x = self._take()
            if not batch:
                break
            self._in_flight += 1
            self.stats.in_flight_peak = max(self.stats.in_flight_peak, self._in_flight)
            task = asyncio.get_running_loop().create_task(self._send(batch, x))
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)
        if not self._queue and not self._in_flight:
            self._idle.set()

    def _take(self) -> tuple[list[_Item], np.ndarray]:
        """The next batch in call order, leaving readings of streams already in flight queued."""
        busy = self._busy
        taken: list[_Item] = []
        kept: deque[_Item] = deque()
        limit = self.max_batch
        for item in self._queue:
            if item.future.done():
                continue  # the caller gave up before sending
            if len(taken) >= limit or item.stream_id in busy:
                kept.append(item)
            else:
                taken.append(item)
        self._queue = kept
        if not taken:
            return taken, np.empty(0, np.float32)
        x = np.array([item.x for item in taken])  # (np.stack: 4x slower for short rows)
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            for i in np.flatnonzero(~finite).tolist():
                taken[i].future.set_exception(InvalidArgument("input holds NaN or infinity"))
            taken = [item for item, ok in zip(taken, finite.tolist(), strict=True) if ok]
            x = x[finite]
        busy.update(item.stream_id for item in taken)
        return taken, x

    async def _send(self, batch: list[_Item], x: np.ndarray) -> None:
        sent_ids = {item.stream_id for item in batch}
        try:
            while batch:
                ids = [item.stream_id for item in batch]
                self.stats.batches += 1
                self.stats.readings += len(batch)
                self.stats.largest = max(self.stats.largest, len(batch))
                try:
                    reply = await self._client.step_batch(
                        ids, x, model=self.model, omit_state=not self.want_state
                    )
                except CellStreamError as error:
                    bad = self._bad_item(error, len(batch))
                    if error.partial is not None:  # (parts of a cluster's batch were applied)
                        batch, x, bad = self._deliver_applied(batch, x, bad, error.partial)
                        if not batch:
                            return
                    if bad is None:
                        self._fail(batch, error)
                        return
                    # Nothing of a refused batch was applied: drop the named item, send the rest.
                    self._fail([batch.pop(bad)], error)
                    x = np.delete(x, bad, axis=0)
                    self.stats.resent += 1
                    continue
                self._deliver(batch, reply)
                return
        except Exception as exc:  # e.g. the channel closed under us: every caller hears of it
            self._fail(batch, Unknown(f"StepBatch failed: {exc!r}"))
        finally:
            self._busy.difference_update(sent_ids)
            self._in_flight -= 1
            self._schedule_flush()

    def _deliver_applied(
        self, batch: list[_Item], x: np.ndarray, bad: int | None, partial: PartialBatch
    ) -> tuple[list[_Item], np.ndarray, int | None]:
        """Answer the callers whose readings were applied; the rest of the batch, and where the
        named bad item is in it (None if it is not there)."""
        applied = partial.applied
        reply = partial.reply
        rows = np.flatnonzero(applied)
        self._deliver(
            [batch[i] for i in rows.tolist()],
            BatchReply(reply.outputs[rows], {n: v[rows] for n, v in reply.states.items()}, reply.steps[rows]),
        )
        rest = np.flatnonzero(~applied)
        if bad is not None:
            bad = int(np.searchsorted(rest, bad)) if not applied[bad] else None
        return [batch[i] for i in rest.tolist()], x[rest], bad

    @staticmethod
    def _bad_item(error: CellStreamError, n: int) -> int | None:
        if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
            return None
        match = _ITEM.match(error.message)
        if match is None or int(match.group(1)) >= n:
            return None
        return int(match.group(1))

    def _deliver(self, batch: list[_Item], reply: BatchReply) -> None:
        contract = self._contract
        assert contract is not None
        outputs = reply.outputs
        steps = reply.steps.tolist()
        states = [
            (name, reply.states[name] if len(shape) == 1 else reply.states[name].reshape(-1, *shape))
            for name, shape in contract.states
            if name in reply.states
        ]
        for i, item in enumerate(batch):
            if not item.future.done():
                item.future.set_result(
                    StepReply(
                        item.stream_id, outputs[i], {name: value[i] for name, value in states}, steps[i]
                    )
                )

    @staticmethod
    def _fail(batch: list[_Item], error: CellStreamError) -> None:
        for item in batch:
            if not item.future.done():
                item.future.set_exception(error)

    async def close(self) -> None:
        """Send what is queued, wait for every batch in flight, then close an owned client."""
        self._closed = True
        if self._queue or self._in_flight:
            self._schedule_flush()
            await self._idle.wait()
        if self._sends:
            await asyncio.gather(*self._sends, return_exceptions=True)
        if self._owns_client:
            await self._client.close()
