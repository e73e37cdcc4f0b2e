"""The CellStream gRPC servicer: protobuf <-> domain values, domain errors <-> status codes.

Nothing else happens here; every decision is the engine's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import Message

from cellstream import errors, metrics, wire
from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
from cellstream._proto.cellstream.v1 import cellstream_pb2_grpc as pb_grpc
from cellstream.batcher import Layout, Sink, StepResult
from cellstream.engine import Engine, StreamView, TensorValue
from cellstream.wire import ReplyEncoder

Context = grpc.aio.ServicerContext[Any, Any]
STEP_METADATA = "cellstream-step"
EXPORT_CHUNK = 1 << 20  # bytes per SnapshotChunk message

CODES: dict[type[errors.CellStreamError], grpc.StatusCode] = {
    errors.BadInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.UnknownModel: grpc.StatusCode.NOT_FOUND,
    errors.UnknownStream: grpc.StatusCode.NOT_FOUND,
    errors.WrongModel: grpc.StatusCode.FAILED_PRECONDITION,
    errors.StaleSequence: grpc.StatusCode.FAILED_PRECONDITION,
    errors.TooManyStreams: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Draining: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.ModelFailure: grpc.StatusCode.INTERNAL,
}


class _StreamCall:
    """The replies of one StepStream call, in request order, and the reader/writer wake-ups.

    A future per reading would wake the writer once per reply; here the batcher fills slots and
    the writer is woken once per completed run, then sends every reply that is ready.
    """

    __slots__ = ("_loop", "_space", "_waiter", "slots", "window")

    def __init__(self, loop: asyncio.AbstractEventLoop, window: int) -> None:
        self._loop = loop
        self.window = window
        self.slots: deque[_Slot] = deque()
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


class _Slot:
    """One StepStream reading's place in the reply order; the batcher fills it like a future."""

    __slots__ = ("call", "error", "finished", "request", "result", "started")

    def __init__(self, call: _StreamCall, request: pb.StepRequest, started: float) -> None:
        self.call = call
        self.request = request
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


def code_of(error: errors.CellStreamError) -> grpc.StatusCode:
    return CODES.get(type(error), grpc.StatusCode.UNKNOWN)


def tensors_in(state: Mapping[str, pb.Tensor]) -> dict[str, TensorValue]:
    return {name: (list(t.shape), np.asarray(t.data, np.float32)) for name, t in state.items()}


def tensors_out(state: Mapping[str, np.ndarray]) -> dict[str, pb.Tensor]:
    return {name: pb.Tensor(shape=value.shape, data=value.ravel().tolist()) for name, value in state.items()}


def stream_state(view: StreamView) -> pb.StreamState:
    return pb.StreamState(
        stream_id=view.stream_id, model=view.model, state=tensors_out(view.state), step=view.step
    )


