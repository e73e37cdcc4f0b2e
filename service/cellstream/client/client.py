"""Python client for cellstream: numpy in, numpy out, over the real gRPC API.

`Client` is blocking; `AsyncClient` is the asyncio twin. Errors surface as `grpc.RpcError`
(unary calls) or as `StepReply.error` (StepStream, where one bad message does not end the call).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
from cellstream._proto.cellstream.v1 import cellstream_pb2_grpc as pb_grpc
from cellstream.protocols.cellstream_v1_wire import STEP_METADATA

ArrayLike = Sequence[float] | np.ndarray
MAX_MESSAGE = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]


@dataclass(frozen=True)
class StepReply:
    """One reading's result; `error` is (code, message) when a StepStream message was refused."""

    stream_id: str
    output: np.ndarray
    state: dict[str, np.ndarray]
    step: int
    replayed: bool = False
    request_id: int = 0
    error: tuple[grpc.StatusCode, str] | None = None


@dataclass(frozen=True)
class BatchReply:
    """Row i answers reading i."""

    outputs: np.ndarray
    states: dict[str, np.ndarray]
    steps: np.ndarray


@dataclass(frozen=True)
class StreamState:
    stream_id: str
    model: str
    state: dict[str, np.ndarray]
    step: int


_CODES = {code.value[0]: code for code in grpc.StatusCode}
# What a resuming client retries: with `seq` every reading is idempotent, so any failure that may
# come from the transport (a server killed mid-call shows up as UNAVAILABLE, INTERNAL or UNKNOWN
# depending on timing) is safe to send again.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
T = TypeVar("T")


class ResumeError(Exception):
    """A resuming client cannot replay what the server lost: the readings are no longer kept."""


def tensor(value: ArrayLike) -> pb.Tensor:
    array = np.asarray(value, np.float32)
    return pb.Tensor(shape=array.shape, data=array.ravel().tolist())


def from_tensors(state: Mapping[str, pb.Tensor]) -> dict[str, np.ndarray]:
    return {name: np.asarray(t.data, np.float32).reshape(tuple(t.shape)) for name, t in state.items()}


def step_request(
    stream_id: str,
    reading: ArrayLike,
    *,
    model: str = "",
    state: Mapping[str, ArrayLike] | None = None,
    reset: bool = False,
    end: bool = False,
    seq: int = 0,
    omit_state: bool = False,
    request_id: int = 0,
) -> pb.StepRequest:
    """The StepRequest for one reading (what Step and StepStream send)."""
    return pb.StepRequest(
        stream_id=stream_id,
        model=model,
        input=np.asarray(reading, np.float32).ravel().tolist(),
        state={name: tensor(v) for name, v in (state or {}).items()},
        reset=reset,
        end=end,
        seq=seq,
        omit_state=omit_state,
        request_id=request_id,
    )


def step_reply(reply: pb.StepResponse) -> StepReply:
    error = None
    if reply.HasField("error"):
        error = (_CODES.get(reply.error.code, grpc.StatusCode.UNKNOWN), reply.error.message)
    return StepReply(
        stream_id=reply.stream_id,
        output=np.asarray(reply.output, np.float32),
        state=from_tensors(reply.state),
        step=reply.step,
        replayed=reply.replayed,
        request_id=reply.request_id,
        error=error,
    )


def batch_request(
    stream_ids: Sequence[str], inputs: np.ndarray, *, model: str = "", omit_state: bool = False
) -> pb.StepBatchRequest:
    return pb.StepBatchRequest(
        model=model,
        stream_ids=stream_ids,
        inputs=np.ascontiguousarray(inputs, "<f4").tobytes(),
        omit_state=omit_state,
    )


def batch_reply(reply: pb.StepBatchResponse, n: int) -> BatchReply:
    return BatchReply(
        outputs=np.frombuffer(reply.outputs, "<f4").reshape(n, -1),
        states={name: np.frombuffer(data, "<f4").reshape(n, -1) for name, data in reply.states.items()},
        steps=np.asarray(reply.steps, np.uint64),
    )


