"""Domain errors as gRPC status codes, and the one wrapper that times, counts and fails every
handler the same way."""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, TypeVar

import grpc

from cellstream import errors, metrics
from cellstream.engine import Engine
from cellstream.protocols.access_log import AccessLog
from cellstream.protocols.auth import Authenticator
from cellstream.protocols.tracing import Tracing
from cellstream.tenants import Tenant

Context = grpc.aio.ServicerContext[Any, Any]
Req = TypeVar("Req")
Rep = TypeVar("Rep")

CODES: dict[type[errors.CellStreamError], grpc.StatusCode] = {
    errors.BadInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.UnknownModel: grpc.StatusCode.NOT_FOUND,
    errors.UnknownStream: grpc.StatusCode.NOT_FOUND,
    errors.WrongModel: grpc.StatusCode.FAILED_PRECONDITION,
    errors.NotOwner: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ClusterMapRefused: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ShardMoving: grpc.StatusCode.UNAVAILABLE,
    errors.StaleSequence: grpc.StatusCode.FAILED_PRECONDITION,
    errors.StepLimit: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.TooManyStreams: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.QuotaExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Draining: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.ModelFailure: grpc.StatusCode.INTERNAL,
}


def code_of(error: errors.CellStreamError) -> grpc.StatusCode:
    return CODES.get(type(error), grpc.StatusCode.UNKNOWN)


def deadline_of(context: Context) -> float | None:
    """The call's deadline as a time.monotonic() value, as the engine takes it."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class RequestMetrics:
    """cellstream_request_duration_seconds, with the labels' children cached per served model
    (labels() costs a few µs a call); client strings that name no served model are 'unknown'."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._children: dict[tuple[str, str | None, grpc.StatusCode], Any] = {}

    def label(self, model: str | None) -> str:
        """The model label of a request's `model` field: a served model's name ("" = the default
        model), "none" for an RPC that names no model (None), "unknown" for anything else."""
        if model is None:
            return metrics.NO_MODEL
        name = model or self._engine.default_model or ""
        return name if self._engine.serves(name) else "unknown"

    def observe(self, method: str, model: str | None, code: grpc.StatusCode, started: float) -> float:
        elapsed = time.perf_counter() - started
        child = self._children.get((method, model, code))
        if child is None:
            label = self.label(model)
            child = metrics.REQUEST_DURATION.labels(method=method, model=label, code=code.name)
            if label != "unknown":  # never cache per arbitrary client string
                self._children[(method, model, code)] = child
        child.observe(elapsed)
        return elapsed


class Malformed:
    """What a request deserializer gives for bytes that are not a valid message, instead of
    raising (which grpc would answer as UNKNOWN, with a traceback in the log)."""

    __slots__ = ("reason", "type_name")

    def __init__(self, type_name: str, reason: str) -> None:
        self.type_name = type_name
        self.reason = reason

    def error(self) -> errors.BadInput:
        return errors.BadInput(
            f"the request is not a valid {self.type_name} message ({self.reason}): check that the "
            f"client uses the server's protobuf definitions (string fields must be valid UTF-8)"
        )


def parser(message_type: Any) -> Callable[[bytes], Any]:
    """A request deserializer that never raises: bad bytes become a Malformed."""
    from_string = message_type.FromString
    name = message_type.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return from_string(data)
        except Exception as exc:  # protobuf's DecodeError, or a RecursionError on nesting
            return Malformed(name, type(exc).__name__)

    return parse


class Servicer(Protocol):
    SERVICE: str  # the gRPC service's full name (spans are named after it)
    request_metrics: RequestMetrics
    access_log: AccessLog | None
    tracing: Tracing | None
    auth: Authenticator


class _Call:
    """One call being served: its start, its span (with tracing on), and how it is counted."""

    __slots__ = ("context", "method", "request", "servicer", "span", "started")

    def __init__(self, servicer: Servicer, method: str, request: Any, context: Context) -> None:
        self.servicer, self.method, self.request, self.context = servicer, method, request, context
        self.started = time.perf_counter()
        tracing = servicer.tracing
        self.span = None if tracing is None else tracing.start(servicer.SERVICE, method, context)

    def finish(self, model: str | None, code: grpc.StatusCode) -> None:
        """Count (and with --access-log, log; with tracing, end the span of) the finished call."""
        servicer = self.servicer
        elapsed = servicer.request_metrics.observe(self.method, model, code, self.started)
        if servicer.access_log is not None:
            request_id = getattr(self.request, "request_id", 0)
            label = servicer.request_metrics.label(model)
            servicer.access_log.record(
                self.method, label, code, elapsed, self.context.peer(), request_id=request_id
            )
        if self.span is not None and servicer.tracing is not None:
            servicer.tracing.finish(self.span, model, code)


NOBODY = Tenant("", models=frozenset())  # the caller of a public RPC: no model, not an admin
OWNER_METADATA = ("cellstream-owner", "cellstream-owner-address", "cellstream-map-epoch")


