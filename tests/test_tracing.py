"""Tracing: spans reach a real OTLP receiver and continue the caller's trace."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from support import start_server, wait_for


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[object] = []
        self._lock = threading.Lock()

    def Export(self, request: object, context: object) -> object:
        with self._lock:
            for resource in request.resource_spans:  # type: ignore[attr-defined]
                for scope in resource.scope_spans:
                    self.spans.extend(scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def named(self, name: str) -> list[object]:
        with self._lock:
            return [span for span in self.spans if span.name == name]  # type: ignore[attr-defined]


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, int]]:
    collector = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield collector, port
    server.stop(grace=None)


def test_rpc_and_run_spans_continue_the_callers_trace(tmp_path: Path, receiver: tuple[Receiver, int]) -> None:
    collector, port = receiver
    server = start_server(tmp_path, "--otlp-endpoint", f"127.0.0.1:{port}")
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    traceparent = f"00-{trace_id}-{parent_id}-01"
    with server.client() as client:
        channel = grpc.insecure_channel(server.address)
        from cellstream._proto.cellstream.v1 import cellstream_pb2_grpc as pb_grpc  # noqa: PLC0415
        from cellstream.client import step_request  # noqa: PLC0415

        stub = pb_grpc.CellStreamStub(channel)
        stub.Step(step_request("traced", np.ones(8, np.float32)), metadata=(("traceparent", traceparent),))
        channel.close()
        client.list_models()
    steps = wait_for(lambda: collector.named("cellstream.v1.CellStream/Step"), timeout=20)
    span = steps[0]  # type: ignore[index]
    assert span.trace_id.hex() == trace_id and span.parent_span_id.hex() == parent_id
    runs = wait_for(lambda: collector.named("cellstream.run"), timeout=20)
    run = runs[0]  # type: ignore[index]
    assert run.trace_id.hex() == trace_id and run.parent_span_id == span.span_id
    attributes = {a.key: a.value for a in run.attributes}
    assert attributes["cellstream.batch_size"].int_value == 1
    assert (
        run.start_time_unix_nano >= span.start_time_unix_nano
        and run.end_time_unix_nano <= span.end_time_unix_nano
    )
    wait_for(lambda: collector.named("cellstream.v1.CellStream/ListModels"), timeout=20)
    assert server.stop() == 0


def test_kserve_v2_spans_are_named_after_their_own_service(
    tmp_path: Path, receiver: tuple[Receiver, int]
) -> None:
    import tritonclient.grpc as triton  # noqa: PLC0415

    collector, port = receiver
    server = start_server(tmp_path, "--otlp-endpoint", f"127.0.0.1:{port}")
    client = triton.InferenceServerClient(server.address)
    reading = triton.InferInput("x", [1, 8], "FP32")
    reading.set_data_from_numpy(np.ones((1, 8), np.float32))
    client.infer("gru", [reading], sequence_id="traced-v2", sequence_start=True)
    client.close()
    (span,) = wait_for(lambda: collector.named("inference.GRPCInferenceService/ModelInfer"), timeout=20)  # type: ignore[misc]
    attributes = {a.key: a.value.string_value for a in span.attributes}
    assert attributes["rpc.service"] == "inference.GRPCInferenceService"
    assert server.stop() == 0
