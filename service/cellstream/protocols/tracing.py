"""OpenTelemetry tracing (the optional `[otel]` extra), off unless --otlp-endpoint is set.

Each RPC is a server span that continues the caller's W3C `traceparent` (gRPC metadata); the
batched model run that answered a reading is a child span with the run's real start and end, its
size, its queue wait and a run id shared by every request it served. Spans go to an OTLP/gRPC
collector. With tracing off nothing here is imported or called on the hot path.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Mapping
from typing import Any

import grpc

from cellstream.engine import StepResult

log = logging.getLogger(__name__)
_current: contextvars.ContextVar[Any] = contextvars.ContextVar("cellstream_span", default=None)


class Tracing:
    """The tracer, its propagator and its exporter."""

    def __init__(self, endpoint: str, *, export_delay_ms: float = 1000.0) -> None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # noqa: PLC0415
        from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415
        from opentelemetry.trace.propagation.tracecontext import (  # noqa: PLC0415
            TraceContextTextMapPropagator,
        )

        from cellstream import __version__  # noqa: PLC0415

        resource = Resource.create({"service.name": "cellstream", "service.version": __version__})
        self._provider = TracerProvider(resource=resource)
        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"))
        self._provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=export_delay_ms))
        self._tracer = self._provider.get_tracer("cellstream")
        self._propagator = TraceContextTextMapPropagator()
        log.info("tracing: spans go to %s over OTLP/gRPC", endpoint)

    def start(self, service: str, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        """The server span of one RPC, child of the caller's span when it sent `traceparent`."""
        from opentelemetry.trace import SpanKind  # noqa: PLC0415

        carrier: Mapping[str, str] = {
            key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)
        }
        parent = self._propagator.extract(carrier)
        span = self._tracer.start_span(
            f"{service}/{method}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": method,
            },
        )
        _current.set(span)
        return span

    def finish(self, span: Any, model: str | None, code: grpc.StatusCode) -> None:
        from opentelemetry.trace import Status, StatusCode  # noqa: PLC0415

        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if model:
            span.set_attribute("cellstream.model", model[:64])
        if code != grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, code.name))
        span.end()

    def run(self, result: StepResult) -> None:
        """The batched run that answered this reading, as a child of the RPC's span."""
        from opentelemetry import trace  # noqa: PLC0415

        parent, run = _current.get(), result.run
        if parent is None or not run.ended_ns:
            return
        span = self._tracer.start_span(
            "cellstream.run",
            context=trace.set_span_in_context(parent),
            start_time=run.started_ns,
            attributes={
                "cellstream.run_id": run.run_id,
                "cellstream.batch_size": result.size,
                "cellstream.queue_ms": round(result.queue_ms, 3),
                "cellstream.replayed": result.replayed,
            },
        )
        span.end(end_time=run.ended_ns)

    def shutdown(self) -> None:
        self._provider.shutdown()