MOVING_METADATA = "cellstream-shard-moving"


def owner_trailers(error: errors.CellStreamError) -> tuple[tuple[str, str], ...]:
    """Where a misrouted stream is served (or that its shard is moving), machine-readably, for
    clients that follow it or retry."""
    if isinstance(error, errors.ShardMoving):
        return ((MOVING_METADATA, str(error.shard)),)
    if not isinstance(error, errors.NotOwner):
        return ()
    return tuple(zip(OWNER_METADATA, (error.owner, error.address, str(error.epoch)), strict=True))


class StreamCaller:
    """Who makes a bidirectional call: authenticated once, at its start, and looked up again
    before the next request whenever the auth file changed (a revoked token's requests are then
    refused in-band, the call going on)."""

    __slots__ = ("_auth", "_digest", "_generation", "_opened", "_refused", "_tenant")

    def __init__(self, auth: Authenticator, digest: bytes, tenant: Tenant) -> None:
        self._auth, self._digest, self._tenant = auth, digest, tenant
        self._opened = tenant  # (the one whose max_stream_calls this call counts against)
        self._generation = auth.generation
        self._refused: errors.Unauthenticated | None = None

    def tenant(self) -> Tenant:
        """The caller's tenant now (Unauthenticated once its token is gone from the auth file)."""
        auth = self._auth
        if auth.generation != self._generation:
            self._generation = auth.generation
            try:
                self._tenant, self._refused = auth.tenant_for(self._digest), None
            except errors.Unauthenticated as exc:
                self._refused = exc
        if self._refused is not None:
            raise self._refused
        return self._tenant

    def close(self) -> None:
        self._opened.close_stream_call()


async def open_streaming_call(servicer: Servicer, method: str, context: Context) -> StreamCaller:
    """Authenticate a bidirectional call and count it against its tenant's max_stream_calls; a
    refusal ends the call with its code. The caller closes it: `StreamCaller.close()`."""
    auth = servicer.auth
    try:
        digest = auth.digest_of(context.invocation_metadata())
        tenant = auth.tenant_for(digest)
        tenant.open_stream_call()
    except errors.CellStreamError as exc:
        servicer.request_metrics.observe(method, None, code_of(exc), time.perf_counter())
        await context.abort(code_of(exc), str(exc))
        raise  # (abort raised already)
    return StreamCaller(auth, digest, tenant)


async def abort(
    context: Context, error: errors.CellStreamError, trailing: Callable[[errors.CellStreamError], Any]
) -> None:
    metadata = (*trailing(error), *owner_trailers(error))
    if metadata:
        context.set_trailing_metadata(metadata)
    await context.abort(code_of(error), str(error))


def rpc(
    method: str,
    *,
    model: Callable[[Any], str | None] = lambda request: None,
    reply_model: Callable[[Any], str] | None = None,
    trailing: Callable[[errors.CellStreamError], Any] = lambda error: (),
    public: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a handler (a coroutine, or an async generator for a streamed reply): authenticate the
    call (the handler gets its tenant as a fourth argument), time it, trace it, label it by
    `model(request)` (None: the RPC names no model; `reply_model(reply)` on success, where the reply
    knows better), and turn a domain error into its status code, with `trailing(error)` as
    trailing metadata. A `public` RPC (no stream data, like health) needs no token: its handler
    gets a tenant that may do nothing."""

    def label_of(request: Any) -> str | None:
        return None if request.__class__ is Malformed else model(request)

    async def failed(call: _Call, context: Context, exc: BaseException) -> None:
        if isinstance(exc, errors.CellStreamError):
            call.finish(label_of(call.request), code_of(exc))
            await abort(context, exc, trailing)
        else:  # cancelled, or a bug grpc answers as UNKNOWN: still counted, its span ended
            cancelled = isinstance(exc, asyncio.CancelledError)
            call.finish(
                label_of(call.request), grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.UNKNOWN
            )

    def wrap(handler: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(handler):

            @functools.wraps(handler)
            async def streamed(self: Servicer, request: Any, context: Context) -> AsyncIterator[Any]:
                call = _Call(self, method, request, context)
                try:
                    tenant = self.auth.tenant_of(context)
                    if request.__class__ is Malformed:
                        raise request.error()
                    async for reply in handler(self, request, context, tenant):
                        yield reply
                except BaseException as exc:
                    await failed(call, context, exc)
                    raise
                call.finish(model(request), grpc.StatusCode.OK)

            return streamed

        @functools.wraps(handler)
        async def unary(self: Servicer, request: Any, context: Context) -> Any:
            call = _Call(self, method, request, context)
            try:
                tenant = NOBODY if public else self.auth.tenant_of(context)
                if request.__class__ is Malformed:
                    raise request.error()
                reply = await handler(self, request, context, tenant)
            except BaseException as exc:
                await failed(call, context, exc)
                raise  # (abort raised already for a domain error)
            call.finish(model(request) if reply_model is None else reply_model(reply), grpc.StatusCode.OK)
            return reply

        return unary

    return wrap
