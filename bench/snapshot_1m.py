"""Snapshot time and size for 1,000,000 streams of the default GRU (issue: durable state).

Starts a real server with --state-dir, creates the streams with StepBatch, asks for a snapshot
by stopping the server (the final snapshot after draining), restarts it and times the restore.
Prints one JSON line. Run: python -m bench.snapshot_1m [--streams N]
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cellstream.client import Client

REPO = Path(__file__).resolve().parent.parent


def start(state_dir: Path, ready: Path, log: Path) -> subprocess.Popen[bytes]:
    ready.unlink(missing_ok=True)
    with log.open("ab") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cellstream",
                "serve",
                "--address",
                "127.0.0.1:0",
                "--metrics-address",
                "",
                "--ready-file",
                str(ready),
                "--models",
                str(REPO / "models"),
                "--default-model",
                "gru",
                "--state-dir",
                str(state_dir),
                "--snapshot-interval",
                "0",
                "--max-batch-request",
                "100000",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 300
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return process


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        state_dir, ready, log = root / "state", root / "ready.json", root / "server.log"
        process = start(state_dir, ready, log)
        address = json.loads(ready.read_text())["address"]
        chunk = 50_000
        x = np.random.default_rng(0).normal(size=(chunk, 8)).astype(np.float32)
        with Client(address, timeout=600) as client:
            for start_id in range(0, args.streams, chunk):
                ids = [f"sensor-{i:07d}" for i in range(start_id, min(start_id + chunk, args.streams))]
                client.step_batch(ids, x[: len(ids)], omit_state=True)
        started = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        process.wait(600)
        stop_s = time.perf_counter() - started
        match = re.search(
            r"snapshot of (\d+) streams: \S+, (\d+) bytes in (\d+) ms \(traffic paused at most ([\d.]+) ms\)",
            log.read_text(),
        )
        assert match, log.read_text()
        streams, size, snapshot_ms = (int(g) for g in match.groups()[:3])
        pause_ms = float(match.group(4))
        started = time.perf_counter()
        process = start(state_dir, ready, log)
        restore_s = time.perf_counter() - started
        with Client(json.loads(ready.read_text())["address"]) as client:
            assert client.get_state(f"sensor-{args.streams - 1:07d}").step == 1
        process.send_signal(signal.SIGTERM)
        process.wait(600)
    print(
        json.dumps(
            {
                "scenario": "snapshot",
                "streams": streams,
                "bytes": size,
                "bytes_per_stream": round(size / streams, 1),
                "snapshot_ms": snapshot_ms,
                "longest_pause_ms": pause_ms,
                "stop_with_final_snapshot_s": round(stop_s, 2),
                "start_with_restore_s": round(restore_s, 2),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
