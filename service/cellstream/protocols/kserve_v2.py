"""The inference.GRPCInferenceService servicer: the KServe v2 / Triton protocol over the engine.

A Triton sequence is a cellstream stream (kserve_v2_request says how ids map): a request is one
reading, `sequence_start` resets the stream first, `sequence_end` drops it after. v2 traffic goes
through the same engine and batchers as cellstream.v1's, with the same status mapping, metrics
(`method` = the v2 RPC) and auth. Triton RPCs cellstream does not serve answer UNIMPLEMENTED with
what to use instead. See docs/kserve.md.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.message import Message

from cellstream import __version__, errors
from cellstream._proto import inference
from cellstream._proto.inference import grpc_service_pb2 as pb
from cellstream.engine import Engine, ModelView, Sink, StepResult
from cellstream.errors import BadInput, UnknownModel, quoted
from cellstream.ids import MAX_ID_BYTES
from cellstream.model import CellModel
from cellstream.protocols.access_log import AccessLog
from cellstream.protocols.auth import Authenticator
from cellstream.protocols.kserve_v2_models import index_entry, model_config, model_metadata
from cellstream.protocols.kserve_v2_request import Signature, deadline, decode
from cellstream.protocols.kserve_v2_stats import Statistics
from cellstream.protocols.kserve_v2_unserved import UNSERVED, unserved
from cellstream.protocols.kserve_v2_wire import FINAL_PARAMETER, InferReplies
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

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
EXTENSIONS = ("sequence", "sequence(string_id)", "statistics", "model_configuration")


def _model_label(request: Any) -> str:
    return str(request.model_name) or UNNAMED


def _name_label(request: Any) -> str | None:
    return str(request.name) or None


def _request_id(request: Any) -> str:
    request_id = str(request.id)
    if len(request_id) > MAX_ID_BYTES:  # (echoed, and held by a stream's unsent replies)
        raise BadInput(f"id is {len(request_id.encode())} bytes long; the limit is {MAX_ID_BYTES}")
    return request_id


class _Reply:
    """What a ModelStreamInfer reply needs of its request."""

    __slots__ = ("model", "outputs", "queued", "request_id", "signature")

    def __init__(self, model: str, request_id: str) -> None:
        self.model = model if len(model) <= MAX_ID_BYTES else UNNAMED
        self.request_id = request_id
        self.signature: Signature | None = None
        self.outputs: tuple[int, ...] = ()
        self.queued = 0.0


class KServeServicer:
    """Translates each v2 RPC into engine calls."""

    SERVICE = SERVICE_NAME

    def __init__(
        self,
        engine: Engine,
        *,
        auth: Authenticator | None = None,
        access_log: bool = False,
        tracing: Tracing | None = None,
    ) -> None:
        self.engine = engine
        self.auth = auth or Authenticator(None, engine)
        self.request_metrics = RequestMetrics(engine)
        self.access_log = AccessLog() if access_log else None
        self.tracing = tracing
        self.statistics = Statistics()
        self._replies = InferReplies()
        self._signatures: dict[str, tuple[CellModel, Signature]] = {}

    def _served(self, name: str, version: str, tenant: Tenant) -> CellModel:
        """The current version of a model, as the request names it (NOT_FOUND if it is not served)."""
        if not name:
            raise BadInput(f"the request names no model: name one of {self._names(tenant)}")
        model = self.engine.current_model(name)
        tenant.check_model(name)
        if version and version != model.version:
            raise UnknownModel(
                f"model {name!r} version {quoted(version)} is not served: it serves version "
                f"{model.version!r} (leave the version empty for the current one)"
            )
        return model

    def _signature(self, name: str, version: str, tenant: Tenant) -> Signature:
        model = self._served(name, version, tenant)
        cached = self._signatures.get(name)
        if cached is None or cached[0] is not model:
            cached = self._signatures[name] = (model, Signature(model))
        return cached[1]

    def _names(self, tenant: Tenant) -> list[str]:
        return sorted({view.model.name for view in self.engine.list_models(tenant=tenant)})

    def _views(self, name: str, version: str, tenant: Tenant) -> list[ModelView]:
        """The loaded versions of a model (of every model for an empty name), current first."""
        views = self.engine.list_models(tenant=tenant)
        if name:
            self._served(name, "", tenant)  # (NOT_FOUND, PERMISSION_DENIED)
            views = [v for v in views if v.model.name == name]
            if version and not any(v.model.version == version for v in views):
                loaded = sorted(v.model.version for v in views)
                raise UnknownModel(
                    f"model {name!r} has no version {quoted(version)} loaded; loaded: {loaded}"
                )
            views = [v for v in views if v.model.version == version or not version]
        return sorted(views, key=lambda v: (v.model.name, not v.current, v.model.version))

    @rpc("ServerLive")
    async def ServerLive(self, request: Any, context: Context, tenant: Tenant) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc("ServerReady")
    async def ServerReady(self, request: Any, context: Context, tenant: Tenant) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=not self.engine.draining)

    @rpc("ModelReady", model=_name_label)
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context, tenant: Tenant
    ) -> pb.ModelReadyResponse:
        try:
            self._served(request.name, request.version, tenant)
        except (UnknownModel, BadInput):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=not self.engine.draining)

    @rpc("ServerMetadata")
    async def ServerMetadata(
        self, request: Any, context: Context, tenant: Tenant
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="cellstream", version=__version__, extensions=EXTENSIONS)

    @rpc("ModelMetadata", model=_name_label)
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context, tenant: Tenant
    ) -> pb.ModelMetadataResponse:
        signature = self._signature(request.name, request.version, tenant)
        versions = [v.model.version for v in self._views(request.name, "", tenant)]
        return model_metadata(signature, versions)

    @rpc("ModelConfig", model=_name_label)
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Context, tenant: Tenant
    ) -> pb.ModelConfigResponse:
        signature = self._signature(request.name, request.version, tenant)
        (view,) = [v for v in self._views(request.name, "", tenant) if v.current]
        ttl = self.engine.settings.stream_ttl
        return pb.ModelConfigResponse(config=model_config(signature, view, ttl))

    @rpc("ModelStatistics", model=_name_label)
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context, tenant: Tenant
    ) -> pb.ModelStatisticsResponse:
        views = self._views(request.name, request.version, tenant)
        return pb.ModelStatisticsResponse(
            model_stats=[
                self.statistics.of(v.model.name, v.model.version).message(v.model.name, v.model.version)
                for v in views
            ]
        )

    @rpc("RepositoryIndex")
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context, tenant: Tenant
    ) -> pb.RepositoryIndexResponse:
        if request.repository_name:
            raise UnknownModel(
                f"repository {quoted(request.repository_name)} is not served: cellstream has one "
                f"repository, its --models directory (leave repository_name empty)"
            )
        views = self._views("", "", tenant)
        return pb.RepositoryIndexResponse(models=[index_entry(v, views) for v in views])

    def _queue(
        self,
        sink: Sink[StepResult],
        request: Any,
        signature: Signature,
        call_deadline: float | None,
        tenant: Tenant,
    ) -> tuple[int, ...]:
        """Decode and queue one request (raising if it is refused); the outputs its reply carries."""
        inference = decode(request, signature)
        self.engine.queue_step(
            sink,
            inference.stream_id,
            signature.model,
            inference.x,
            state=inference.state,
            reset=inference.reset,
            end=inference.end,
            want_state=inference.want_state,
            deadline=deadline(call_deadline, inference.timeout),
            tenant=tenant,
        )
        return inference.outputs

    @rpc("ModelInfer", model=_model_label)
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context, tenant: Tenant) -> bytes:
        arrived = time.perf_counter()
        request_id = _request_id(request)
        signature = self._signature(request.model_name, request.model_version, tenant)
        future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        try:  # (counted in the model's statistics from here: the model is known)
            outputs = self._queue(future, request, signature, deadline_of(context), tenant)
            queued = time.perf_counter()
            result = await future
        except errors.CellStreamError:
            self.statistics.failed(signature.model, signature.version, arrived=arrived)
            raise
        if self.tracing is not None:
            self.tracing.run(result)
        reply = self._replies.encode(signature, outputs, result, request_id)
        self.statistics.succeeded(signature.model, signature.version, result, arrived=arrived, queued=queued)
        return reply

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest | Malformed], context: Context
    ) -> AsyncIterator[bytes]:
        """One reply per request in request order, errors in-band (the call goes on), each timed
        on its own. Authenticated at the start, and again before the next request when the auth
        file changed (see StreamCaller)."""
        caller = await open_streaming_call(self, "ModelStreamInfer", context)
        call_deadline = deadline_of(context)
        began = time.perf_counter()
        answered = failures = 0
        code = grpc.StatusCode.CANCELLED  # unless the call ends normally

        def start(request: pb.ModelInferRequest | Malformed, order: Order) -> Slot:
            arrived = time.perf_counter()
            if isinstance(request, Malformed):
                slot = Slot(order, arrived, _Reply(UNNAMED, ""))
                slot.set_exception(request.error())
                return slot
            note = _Reply(request.model_name, "")
            slot = Slot(order, arrived, note)
            try:
                note.request_id = _request_id(request)
                tenant = caller.tenant()
                signature = note.signature = self._signature(
                    request.model_name, request.model_version, tenant
                )
                note.outputs = self._queue(slot, request, signature, call_deadline, tenant)
                note.queued = time.perf_counter()
            except errors.CellStreamError as exc:
                slot.set_exception(exc)
            return slot

        order = Order(self.engine.settings.stream_window)
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
                    "ModelStreamInfer",
                    None,
                    code,
                    time.perf_counter() - began,
                    context.peer(),
                    messages=answered + unanswered,
                    errors=failures,
                    unanswered=unanswered,
                )

    def _stream_reply(self, slot: Slot) -> bytes:
        note: _Reply = slot.note
        signature = note.signature
        if slot.error is not None:
            error = slot.error
            if not isinstance(error, errors.CellStreamError):
                raise error
            code = code_of(error)
            self.request_metrics.observe("ModelStreamInfer", note.model, code, slot.started)
            if signature is not None:
                self.statistics.failed(signature.model, signature.version, arrived=slot.started)
            model = "" if note.model == UNNAMED else note.model
            failed = pb.ModelInferResponse(model_name=model, id=note.request_id)
            failed.parameters[FINAL_PARAMETER].bool_param = True
            return pb.ModelStreamInferResponse(
                error_message=f"[{code.name}] {error}", infer_response=failed
            ).SerializeToString()
        assert slot.result is not None and signature is not None
        reply = self._replies.encode(signature, note.outputs, slot.result, note.request_id, stream=True)
        self.statistics.succeeded(
            signature.model, signature.version, slot.result, arrived=slot.started, queued=note.queued
        )
        self.request_metrics.observe("ModelStreamInfer", note.model, grpc.StatusCode.OK, slot.started)
        return reply


def _serialize_reply(reply: Message | bytes) -> bytes:
    """ModelInfer and ModelStreamInfer replies come pre-encoded; error replies as messages."""
    return reply if reply.__class__ is bytes else reply.SerializeToString()  # type: ignore[union-attr]


_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_to_server(servicer: KServeServicer, server: grpc.aio.Server) -> None:
    """Register the service: its replies to inference sent as pre-encoded bytes, and the methods
    cellstream does not serve answering UNIMPLEMENTED with what to use instead."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in service.methods:
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        pre_encoded = method.name in ("ModelInfer", "ModelStreamInfer")
        kind = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=parser(request_type),
            response_serializer=_serialize_reply if pre_encoded else response_type.SerializeToString,
        )
    for name, message in UNSERVED.items():
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            unserved(servicer.request_metrics, name, message)
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)  # type: ignore[attr-defined]


def reflection_pool(service_names: Iterable[str]) -> descriptor_pool.DescriptorPool:
    """A descriptor pool for server reflection holding the named services' files: the inference
    package lives in a pool of its own (see proto/generate.py), the others in protobuf's default."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: Any) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        pool.AddSerializedFile(file.serialized_pb)
        added.add(file.name)

    for name in service_names:
        source = inference.POOL if name == SERVICE_NAME else descriptor_pool.Default()
        add(source.FindServiceByName(name).file)
    return pool
