"""The load generator: asyncio clients in several processes, one job per process per measurement.

Every job waits for a shared start time (CLOCK_MONOTONIC is system-wide), warms up, then counts
what completes inside the measurement window. Latency is taken per message: from the moment it
was handed to gRPC (closed loop) or from its scheduled send time (open loop, `fanin`).
"""

# mypy: disallow-untyped-calls=False
# (the generated *_pb2_grpc module is untyped)

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
import traceback
from array import array
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import grpc
import numpy as np

from cellstream._proto.cellstream.v1 import cellstream_pb2_grpc as pb_grpc
from cellstream.client import AsyncClient, batch_request, step_request
from cellstream.client.tls import TLS
from cellstream.coalesce import Stepper

from .secure import PLAINTEXT, ClientSide

EOF = grpc.aio.EOF  # type: ignore[attr-defined]  # (missing from grpc-stubs)
DRAIN_GRACE = 5.0  # seconds after the window that outstanding readings may still take


@dataclass(frozen=True)
class Job:
    """One process's share of one measurement."""

    scenario: str  # unary | stream | batch | fanin | coalesce
    address: str
    model: str
    input_size: int
    start_at: float  # time.monotonic() at which load starts (warm-up first)
    warmup: float
    duration: float
    shard: int = 0
    shards: int = 1
    streams: int = 64  # unary, stream, fanin, coalesce: streams over all shards
    concurrency: int = 1  # stream, fanin: StepStream calls; batch: messages in flight
    window: int = 1  # stream: readings in flight per call
    batch_size: int = 0  # batch: readings per StepBatch
    rate: float = 0.0  # fanin: offered readings per second over all shards
    prefix: str = "s"
    omit_state: bool = False
    client: ClientSide = PLAINTEXT  # TLS trust and token of the server under test


@dataclass
class Outcome:
    """What one job saw inside the window."""

    completed: int = 0  # readings answered
    errors: int = 0  # readings refused or failed, warm-up included
    latencies: np.ndarray = field(default_factory=lambda: np.empty(0))  # seconds, one per message
    sent: int = 0  # readings sent inside the window (open loop: offered)
    error_sample: str = ""
    extra: dict[str, float] = field(default_factory=dict)


class Recorder:
    """Counts what falls in the window: by reply time (closed loop) or by send time (open loop)."""

    def __init__(self, job: Job) -> None:
        self.begin = job.start_at + job.warmup
        self.end = self.begin + job.duration
        self.open_loop = job.scenario == "fanin"
        self.latencies = array("d")
        self.completed = 0
        self.errors = 0
        self.sent = 0
        self.error_sample = ""

    def done(self, sent_at: float, n: int = 1) -> None:
        now = time.monotonic()
        if self.begin <= (sent_at if self.open_loop else now) < self.end:
            self.completed += n
            self.latencies.append(now - sent_at)

    def failed(self, what: object, n: int = 1) -> None:
        self.errors += n
        if not self.error_sample:
            self.error_sample = str(what)[:300]

    def outcome(self, **extra: float) -> Outcome:
        return Outcome(
            self.completed,
            self.errors,
            np.frombuffer(self.latencies, np.float64).copy(),
            self.sent,
            self.error_sample,
            dict(extra),
        )


def _mine(job: Job, n: int) -> list[int]:
    return [i for i in range(n) if i % job.shards == job.shard]


def _readings(job: Job) -> np.ndarray:
    return np.random.default_rng(1234 + job.shard).standard_normal((64, job.input_size)).astype(np.float32)


async def _until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


