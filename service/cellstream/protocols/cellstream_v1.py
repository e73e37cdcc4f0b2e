"""The cellstream.v1.CellStream servicer: protobuf <-> plain values, errors <-> status codes.

Nothing else happens here; every decision is the engine's. Step, StepStream and StepBatch replies
leave as bytes written by cellstream_v1_wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import Message

from cellstream import errors
from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
from cellstream._proto.cellstream.v1 import cellstream_pb2_grpc as pb_grpc
from cellstream.cluster.cluster_map import ClusterMap
from cellstream.durability import Durability
from cellstream.engine import Engine, Sink, StepResult, StreamView, TensorValue
from cellstream.protocols.access_log import AccessLog
from cellstream.protocols.auth import Authenticator
from cellstream.protocols.cellstream_v1_stream import UNNAMED, Slot, StreamCall
from cellstream.protocols.cellstream_v1_wire import STEP_METADATA, StepReplies, batch_reply
from cellstream.protocols.status import (
    Context,
    Malformed,
    RequestMetrics,
    code_of,
    deadline_of,
    open_streaming_call,
    parser,
    rpc,
)
from cellstream.protocols.tracing import Tracing
from cellstream.tenants import Tenant

EXPORT_CHUNK = 1 << 20  # bytes per SnapshotChunk message


def _request_model(request: Any) -> str:
    return str(request.model)


def _reply_model(reply: Any) -> str:
    return str(reply.model)


def _step_trailing(error: errors.CellStreamError) -> tuple[tuple[str, str], ...]:
    """A stale seq says the stream's step machine-readably too, for clients that resume."""
    return ((STEP_METADATA, str(error.step)),) if isinstance(error, errors.StaleSequence) else ()


def tensors_in(state: Mapping[str, pb.Tensor]) -> dict[str, TensorValue]:
    return {name: (list(t.shape), np.asarray(t.data, np.float32)) for name, t in state.items()}


def tensors_out(state: Mapping[str, np.ndarray]) -> dict[str, pb.Tensor]:
    return {name: pb.Tensor(shape=value.shape, data=value.ravel().tolist()) for name, value in state.items()}


def stream_state(view: StreamView) -> pb.StreamState:
    return pb.StreamState(
        stream_id=view.stream_id, model=view.model, state=tensors_out(view.state), step=view.step
    )


