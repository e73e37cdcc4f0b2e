"""Snapshot time and size for 1,000,000 streams of the default GRU (issue: durable state).

Starts a real server with --state-dir, creates the streams with StepBatch, asks for a snapshot
by stopping the server (the final snapshot after draining), restarts it and times the restore.
Prints one JSON line. Run: python -m bench.snapshot_1m [--streams N]
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.servers import REPO, cellstream_command, launch
from cellstream.client import Client


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        state_dir = root / "state"
        command = cellstream_command(
            REPO / "models",
            "gru",
            "--state-dir",
            str(state_dir),
            "--snapshot-interval",
            "0",
            "--max-batch-request",
            "100000",
            "--log-level",
            "INFO",
        )
        server = launch("cellstream", command, root / "first")
        address = server.address
        chunk = 50_000
        x = np.random.default_rng(0).normal(size=(chunk, 8)).astype(np.float32)
        with Client(address, timeout=600) as client:
            for start_id in range(0, args.streams, chunk):
                ids = [f"sensor-{i:07d}" for i in range(start_id, min(start_id + chunk, args.streams))]
                client.step_batch(ids, x[: len(ids)], omit_state=True)
        started = time.perf_counter()
        server.stop(timeout=600)
        stop_s = time.perf_counter() - started
        match = re.search(
            r"snapshot of (\d+) streams: \S+, (\d+) bytes in (\d+) ms \(traffic paused at most ([\d.]+) ms\)",
            server.log(),
        )
        assert match, server.log()
        streams, size, snapshot_ms = (int(g) for g in match.groups()[:3])
        pause_ms = float(match.group(4))
        restarted = launch("cellstream", command, root / "second", timeout=600)
        restore_s = restarted.startup_s
        with Client(restarted.address) as client:
            assert client.get_state(f"sensor-{args.streams - 1:07d}").step == 1
        restarted.stop(timeout=600)
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
