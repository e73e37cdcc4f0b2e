"""Start and stop the servers under test (cellstream, echo, naive baseline) as processes.

Each writes the same ready file as `cellstream serve --ready-file`: {address, metrics_address,
pid} once SERVING. The time from `Popen` to the ready file is the start-up time.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from cellstream.client import MAX_MESSAGE

REPO = Path(__file__).resolve().parent.parent


def write_ready(path: str | Path, address: str) -> None:
    """Atomically write the ready file (the bench's own servers use cellstream's format)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"address": address, "metrics_address": "", "pid": os.getpid()}))
    tmp.replace(path)


@dataclass
class Running:
    """One server process under test."""

    name: str
    process: subprocess.Popen[bytes]
    address: str
    startup_s: float
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait(timeout)
        return self.process.returncode


def health_serving(
    address: str, timeout: float = 5.0, credentials: grpc.ChannelCredentials | None = None
) -> bool:
    """Health SERVING, asked over TLS when `credentials` are given (health needs no token)."""
    channel = (
        grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
    )
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def launch(
    name: str,
    command: list[str],
    workdir: Path,
    timeout: float = 60.0,
    credentials: grpc.ChannelCredentials | None = None,
) -> Running:
    """Start a server process, wait for its ready file, confirm health SERVING (over TLS with
    `credentials`, for a server started with --tls-cert)."""
    workdir.mkdir(parents=True, exist_ok=True)
    ready = workdir / f"{name}.ready.json"
    ready.unlink(missing_ok=True)
    log_path = workdir / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLSTREAM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with log_path.open("wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(
            [*command, "--ready-file", str(ready)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO
        )
    deadline = started + timeout
    while not ready.exists():
        if process.poll() is not None:
            raise RuntimeError(
                f"{name} exited with {process.returncode}:\n{log_path.read_text(errors='replace')}"
            )
        if time.perf_counter() > deadline:
            process.kill()
            raise RuntimeError(f"{name} did not become ready within {timeout} s")
        time.sleep(0.002)
    startup = time.perf_counter() - started
    info = json.loads(ready.read_text())
    running = Running(name, process, info["address"], startup, log_path)
    if not health_serving(running.address, credentials=credentials):
        running.stop()
        raise RuntimeError(f"{name} wrote its ready file but health is not SERVING")
    return running


def cellstream_command(models: Path, model: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cellstream",
        "serve",
        "--address",
        "127.0.0.1:0",
        "--metrics-address",
        "127.0.0.1:0",
        "--log-level",
        "WARNING",
        "--models",
        str(models),
        "--default-model",
        model,
        *extra,
    ]


def echo_command(
    model: str, input_size: int, output_size: int, states: dict[str, tuple[int, ...]]
) -> list[str]:
    specs = [f"--state={name}={'x'.join(map(str, shape))}" for name, shape in states.items()]
    return [
        sys.executable,
        "-m",
        "bench.echo",
        "--model",
        model,
        "--input-size",
        str(input_size),
        "--output-size",
        str(output_size),
        *specs,
    ]


def baseline_command(models: Path, model: str) -> list[str]:
    return [sys.executable, "-m", "bench.baseline", "--models", str(models), "--model", model]


async def serve_until_signal(
    add_servicer: Callable[[grpc.aio.Server], None], address: str, ready_file: str
) -> None:
    """Run a bench gRPC server (echo or naive) with health SERVING until SIGTERM/SIGINT."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ]
    )
    add_servicer(server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(address)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    write_ready(ready_file, f"127.0.0.1:{port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)