class CellStreamServicer(pb_grpc.CellStreamServicer):
    """Translates each RPC into one engine call."""

    SERVICE = pb.DESCRIPTOR.services_by_name["CellStream"].full_name

    def __init__(
        self,
        engine: Engine,
        durability: Durability,
        stream_window: int = 1024,
        *,
        access_log: bool = False,
        tracing: Tracing | None = None,
        auth: Authenticator | None = None,
    ) -> None:
        self.engine = engine
        self.auth = auth or Authenticator(None, engine)
        self.durability = durability
        self.stream_window = stream_window
        self.request_metrics = RequestMetrics(engine)
        self.access_log = AccessLog() if access_log else None
        self.tracing = tracing
        self._replies = StepReplies()

    def _queue(
        self, sink: Sink[StepResult], request: pb.StepRequest, deadline: float | None, tenant: Tenant
    ) -> None:
        values = request.input
        self.engine.queue_step(
            sink,
            request.stream_id,
            request.model,
            np.fromiter(values, np.float32, len(values)),  # (reads a repeated field faster than asarray)
            state=tensors_in(request.state) if request.state else None,
            reset=request.reset,
            end=request.end,
            seq=request.seq,
            want_state=not request.omit_state,
            deadline=deadline,
            tenant=tenant,
        )

    @rpc("Step", model=_request_model, trailing=_step_trailing)
    async def Step(self, request: pb.StepRequest, context: Context, tenant: Tenant) -> bytes:
        future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        self._queue(future, request, deadline_of(context), tenant)
        result = await future
        if self.tracing is not None:
            self.tracing.run(result)
        return self._replies.encode(result, request.request_id, request.stream_id)

    async def StepStream(
        self, request_iterator: AsyncIterator[pb.StepRequest | Malformed], context: Context
    ) -> AsyncIterator[pb.StepResponse | bytes]:
        """Errors go in-band, one reply per request, so this call is timed per message, not as a whole.

        The call is authenticated once, at its start; when the auth file changes, its token is
        looked up again before the next reading (a revoked token's readings are refused in-band)."""
        digest, tenant = await open_streaming_call(self, "StepStream", context)
        try:
            async for reply in self._stream(request_iterator, context, digest, tenant):
                yield reply
        finally:
            tenant.close_stream_call()

    async def _stream(
        self,
        request_iterator: AsyncIterator[pb.StepRequest | Malformed],
        context: Context,
        digest: bytes,
        tenant: Tenant,
    ) -> AsyncIterator[pb.StepResponse | bytes]:
        auth = self.auth
        generation = auth.generation
        refused: errors.CellStreamError | None = None
        call = StreamCall(asyncio.get_running_loop(), self.stream_window)
        deadline = deadline_of(context)
        slots = call.slots
        started = time.perf_counter()
        code = grpc.StatusCode.CANCELLED  # unless the call ends normally

        async def read() -> None:
            nonlocal generation, refused, tenant
            try:
                async for request in request_iterator:
                    started = time.perf_counter()
                    if auth.generation != generation:  # the auth file changed: is the token still good?
                        generation = auth.generation
                        try:
                            tenant, refused = auth.tenant_for(digest), None
                        except errors.Unauthenticated as exc:
                            refused = exc
                    if isinstance(request, Malformed):  # answered in-band; the call goes on
                        slot = Slot(call, "", UNNAMED, 0, started)
                        slots.append(slot)
                        slot.set_exception(request.error())
                    else:
                        slot = Slot(call, request.stream_id, request.model, request.request_id, started)
                        slots.append(slot)
                        try:
                            if refused is not None:
                                raise refused
                            self._queue(slot, request, deadline, tenant)
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
                    call.replied += 1
                    call.errors += slot.error is not None
                    yield self._stream_reply(slot)
                if not slots and reader.done():
                    break
                await call.wait()
            await reader  # a failed read (the client went away) ends the call with its error
            code = grpc.StatusCode.OK
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            for slot in slots:
                slot.finished = True  # the batcher skips readings whose caller is gone
            if self.access_log is not None:
                self.access_log.record(
                    "StepStream",
                    None,
                    code,
                    time.perf_counter() - started,
                    context.peer(),
                    messages=call.replied + len(slots),
                    errors=call.errors,
                    unanswered=len(slots),
                )

    def _stream_reply(self, slot: Slot) -> pb.StepResponse | bytes:
        if slot.error is not None:
            if not isinstance(slot.error, errors.CellStreamError):
                raise slot.error
            code = code_of(slot.error)
            self.request_metrics.observe("StepStream", slot.model, code, slot.started)
            error = pb.Error(code=code.value[0], message=str(slot.error))
            if isinstance(slot.error, errors.NotOwner):
                error.owner, error.owner_address = slot.error.owner, slot.error.address
                error.map_epoch = slot.error.epoch
            return pb.StepResponse(stream_id=slot.stream_id, request_id=slot.request_id, error=error)
        assert slot.result is not None
        self.request_metrics.observe("StepStream", slot.model, grpc.StatusCode.OK, slot.started)
        return self._replies.encode(slot.result, slot.request_id, slot.stream_id)

    @rpc("StepBatch", model=_request_model)
    async def StepBatch(self, request: pb.StepBatchRequest, context: Context, tenant: Tenant) -> bytes:
        result = await self.engine.step_batch(
            request.model,
            request.stream_ids,
            request.inputs,
            want_state=not request.omit_state,
            deadline=deadline_of(context),
            tenant=tenant,
        )
        return batch_reply(result.outputs, result.states, result.steps)

    @rpc("GetState", reply_model=_reply_model)
    async def GetState(self, request: pb.GetStateRequest, context: Context, tenant: Tenant) -> pb.StreamState:
        return stream_state(await self.engine.get_state(request.stream_id, tenant=tenant))

    @rpc("SetState", model=_request_model, reply_model=_reply_model)
    async def SetState(self, request: pb.SetStateRequest, context: Context, tenant: Tenant) -> pb.StreamState:
        view = await self.engine.set_state(
            request.stream_id, request.model, tensors_in(request.state), request.step, tenant=tenant
        )
        return stream_state(view)

    @rpc("DeleteStream")
    async def DeleteStream(
        self, request: pb.DeleteStreamRequest, context: Context, tenant: Tenant
    ) -> pb.DeleteStreamResponse:
        return pb.DeleteStreamResponse(existed=await self.engine.delete(request.stream_id, tenant=tenant))

    @rpc("ExportStates")
    async def ExportStates(
        self, request: pb.ExportStatesRequest, context: Context, tenant: Tenant
    ) -> AsyncIterator[pb.SnapshotChunk]:
        chunks = await self.durability.export_file(
            list(request.models), tenant=tenant, shards=list(request.shards)
        )
        for chunk in chunks:
            for offset in range(0, len(chunk), EXPORT_CHUNK):
                yield pb.SnapshotChunk(data=chunk[offset : offset + EXPORT_CHUNK])

    @rpc("ImportStates")
    async def ImportStates(
        self, request_iterator: AsyncIterator[pb.SnapshotChunk | Malformed], context: Context, tenant: Tenant
    ) -> pb.ImportStatesResponse:
        limit = self.durability.engine.settings.max_import_bytes
        data = bytearray()
        async for chunk in request_iterator:
            if isinstance(chunk, Malformed):
                raise chunk.error()
            if len(data) + len(chunk.data) > limit:  # refused at once: the rest is never read
                raise errors.TooLarge(
                    f"the snapshot file is over --max-import-bytes {limit}: raise the limit, or "
                    f"export and import fewer models at a time (--model)"
                )
            data += chunk.data
        restored, dropped = await self.durability.import_file(data, tenant=tenant)  # (no copy of the file)
        return pb.ImportStatesResponse(restored=restored, dropped=dropped)

    @rpc("GetClusterMap", public=True)  # (topology, no stream data: replicas and clients find owners)
    async def GetClusterMap(
        self, request: pb.GetClusterMapRequest, context: Context, tenant: Tenant
    ) -> pb.ClusterMapInfo:
        return self._map_info()

    def _map_info(self) -> pb.ClusterMapInfo:
        ownership = self.engine.ownership
        if ownership is None:
            return pb.ClusterMapInfo()
        cluster_map = ownership.map
        return pb.ClusterMapInfo(
            replica=ownership.replica, epoch=cluster_map.epoch, map_json=cluster_map.to_json()
        )

    @rpc("SetClusterMap")
    async def SetClusterMap(
        self, request: pb.SetClusterMapRequest, context: Context, tenant: Tenant
    ) -> pb.ClusterMapInfo:
        try:
            cluster_map = ClusterMap.from_json(request.map_json)
        except ValueError as exc:
            raise errors.BadInput(f"map_json is not a usable cluster map: {exc}") from None
        await self.durability.adopt_cluster_map(cluster_map, tenant=tenant)
        return self._map_info()

    @rpc("BeginHandoff")
    async def BeginHandoff(
        self, request: pb.HandoffRequest, context: Context, tenant: Tenant
    ) -> pb.HandoffResponse:
        moving = await self.durability.begin_handoff(
            list(request.shards), cancel=request.cancel, tenant=tenant
        )
        return pb.HandoffResponse(moving=moving)

    @rpc("ListModels")
    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context, tenant: Tenant
    ) -> pb.ListModelsResponse:
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
            for view in self.engine.list_models(tenant=tenant)
        ]
        return pb.ListModelsResponse(models=models)


def _serialize_reply(reply: Message | bytes) -> bytes:
    """Step, StepStream and StepBatch replies come pre-encoded; error replies as messages."""
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
            request_deserializer=parser(request_type),
            response_serializer=serialize,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)  # type: ignore[attr-defined]