def stream_state(reply: pb.StreamState) -> StreamState:
    return StreamState(reply.stream_id, reply.model, from_tensors(reply.state), reply.step)


def stale_step(error: grpc.RpcError) -> int | None:
    """The stream's current step carried by a stale-seq FAILED_PRECONDITION, else None."""
    if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
        return None
    metadata: Iterable[tuple[str, str]] = error.trailing_metadata() or ()  # type: ignore[assignment]
    for key, value in metadata:
        if key == STEP_METADATA:
            return int(value)
    return None


class Client:
    """Blocking client. `Client("127.0.0.1:50051").step("sensor-1", reading)`.

    With `resume=True` the client numbers each stream's readings itself (`seq`), keeps the last
    `resume_window` readings per stream, retries while the server is unreachable (for up to
    `retry_seconds`), and when a restarted server says a stream is behind (it restored an older
    snapshot), resends the readings it lost, in order, before the current one. Each reading is
    then applied exactly once, as if the server had never stopped.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float | None = 30.0,
        options: Sequence[tuple[str, Any]] = (),
        resume: bool = False,
        resume_window: int = 100_000,
        retry_seconds: float = 60.0,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.resume = resume
        self.retry_seconds = retry_seconds
        self._channel = grpc.insecure_channel(address, options=[*CHANNEL_OPTIONS, *options])
        self._stub = pb_grpc.CellStreamStub(self._channel)
        self._window = resume_window
        self._sent: dict[str, deque[pb.StepRequest]] = {}
        self._next_seq: dict[str, int] = {}

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def step(self, stream_id: str, reading: ArrayLike, **options: Any) -> StepReply:
        """Apply one reading; options are those of `step_request` (model, state, reset, end, seq…)."""
        if not self.resume:
            return step_reply(
                self._stub.Step(step_request(stream_id, reading, **options), timeout=self.timeout)
            )
        if not options.get("seq"):
            options["seq"] = self._next(stream_id)
        request = step_request(stream_id, reading, **options)
        sent = self._sent.setdefault(stream_id, deque(maxlen=self._window))
        sent.append(request)
        reply = self._send_resuming(request)
        self._next_seq[stream_id] = reply.step + 1
        if request.end:
            self._sent.pop(stream_id, None)
            self._next_seq.pop(stream_id, None)
        return reply

    def _next(self, stream_id: str) -> int:
        if stream_id not in self._next_seq:
            try:
                self._next_seq[stream_id] = self._retrying(lambda: self.get_state(stream_id)).step + 1
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                self._next_seq[stream_id] = 1
        return self._next_seq[stream_id]

    def _retrying(self, call: Callable[[], T]) -> T:
        """Retry while the server is unreachable (restarting), with capped back-off."""
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.05
        while True:
            try:
                return call()
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _send_resuming(self, request: pb.StepRequest) -> StepReply:
        def send(r: pb.StepRequest) -> StepReply:
            return step_reply(self._retrying(lambda: self._stub.Step(r, timeout=self.timeout)))

        try:
            return send(request)
        except grpc.RpcError as exc:
            at = stale_step(exc)
            if at is None or at >= request.seq:
                raise
        # The server is behind (it restarted from an older snapshot): resend what it lost, in order.
        history = [r for r in self._sent[request.stream_id] if at < r.seq < request.seq]
        if [r.seq for r in history] != list(range(at + 1, request.seq)):
            raise ResumeError(
                f"stream {request.stream_id!r}: the server is at step {at}, but readings "
                f"{at + 1}..{request.seq - 1} are no longer kept (resume_window={self._window})"
            )
        for lost in history:
            send(lost)
        return send(request)

    def step_stream(self, requests: Iterable[pb.StepRequest]) -> Iterator[StepReply]:
        """One StepStream call: send the requests (see `step_request`), yield replies in order."""
        for reply in self._stub.StepStream(iter(requests), timeout=self.timeout):
            yield step_reply(reply)

    def step_batch(
        self, stream_ids: Sequence[str], inputs: np.ndarray, *, model: str = "", omit_state: bool = False
    ) -> BatchReply:
        request = batch_request(stream_ids, inputs, model=model, omit_state=omit_state)
        return batch_reply(self._stub.StepBatch(request, timeout=self.timeout), len(stream_ids))

    def get_state(self, stream_id: str) -> StreamState:
        return stream_state(
            self._stub.GetState(pb.GetStateRequest(stream_id=stream_id), timeout=self.timeout)
        )

    def set_state(
        self, stream_id: str, state: Mapping[str, ArrayLike], *, model: str = "", step: int = 0
    ) -> StreamState:
        request = pb.SetStateRequest(
            stream_id=stream_id, model=model, state={n: tensor(v) for n, v in state.items()}, step=step
        )
        return stream_state(self._stub.SetState(request, timeout=self.timeout))

    def delete(self, stream_id: str) -> bool:
        reply = self._stub.DeleteStream(pb.DeleteStreamRequest(stream_id=stream_id), timeout=self.timeout)
        return bool(reply.existed)

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout).models)

    def export_states(self, path: Path, models: Sequence[str] = ()) -> int:
        """Write the server's streams (or those of some models) to a snapshot file; returns its size."""
        size = 0
        with path.open("wb") as out:
            for chunk in self._stub.ExportStates(pb.ExportStatesRequest(models=models), timeout=self.timeout):
                out.write(chunk.data)
                size += len(chunk.data)
        return size

    def import_states(self, path: Path) -> tuple[int, int]:
        """Load a snapshot file into the server; returns (restored, dropped) stream counts."""

        def chunks() -> Iterator[pb.SnapshotChunk]:
            with path.open("rb") as source:
                while data := source.read(1 << 20):
                    yield pb.SnapshotChunk(data=data)

        reply = self._stub.ImportStates(chunks(), timeout=self.timeout)
        return int(reply.restored), int(reply.dropped)

    def health(self, service: str = "") -> bool:
        stub = health_pb2_grpc.HealthStub(self._channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class AsyncClient:
    """asyncio client with the same methods as `Client`, awaited."""

    def __init__(
        self, address: str, *, timeout: float | None = 30.0, options: Sequence[tuple[str, Any]] = ()
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(address, options=[*CHANNEL_OPTIONS, *options])
        self._stub = pb_grpc.CellStreamStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    async def step(self, stream_id: str, reading: ArrayLike, **options: Any) -> StepReply:
        reply = await self._stub.Step(step_request(stream_id, reading, **options), timeout=self.timeout)
        return step_reply(reply)

    async def step_stream(
        self, requests: Iterable[pb.StepRequest] | AsyncIterable[pb.StepRequest]
    ) -> AsyncIterator[StepReply]:
        call = self._stub.StepStream(requests, timeout=self.timeout)
        async for reply in call:
            yield step_reply(reply)

    async def step_batch(
        self, stream_ids: Sequence[str], inputs: np.ndarray, *, model: str = "", omit_state: bool = False
    ) -> BatchReply:
        request = batch_request(stream_ids, inputs, model=model, omit_state=omit_state)
        return batch_reply(await self._stub.StepBatch(request, timeout=self.timeout), len(stream_ids))

    async def get_state(self, stream_id: str) -> StreamState:
        reply = await self._stub.GetState(pb.GetStateRequest(stream_id=stream_id), timeout=self.timeout)
        return stream_state(reply)

    async def set_state(
        self, stream_id: str, state: Mapping[str, ArrayLike], *, model: str = "", step: int = 0
    ) -> StreamState:
        request = pb.SetStateRequest(
            stream_id=stream_id, model=model, state={n: tensor(v) for n, v in state.items()}, step=step
        )
        return stream_state(await self._stub.SetState(request, timeout=self.timeout))

    async def delete(self, stream_id: str) -> bool:
        reply = await self._stub.DeleteStream(
            pb.DeleteStreamRequest(stream_id=stream_id), timeout=self.timeout
        )
        return bool(reply.existed)

    async def list_models(self) -> list[pb.ModelInfo]:
        return list((await self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout)).models)
