"""Test support: start a real cellstream server process on 127.0.0.1, port 0, stop it by its pid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cellstream.client import Client

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"


def wait_for(condition: Callable[[], object], timeout: float = 20.0, interval: float = 0.02) -> object:
    """Poll until condition() is truthy; fail the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    address: str
    metrics_address: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def client(self, **options: object) -> Client:
        return Client(self.address, **options)  # type: ignore[arg-type]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            os.kill(self.pid, sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait(timeout)
        return self.process.returncode


# Every server process a test starts; conftest stops any the test left running, by pid.
STARTED: list[RunningServer] = []


def start_server(
    tmp: Path,
    *args: str,
    env: dict[str, str] | None = None,
    models: Path | None = MODELS,
    address: str = "127.0.0.1:0",
) -> RunningServer:
    """Start `python -m cellstream serve` on 127.0.0.1 port 0 and wait for its ready file."""
    tmp.mkdir(parents=True, exist_ok=True)
    ready = tmp / "ready.json"
    ready.unlink(missing_ok=True)
    log_path = tmp / "server.log"
    command = [
        sys.executable,
        "-m",
        "cellstream",
        "serve",
        "--address",
        address,
        "--metrics-address",
        "127.0.0.1:0",
        "--ready-file",
        str(ready),
        *(["--models", str(models)] if models else []),
        # The bundled default is the CO2 demo (1 value per reading); the suite's workload is the GRU.
        *(["--default-model", "gru"] if models == MODELS and "--default-model" not in args else []),
        *args,
    ]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CELLSTREAM_")}
    full_env.update(env or {})
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    server = RunningServer(process, "", "", log_path)
    STARTED.append(server)

    def is_ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{server.log()}")
        return ready.exists()

    try:
        wait_for(is_ready, timeout=30)
    except BaseException:
        server.stop(signal.SIGKILL)
        raise
    info = json.loads(ready.read_text())
    assert info["pid"] == process.pid
    server.address, server.metrics_address = info["address"], info["metrics_address"]
    return server
