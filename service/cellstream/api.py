"""The CellStream gRPC servicer: protobuf <-> domain values, domain errors <-> status codes.

Nothing else happens here; every decision is the engine's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import numpy as np

from cellstream import errors, metrics
from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
from cellstream._proto.cellstream.v1 import cellstream_pb2_grpc as pb_grpc
from cellstream.batcher import StepResult
from cellstream.engine import Engine, StreamView, TensorValue

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

    def _submit(self, request: pb.StepRequest, deadline: float | None) -> asyncio.Future[StepResult]:
        return self.engine.submit_step(
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

    @staticmethod
    def _reply(request: pb.StepRequest, result: StepResult) -> pb.StepResponse:
        reply = pb.StepResponse(
            stream_id=result.stream_id,
            output=result.output.tolist(),
            step=result.step,
            request_id=request.request_id,
            replayed=result.replayed,
        )
        if result.state is not None:
            # Filling the map's Tensors in place is ~40 % cheaper than building Tensor messages.
            for name, value in result.state.items():
                tensor = reply.state[name]
                tensor.shape.extend(value.shape)
                tensor.data.extend(value.ravel().tolist())
        return reply

    async def Step(self, request: pb.StepRequest, context: Context) -> pb.StepResponse:
        started = time.perf_counter()
        try:
            result = await self._submit(request, _deadline(context))
        except errors.CellStreamError as exc:
            await self._fail(context, "Step", request.model, exc, started)
            raise  # abort raised already; this keeps type checkers honest
        self._observe("Step", request.model, grpc.StatusCode.OK, started)
        return self._reply(request, result)

    async def StepStream(
        self, request_iterator: AsyncIterator[pb.StepRequest], context: Context
    ) -> AsyncIterator[pb.StepResponse]:
        # The bounded queue is the flow control: when `stream_window` replies are unsent, reading
        # stops, and HTTP/2 pushes back on the client instead of the server buffering without end.
        pending: asyncio.Queue[tuple[pb.StepRequest, float, asyncio.Future[StepResult] | Exception] | None]
        pending = asyncio.Queue(self.stream_window)
        deadline = _deadline(context)

        async def read() -> None:
            async for request in request_iterator:
                started = time.perf_counter()
                item: asyncio.Future[StepResult] | Exception
                try:
                    item = self._submit(request, deadline)
                except errors.CellStreamError as exc:
                    item = exc
                await pending.put((request, started, item))
            await pending.put(None)

        reader = asyncio.create_task(read())
        try:
            while (entry := await pending.get()) is not None:
                request, started, item = entry
                try:
                    if isinstance(item, Exception):
                        raise item
                    result = await item
                except errors.CellStreamError as exc:
                    code = code_of(exc)
                    self._observe("StepStream", request.model, code, started)
                    yield pb.StepResponse(
                        stream_id=request.stream_id,
                        request_id=request.request_id,
                        error=pb.Error(code=code.value[0], message=str(exc)),
                    )
                    continue
                self._observe("StepStream", request.model, grpc.StatusCode.OK, started)
                yield self._reply(request, result)
            await reader
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            while not pending.empty():
                entry = pending.get_nowait()
                if entry is not None and isinstance(entry[2], asyncio.Future):
                    entry[2].cancel()

    async def StepBatch(self, request: pb.StepBatchRequest, context: Context) -> pb.StepBatchResponse:
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
        reply = pb.StepBatchResponse(
            outputs=result.outputs.astype("<f4", copy=False).tobytes(),
            states=None
            if result.states is None
            else {name: value.astype("<f4", copy=False).tobytes() for name, value in result.states.items()},
            steps=result.steps.tolist(),
        )
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
