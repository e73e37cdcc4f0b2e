"""The cellstream.v1.CellStream servicer: protobuf <-> plain values, errors <-> status codes.

Nothing else happens here; every decision is the engine's. Step, StepStream and StepBatch replies
leave as bytes written by cellstream_v1_wire.
"""

from __future__ import annotations

import asyncio
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
from cellstream.ids import MAX_ID_BYTES
from cellstream.protocols.access_log import AccessLog
from cellstream.protocols.auth import Authenticator
from cellstream.protocols.cellstream_v1_wire import STEP_METADATA, StepReplies, batch_reply
from cellstream.protocols.reply_order import UNNAMED, Order, Slot
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


def _note(request: pb.StepRequest) -> tuple[str, str, int]:
    """What a StepStream reply needs of its request: never the request itself (a client that does
    not read its replies must not make the server hold its messages), each string cut to the id
    limit."""
    stream_id, model = request.stream_id, request.model
    return (
        stream_id if len(stream_id) <= MAX_ID_BYTES else "",
        model if len(model) <= MAX_ID_BYTES else UNNAMED,
        request.request_id,
    )


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
        """Errors go in-band, one reply per request, so this call is timed per message, not as a
        whole. Authenticated at the start, and again before the next reading when the auth file
        changed (see StreamCaller)."""
        caller = await open_streaming_call(self, "StepStream", context)
        deadline = deadline_of(context)
        started = time.perf_counter()
        answered = failures = 0
        code = grpc.StatusCode.CANCELLED  # unless the call ends normally

        def start(request: pb.StepRequest | Malformed, order: Order) -> Slot:
            arrived = time.perf_counter()
            if isinstance(request, Malformed):  # answered in-band; the call goes on
                slot = Slot(order, arrived, ("", UNNAMED, 0))
                slot.set_exception(request.error())
                return slot
            slot = Slot(order, arrived, _note(request))
            try:
                self._queue(slot, request, deadline, caller.tenant())
            except errors.CellStreamError as exc:
                slot.set_exception(exc)
            return slot

        order = Order(self.stream_window)
        try:
            async for slot in order.serve(request_iterator, start):
                answered += 1
                failures += slot.error is not None
                yield self._stream_reply(slot)
            code = grpc.StatusCode.OK
        finally:
            caller.close()
            if self.access_log is not None:
                unanswered = len(order.slots)
                self.access_log.record(
                    "StepStream",
                    None,
                    code,
                    time.perf_counter() - started,
                    context.peer(),
                    messages=answered + unanswered,
                    errors=failures,
                    unanswered=unanswered,
                )

    def _stream_reply(self, slot: Slot) -> pb.StepResponse | bytes:
        stream_id, model, request_id = slot.note
        if slot.error is not None:
            if not isinstance(slot.error, errors.CellStreamError):
                raise slot.error
            code = code_of(slot.error)
            self.request_metrics.observe("StepStream", model, code, slot.started)
            error = pb.Error(code=code.value[0], message=str(slot.error))
            if isinstance(slot.error, errors.NotOwner):
                error.owner, error.owner_address = slot.error.owner, slot.error.address
                error.map_epoch = slot.error.epoch
            return pb.StepResponse(stream_id=stream_id, request_id=request_id, error=error)
        assert slot.result is not None
        self.request_metrics.observe("StepStream", model, grpc.StatusCode.OK, slot.started)
        return self._replies.encode(slot.result, request_id, stream_id)

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