def _deadline(context: Context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class CellStreamServicer(pb_grpc.CellStreamServicer):
    """Translates each RPC into one engine call."""

    def __init__(self, engine: Engine, stream_window: int = 1024) -> None:
        self.engine = engine
        self.stream_window = stream_window
        self._default = engine.repository.default or ""
        # labels() costs a few µs per call: keep each (method, model, code) child once looked up.
        self._histograms: dict[tuple[str, str, grpc.StatusCode], Any] = {}
        self._encoders: dict[Layout, ReplyEncoder] = {}

    def _label(self, model: str) -> str:
        """Metric labels only ever carry served model names (never arbitrary client strings)."""
        name = model or self._default
        return name if name in self.engine.deployment.current else "unknown"

    def _observe(self, method: str, model: str, code: grpc.StatusCode, started: float) -> None:
        elapsed = time.perf_counter() - started
        histogram = self._histograms.get((method, model, code))
        if histogram is None:
            label = self._label(model)
            histogram = metrics.REQUEST_DURATION.labels(method=method, model=label, code=code.name)
            if label != "unknown":  # never cache per arbitrary client string
                self._histograms[(method, model, code)] = histogram
        histogram.observe(elapsed)

    async def _fail(
        self,
        context: Context,
        method: str,
        model: str,
        error: errors.CellStreamError,
        started: float,
    ) -> None:
        code = code_of(error)
        self._observe(method, model, code, started)
        if isinstance(error, errors.StaleSequence):
            # Machine-readable form of "the stream is at step N", for clients that resume.
            context.set_trailing_metadata(((STEP_METADATA, str(error.step)),))
        await context.abort(code, str(error))

    def _queue(self, sink: Sink[StepResult], request: pb.StepRequest, deadline: float | None) -> None:
        self.engine.queue_step(
            sink,
            request.stream_id,
            request.model,
            request.input,
            state=tensors_in(request.state) if request.state else None,
            reset=request.reset,
            end=request.end,
            seq=request.seq,
            want_state=not request.omit_state,
            deadline=deadline,
        )

    def _reply(self, request: pb.StepRequest, result: StepResult) -> bytes:
        """The StepResponse, already serialized (see wire.py): a slice of the run's bytes per field."""
        run = result.run
        encoder = self._encoders.get(run.layout)
        if encoder is None:
            encoder = self._encoders[run.layout] = ReplyEncoder(run.layout.output_size, run.layout.states)
        outputs, states = run.as_bytes()
        i = result.index
        size = encoder.output_bytes
        return encoder.encode(
            result.stream_id,
            outputs[i * size : (i + 1) * size],
            [data[i * n : (i + 1) * n] for data, n in zip(states, encoder.state_bytes, strict=True)]
            if result.want_state
            else None,
            result.step,
            request_id=request.request_id,
            replayed=result.replayed,
        )

    async def Step(self, request: pb.StepRequest, context: Context) -> pb.StepResponse | bytes:
        started = time.perf_counter()
        try:
            future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
            self._queue(future, request, _deadline(context))
            result = await future
        except errors.CellStreamError as exc:
            await self._fail(context, "Step", request.model, exc, started)
            raise  # abort raised already; this keeps type checkers honest
        self._observe("Step", request.model, grpc.StatusCode.OK, started)
        return self._reply(request, result)

    async def StepStream(
        self, request_iterator: AsyncIterator[pb.StepRequest], context: Context
    ) -> AsyncIterator[pb.StepResponse | bytes]:
        call = _StreamCall(asyncio.get_running_loop(), self.stream_window)
        deadline = _deadline(context)
        slots = call.slots

        async def read() -> None:
            try:
                async for request in request_iterator:
                    slot = _Slot(call, request, time.perf_counter())
                    slots.append(slot)
                    try:
                        self._queue(slot, request, deadline)
                    except errors.CellStreamError as exc:
                        slot.set_exception(exc)
                    # The window is the flow control: with `stream_window` replies unsent, reading
                    # stops, and HTTP/2 pushes back on the client instead of the server buffering.
                    if len(slots) >= call.window:
                        await call.wait_for_space()
            finally:
                call.wake()

        reader = asyncio.create_task(read())
        try:
            while True:
                # Replies go out in request order, as each one at the head is ready.
                while slots and slots[0].finished:
                    slot = slots.popleft()
                    call.freed()
                    yield self._stream_reply(slot)
                if not slots and reader.done():
                    break
                await call.wait()
            await reader  # a failed read (the client went away) ends the call with its error
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            for slot in slots:
                slot.finished = True  # the batcher skips readings whose caller is gone

    def _stream_reply(self, slot: _Slot) -> pb.StepResponse | bytes:
        request = slot.request
        if slot.error is not None:
            if not isinstance(slot.error, errors.CellStreamError):
                raise slot.error
            code = code_of(slot.error)
            self._observe("StepStream", request.model, code, slot.started)
            return pb.StepResponse(
                stream_id=request.stream_id,
                request_id=request.request_id,
                error=pb.Error(code=code.value[0], message=str(slot.error)),
            )
        assert slot.result is not None
        self._observe("StepStream", request.model, grpc.StatusCode.OK, slot.started)
        return self._reply(request, slot.result)

    async def StepBatch(self, request: pb.StepBatchRequest, context: Context) -> bytes:
        started = time.perf_counter()
        try:
            result = await self.engine.step_batch(
                request.model,
                request.stream_ids,
                request.inputs,
                want_state=not request.omit_state,
                deadline=_deadline(context),
            )
        except errors.CellStreamError as exc:
            await self._fail(context, "StepBatch", request.model, exc, started)
            raise
        reply = wire.batch_reply(result.outputs, result.states, result.steps)
        self._observe("StepBatch", request.model, grpc.StatusCode.OK, started)
        return reply

    async def GetState(self, request: pb.GetStateRequest, context: Context) -> pb.StreamState:
        started = time.perf_counter()
        try:
            view = await self.engine.get_state(request.stream_id)
        except errors.CellStreamError as exc:
            await self._fail(context, "GetState", "", exc, started)
            raise
        self._observe("GetState", view.model, grpc.StatusCode.OK, started)
        return stream_state(view)

    async def SetState(self, request: pb.SetStateRequest, context: Context) -> pb.StreamState:
        started = time.perf_counter()
        try:
            view = await self.engine.set_state(
                request.stream_id, request.model, tensors_in(request.state), request.step
            )
        except errors.CellStreamError as exc:
            await self._fail(context, "SetState", request.model, exc, started)
            raise
        self._observe("SetState", view.model, grpc.StatusCode.OK, started)
        return stream_state(view)

    async def DeleteStream(
        self, request: pb.DeleteStreamRequest, context: Context
    ) -> pb.DeleteStreamResponse:
        started = time.perf_counter()
        try:
            existed = await self.engine.delete(request.stream_id)
        except errors.CellStreamError as exc:
            await self._fail(context, "DeleteStream", "", exc, started)
            raise
        self._observe("DeleteStream", "", grpc.StatusCode.OK, started)
        return pb.DeleteStreamResponse(existed=existed)

    async def ExportStates(
        self, request: pb.ExportStatesRequest, context: Context
    ) -> AsyncIterator[pb.SnapshotChunk]:
        started = time.perf_counter()
        try:
            chunks = await self.engine.export_file(list(request.models))
        except errors.CellStreamError as exc:
            await self._fail(context, "ExportStates", "", exc, started)
            raise
        for chunk in chunks:
            for offset in range(0, len(chunk), EXPORT_CHUNK):
                yield pb.SnapshotChunk(data=chunk[offset : offset + EXPORT_CHUNK])
        self._observe("ExportStates", "", grpc.StatusCode.OK, started)

    async def ImportStates(
        self, request_iterator: AsyncIterator[pb.SnapshotChunk], context: Context
    ) -> pb.ImportStatesResponse:
        started = time.perf_counter()
        data = b"".join([chunk.data async for chunk in request_iterator])
        try:
            restored, dropped = await self.engine.import_file(data)
        except errors.CellStreamError as exc:
            await self._fail(context, "ImportStates", "", exc, started)
            raise
        self._observe("ImportStates", "", grpc.StatusCode.OK, started)
        return pb.ImportStatesResponse(restored=restored, dropped=dropped)

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        started = time.perf_counter()
        models = [
            pb.ModelInfo(
                name=view.model.name,
                version=view.model.version,
                input_size=view.model.input_size,
                output_size=view.model.output_size,
                states=[pb.StateInfo(name=s.name, shape=s.shape) for s in view.model.states],
                is_default=view.is_default,
                streams=view.streams,
                max_batch=view.max_batch,
                current=view.current,
            )
            for view in self.engine.list_models()
        ]
        self._observe("ListModels", "", grpc.StatusCode.OK, started)
        return pb.ListModelsResponse(models=models)


def _serialize_reply(reply: Message | bytes) -> bytes:
    """Step, StepStream and StepBatch replies come pre-encoded (see wire.py); error replies as messages."""
    return reply if reply.__class__ is bytes else reply.SerializeToString()  # type: ignore[union-attr]


PRE_ENCODED = (pb.StepResponse, pb.StepBatchResponse)


_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_to_server(servicer: CellStreamServicer, server: grpc.aio.Server) -> None:
    """Register the service as the generated code would, but let StepResponses be sent as bytes."""
    service = pb.DESCRIPTOR.services_by_name["CellStream"]
    handlers = {}
    for method in service.methods:
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        serialize = _serialize_reply if response_type in PRE_ENCODED else response_type.SerializeToString
        kind = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=request_type.FromString,
            response_serializer=serialize,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)  # type: ignore[attr-defined]