async def unary(job: Job, stub: Any, rec: Recorder) -> Outcome:
    """Each stream: Step, wait for the reply, Step again."""
    readings = _readings(job)
    metadata = job.client.metadata

    async def one_stream(i: int) -> None:
        requests = [
            step_request(
                f"{job.prefix}{i}",
                readings[(i + k) % len(readings)],
                model=job.model,
                omit_state=job.omit_state,
            )
            for k in range(4)
        ]
        k = 0
        while (sent_at := time.monotonic()) < rec.end:
            try:
                await stub.Step(requests[k & 3], metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                rec.failed(exc.details())
                await asyncio.sleep(0.01)
                continue
            rec.done(sent_at)
            k += 1

    await _until(job.start_at)
    await asyncio.gather(*(one_stream(i) for i in _mine(job, job.streams)))
    return rec.outcome()


async def _step_stream(
    job: Job,
    stub: Any,
    rec: Recorder,
    call_index: int,
    pace: Callable[[int], Awaitable[float | None]],
    window: int = 0,
) -> None:
    """One StepStream call over its share of streams; `pace(k)` says when reading k goes (None: stop).

    With a window, at most that many readings are unanswered (closed loop); without, the call
    sends on schedule whatever the replies do (open loop).
    """
    readings = _readings(job)
    ids = range(call_index, job.streams, job.concurrency)
    requests = [
        step_request(
            f"{job.prefix}{i}", readings[i % len(readings)], model=job.model, omit_state=job.omit_state
        )
        for i in ids
    ]
    call = stub.StepStream(metadata=job.client.metadata)
    sent: deque[float] = deque()
    slots = asyncio.Semaphore(window) if window else None

    async def write() -> None:
        k = 0
        while True:
            if slots is not None:
                await slots.acquire()
            sent_at = await pace(k)
            if sent_at is None:
                break
            sent.append(sent_at)
            await call.write(requests[k % len(requests)])
            k += 1
        await call.done_writing()

    async def read() -> None:
        while (reply := await call.read()) is not EOF:
            sent_at = sent.popleft()
            if reply.HasField("error"):
                rec.failed(reply.error.message)
            else:
                rec.done(sent_at)
            if slots is not None:
                slots.release()

    try:
        # An open-loop call that falls behind may hold a long backlog: stop waiting after a grace.
        await asyncio.wait_for(asyncio.gather(write(), read()), rec.end + DRAIN_GRACE - time.monotonic())
    except TimeoutError:
        call.cancel()
        rec.failed(f"no reply within {DRAIN_GRACE} s after the window", n=len(sent))
    except grpc.aio.AioRpcError as exc:
        rec.failed(exc.details(), n=max(1, len(sent)))


async def stream(job: Job, stub: Any, rec: Recorder) -> Outcome:
    """Closed loop: each call keeps `window` readings in flight."""

    async def closed(k: int) -> float | None:
        now = time.monotonic()
        return now if now < rec.end else None

    await _until(job.start_at)
    calls = _mine(job, job.concurrency)
    await asyncio.gather(*(_step_stream(job, stub, rec, c, closed, job.window) for c in calls))
    return rec.outcome()


async def fanin(job: Job, stub: Any, rec: Recorder) -> Outcome:
    """Open loop: reading k of a call is due at start + k / rate; latency counts from then."""
    interval = job.concurrency / job.rate

    def schedule(offset: float) -> Callable[[int], Awaitable[float | None]]:
        async def due(k: int) -> float | None:
            at = job.start_at + offset + k * interval
            if at >= rec.end:
                return None
            if rec.begin <= at:
                rec.sent += 1
            delay = at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            return at

        return due

    await _until(job.start_at)
    calls = _mine(job, job.concurrency)
    await asyncio.gather(
        *(_step_stream(job, stub, rec, c, schedule(c * interval / job.concurrency)) for c in calls)
    )
    return rec.outcome()


async def batch(job: Job, stub: Any, rec: Recorder) -> Outcome:
    """`concurrency` StepBatch messages in flight, each over its own `batch_size` streams."""
    readings = _readings(job)
    metadata = job.client.metadata

    async def one_slot(slot: int) -> None:
        ids = [f"{job.prefix}{slot}-{j}" for j in range(job.batch_size)]
        x = readings[np.arange(job.batch_size) % len(readings)]
        requests = [
            batch_request(ids, np.roll(x, k, axis=0), model=job.model, omit_state=job.omit_state)
            for k in range(2)
        ]
        k = 0
        while (sent_at := time.monotonic()) < rec.end:
            try:
                await stub.StepBatch(requests[k & 1], metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                rec.failed(exc.details(), job.batch_size)
                await asyncio.sleep(0.01)
                continue
            rec.done(sent_at, job.batch_size)
            k += 1

    await _until(job.start_at)
    await asyncio.gather(*(one_slot(s) for s in _mine(job, job.concurrency)))
    return rec.outcome()


async def coalesce(job: Job, rec: Recorder) -> Outcome:
    """Application tasks, one per stream, each awaiting the shared Stepper's `step`."""
    readings = _readings(job)
    tls = None if job.client.ca_file is None else TLS(ca=job.client.ca_file)
    client = AsyncClient(job.address, tls=tls, token=job.client.token)
    stepper = Stepper(client, job.model, want_state=not job.omit_state)
    await stepper.contract()
    batches_before = readings_before = 0

    async def app(i: int) -> None:
        stream_id = f"{job.prefix}{i}"
        k = i
        while (sent_at := time.monotonic()) < rec.end:
            try:
                await stepper.step(stream_id, readings[k % len(readings)])
            except grpc.RpcError as exc:
                rec.failed(exc)
                await asyncio.sleep(0.01)
                continue
            rec.done(sent_at)
            k += 1

    async def count_from_window() -> None:
        nonlocal batches_before, readings_before
        await _until(rec.begin)
        batches_before, readings_before = stepper.stats.batches, stepper.stats.readings

    await _until(job.start_at)
    await asyncio.gather(count_from_window(), *(app(i) for i in _mine(job, job.streams)))
    batches = stepper.stats.batches - batches_before
    mean_batch = (stepper.stats.readings - readings_before) / batches if batches else 0.0
    await stepper.close()
    await client.close()
    return rec.outcome(mean_batch=mean_batch, batches=float(batches))


SCENARIOS = {"unary": unary, "stream": stream, "fanin": fanin, "batch": batch}


async def run_job(job: Job) -> Outcome:
    rec = Recorder(job)
    if job.scenario == "coalesce":
        return await coalesce(job, rec)
    async with job.client.aio_channel(job.address) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        return await SCENARIOS[job.scenario](job, pb_grpc.CellStreamStub(channel), rec)


def _worker(conn: Connection) -> None:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    while (job := conn.recv()) is not None:
        try:
            result: Outcome | str = loop.run_until_complete(run_job(job))
        except BaseException:
            result = traceback.format_exc()
        conn.send(result)
    loop.close()


class LoadPool:
    """Client processes, started once and reused for every measurement."""

    def __init__(self, processes: int) -> None:
        context = multiprocessing.get_context("spawn")  # no fork: grpc does not survive one
        self._workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
        for _ in range(processes):
            mine, theirs = context.Pipe()
            process = context.Process(target=_worker, args=(theirs,), daemon=True)
            process.start()
            self._workers.append((process, mine))

    @property
    def size(self) -> int:
        return len(self._workers)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p, _ in self._workers if p.pid is not None]

    def submit(self, jobs: list[Job]) -> None:
        for (_, conn), job in zip(self._workers, jobs, strict=False):
            conn.send(job)

    def collect(self, n: int, timeout: float = 120.0) -> list[Outcome]:
        results = []
        for _, conn in self._workers[:n]:
            if not conn.poll(timeout):
                raise RuntimeError("a load process did not answer in time")
            result = conn.recv()
            if isinstance(result, str):
                raise RuntimeError(f"a load process failed:\n{result}")
            results.append(result)
        return results

    def close(self) -> None:
        for process, conn in self._workers:
            with contextlib.suppress(OSError):
                conn.send(None)
            process.join(5)
            if process.is_alive():
                process.kill()
