"""Operability: metrics, health, reflection, settings from the environment, graceful shutdown."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from cellstream.client import Client, step_request
from support import MODELS, RunningServer, start_server, wait_for
from test_model_contract import write_cell


def scrape(server: RunningServer) -> str:
    with urllib.request.urlopen(f"http://{server.metrics_address}/metrics", timeout=5) as response:
        return response.read().decode()


def sample(text: str, prefix: str, default: float | None = None) -> float:
    """The value of the first sample line starting with prefix (name plus labels)."""
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    if default is not None:
        return default
    raise AssertionError(f"no sample {prefix!r} in the metrics")


def test_metrics_count_steps_and_latency_after_traffic(server: RunningServer, client: Client) -> None:
    before = scrape(server)
    steps_before = sample(before, 'cellstream_steps_total{model="gru2"}', default=0.0)
    for _i in range(5):
        client.step("metrics-a", np.zeros(8), model="gru2")
    list(client.step_stream([step_request("metrics-b", np.zeros(8), model="gru2")] * 3))
    client.step_batch(["metrics-c", "metrics-d"], np.zeros((2, 8)), model="gru2")
    with contextlib.suppress(grpc.RpcError):
        client.step("metrics-a", np.zeros(3), model="gru2")
    text = scrape(server)
    assert sample(text, 'cellstream_steps_total{model="gru2"}') == steps_before + 10
    assert (
        sample(text, 'cellstream_request_duration_seconds_count{code="OK",method="Step",model="gru2"}') >= 5
    )
    assert (
        sample(text, 'cellstream_request_duration_seconds_count{code="OK",method="StepStream",model="gru2"}')
        >= 3
    )
    assert (
        sample(text, 'cellstream_request_duration_seconds_count{code="OK",method="StepBatch",model="gru2"}')
        >= 1
    )
    assert (
        sample(
            text,
            'cellstream_request_duration_seconds_count{code="INVALID_ARGUMENT",method="Step",model="gru2"}',
        )
        >= 1
    )
    assert (
        'cellstream_request_duration_seconds_bucket{code="OK",le="0.0001",method="Step",model="gru2"}' in text
    )
    assert sample(text, 'cellstream_compute_duration_seconds_count{model="gru2"}') >= 1
    assert sample(text, 'cellstream_queue_duration_seconds_count{model="gru2"}') >= 1
    assert sample(text, 'cellstream_batch_size_count{model="gru2"}') >= 1
    assert sample(text, 'cellstream_streams{model="gru2",version="1"}') >= 4
    assert "metrics-a" not in text  # stream ids never become labels


def test_unknown_model_names_do_not_become_metric_labels(server: RunningServer, client: Client) -> None:
    try:
        client.step("label-check", np.zeros(8), model="attacker-chosen-name")
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND
    assert "attacker-chosen-name" not in scrape(server)


def test_health_is_serving_for_server_and_service(server: RunningServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "cellstream.v1.CellStream"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_health_command_exit_codes(server: RunningServer) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "cellstream", "health", "--address", server.address], check=False
    )
    assert ok.returncode == 0
    down = subprocess.run(
        [sys.executable, "-m", "cellstream", "health", "--address", "127.0.0.1:1", "--timeout", "0.5"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr


def test_reflection_lists_the_service(server: RunningServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"cellstream.v1.CellStream", "grpc.health.v1.Health"} <= services
        methods = {
            m.name for m in database.FindFileContainingSymbol("cellstream.v1.CellStream").service[0].method
        }
        assert methods == {
            "Step",
            "StepStream",
            "StepBatch",
            "GetState",
            "SetState",
            "DeleteStream",
            "ListModels",
            "ExportStates",
            "ImportStates",
            "GetClusterMap",
            "SetClusterMap",
            "BeginHandoff",
        }


def test_settings_come_from_environment(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_cell(repo / "tiny", config={"initial_state": {"h": 0.25}})
    running = start_server(
        tmp_path / "run", env={"CELLSTREAM_MODELS": str(repo), "CELLSTREAM_MAX_BATCH": "3"}, models=None
    )
    try:
        with running.client() as client:
            (model,) = client.list_models()
            assert (model.name, model.max_batch, model.is_default) == ("tiny", 3, True)
            reply = client.step("env", np.zeros(4))
            # The config's initial state is the starting point: h' = tanh(0 W + 0.25 U).
            assert reply.step == 1
            np.testing.assert_array_equal(client.step("env-reset", np.zeros(4)).state["h"], reply.state["h"])
            assert np.abs(reply.state["h"]).sum() > 0
    finally:
        assert running.stop() == 0


def test_flags_override_environment(tmp_path: Path) -> None:
    running = start_server(tmp_path, "--max-batch", "5", env={"CELLSTREAM_MAX_BATCH": "3"})
    try:
        with running.client() as client:
            assert {m.max_batch for m in client.list_models()} == {5}
    finally:
        assert running.stop() == 0


def test_unservable_model_stops_start_with_the_reason(tmp_path: Path) -> None:
    write_cell(tmp_path / "repo" / "broken", batch=1)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cellstream",
            "serve",
            "--models",
            str(tmp_path / "repo"),
            "--address",
            "127.0.0.1:0",
            "--metrics-address",
            "",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "fixed batch axis" in result.stderr


def test_sigterm_under_load_finishes_in_flight_work_and_exits_zero(tmp_path: Path) -> None:
    running = start_server(tmp_path)
    outcomes: list[str] = []
    started = threading.Event()

    def load() -> None:
        with running.client(timeout=20) as client:
            try:
                for reply in client.step_stream(
                    step_request(f"drain-{i % 100}", np.zeros(8), request_id=i) for i in range(100_000)
                ):
                    started.set()
                    outcomes.append("OK" if reply.error is None else reply.error[0].name)
            except grpc.RpcError as exc:
                outcomes.append(f"call:{exc.code().name}")

    thread = threading.Thread(target=load)
    thread.start()
    assert started.wait(20)
    code = running.stop(signal.SIGTERM)
    thread.join(30)
    assert code == 0, running.log()
    assert "draining" in running.log() and "stopped" in running.log()
    assert outcomes[0] == "OK"
    assert set(outcomes) <= {"OK", "UNAVAILABLE", "call:UNAVAILABLE", "call:CANCELLED"}, set(outcomes)


def test_ready_file_names_the_process(server: RunningServer) -> None:
    wait_for(lambda: server.process.poll() is None)
    assert server.address.startswith("127.0.0.1:") and not server.address.endswith(":0")


def test_bundled_models_are_the_default_repository(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cellstream", "models", "list"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert "demo (default)" in result.stdout and str(MODELS / "gru" / "model.onnx") in result.stdout


def test_draining_turns_health_not_serving_refuses_new_work_and_finishes_queued() -> None:
    """In-process server: a held batcher keeps one reading queued while the drain is watched."""
    import asyncio  # noqa: PLC0415

    from cellstream.client import AsyncClient  # noqa: PLC0415
    from cellstream.config import Settings  # noqa: PLC0415
    from cellstream.server import Server  # noqa: PLC0415

    async def main() -> None:
        settings = Settings(address="127.0.0.1:0", metrics_address="", models=MODELS, default_model="gru")
        server = Server(settings)
        await server.start()
        assert server.engine is not None
        gru = server.engine.deployment.current["gru"]
        gru.hold = asyncio.get_running_loop().create_future()
        async with AsyncClient(server.address) as client:
            queued = asyncio.ensure_future(client.step("queued", np.zeros(8)))
            await asyncio.sleep(0)  # no timing: the hold keeps it queued however long this takes
            while not gru.queued:
                await asyncio.sleep(0.01)
            stopping = asyncio.ensure_future(server.stop())
            channel = grpc.aio.insecure_channel(server.address)
            health = health_pb2_grpc.HealthStub(channel)
            while (
                await health.Check(health_pb2.HealthCheckRequest())
            ).status == health_pb2.HealthCheckResponse.SERVING:
                await asyncio.sleep(0.01)
            with pytest.raises(grpc.RpcError) as info:
                await client.step("late", np.zeros(8))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            gru.hold.set_result(None)
            assert (await queued).step == 1  # queued work finished during the drain
            await stopping
            await channel.close()

    asyncio.run(main())
