"""`python -m bench.kserve`: the KServe v2 / Triton protocol against cellstream's native one, on
the same server in the same run, one JSON line per scenario.

  unary    one caller, one request at a time: ModelInfer against Step (latency percentiles)
  stream   N sequences over one bidirectional call, `window` requests in flight:
           ModelStreamInfer against StepStream (steps per second)
  client   the unary pair again through the real clients (tritonclient.infer, cellstream Client.step)
  compute  the in-process onnxruntime ceiling at batch 1 and at the stream window

The light client sends pre-serialized request bytes and does not parse replies, so both protocols
pay the same client cost and the ratio is the server's. Rounds alternate the protocols; each
figure is the median of its rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as triton  # type: ignore[import-untyped]
from tritonclient.grpc import service_pb2 as tpb

from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
from cellstream.client import Client

from . import compute, cpu
from .servers import REPO, cellstream_command, launch

MODEL = "gru"
STEP = "/cellstream.v1.CellStream/Step"
STEP_STREAM = "/cellstream.v1.CellStream/StepStream"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
Row = dict[str, Any]
EOF = grpc.aio.EOF  # type: ignore[attr-defined]  # (missing from grpc-stubs)


def native_request(stream: int, x: np.ndarray) -> bytes:
    return pb.StepRequest(stream_id=str(stream), model=MODEL, input=x.tolist()).SerializeToString()


def v2_request(sequence: int, x: np.ndarray) -> bytes:
    """What tritonclient.infer(MODEL, [x], sequence_id=sequence) puts on the wire."""
    request = tpb.ModelInferRequest(model_name=MODEL)
    request.parameters["sequence_id"].int64_param = sequence
    request.parameters["sequence_start"].bool_param = False
    request.parameters["sequence_end"].bool_param = False
    request.inputs.add(name="x", datatype="FP32", shape=[1, len(x)])
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    return bytes(request.SerializeToString())


def requests(build: Callable[[int, np.ndarray], bytes], sequences: int, first: int) -> list[bytes]:
    x = np.random.default_rng(first).standard_normal((sequences, 8)).astype(np.float32)
    return [build(first + i, x[i]) for i in range(sequences)]


def percentiles(latencies: list[float]) -> Row:
    us = np.asarray(latencies) * 1e6
    return {
        "p50_us": round(float(np.percentile(us, 50)), 1),
        "p99_us": round(float(np.percentile(us, 99)), 1),
    }


def unary_round(address: str, pid: int, method: str, bodies: list[bytes], count: int) -> Row:
    """Latency percentiles, and the server's CPU time per request (robust on a busy machine)."""
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(method, None, None)  # bytes in, bytes out: no client-side protobuf
        for body in bodies[:50]:  # warm the channel and the server's caches
            call(body, timeout=10)
        latencies = []
        cpu_before = cpu.process_seconds(pid)
        for k in range(count):
            started = time.perf_counter()
            call(bodies[k % len(bodies)], timeout=10)
            latencies.append(time.perf_counter() - started)
        server_us = (cpu.process_seconds(pid) - cpu_before) / count * 1e6
    return {**percentiles(latencies), "server_cpu_us": round(server_us, 1)}


async def stream_round(
    address: str, pid: int, method: str, bodies: list[bytes], window: int, seconds: float
) -> Row:
    """Steps per second over one call with `window` requests unanswered at most (closed loop),
    and the server's CPU time per step."""
    async with grpc.aio.insecure_channel(address) as channel:
        streaming: Any = channel.stream_stream(method, None, None)
        call = streaming()  # (written to as it goes, not from an iterator)
        room = asyncio.Semaphore(window)
        end = time.monotonic() + seconds
        counted = [0, 0.0, 0.0]  # replies after the warm-up, when the count started, server CPU then

        async def write() -> None:
            k = 0
            while time.monotonic() < end:
                await room.acquire()
                await call.write(bodies[k % len(bodies)])
                k += 1
            await call.done_writing()

        async def read() -> None:
            warm = time.monotonic() + min(1.0, seconds / 4)
            while (reply := await call.read()) is not EOF:
                assert reply
                room.release()
                if time.monotonic() >= warm:
                    if not counted[0]:
                        counted[1], counted[2] = time.monotonic(), cpu.process_seconds(pid)
                    counted[0] += 1

        await asyncio.gather(write(), read())
        steps = counted[0]
        server_us = (cpu.process_seconds(pid) - counted[2]) / steps * 1e6
        return {"steps_per_s": steps / (time.monotonic() - counted[1]), "server_cpu_us": round(server_us, 1)}


def client_round(address: str, count: int) -> Row:
    x = np.random.default_rng(3).standard_normal((count, 8)).astype(np.float32)
    native, v2 = [], []
    with Client(address) as cellstream, triton.InferenceServerClient(address) as tritonclient:
        for k in range(count):
            started = time.perf_counter()
            cellstream.step("client-native", x[k], model=MODEL)
            native.append(time.perf_counter() - started)
            reading = triton.InferInput("x", [1, 8], "FP32")
            reading.set_data_from_numpy(x[k : k + 1])
            started = time.perf_counter()
            tritonclient.infer(MODEL, [reading], sequence_id="client-v2")
            v2.append(time.perf_counter() - started)
    return {"native": percentiles(native), "v2": percentiles(v2)}


def batch_totals(metrics_address: str) -> tuple[float, float]:
    """(readings, model runs) so far, from the server's cellstream_batch_size histogram."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5) as response:
        text = response.read().decode()
    readings = runs = 0.0
    for line in text.splitlines():
        if line.startswith("cellstream_batch_size_sum{"):
            readings += float(line.rsplit(" ", 1)[1])
        elif line.startswith("cellstream_batch_size_count{"):
            runs += float(line.rsplit(" ", 1)[1])
    return readings, runs


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else 0.0


def median_of(rows: list[Row]) -> Row:
    return {key: round(statistics.median(r[key] for r in rows), 1) for key in rows[0]}


def measure(address: str, pid: int, metrics_address: str, args: argparse.Namespace) -> Iterator[Row]:
    native_bodies = requests(native_request, args.sequences, 1_000_000)
    v2_bodies = requests(v2_request, args.sequences, 2_000_000)
    unary: dict[str, list[Row]] = {"native": [], "v2": []}
    stream: dict[str, list[Row]] = {"native": [], "v2": []}
    for _ in range(args.rounds):
        unary["native"].append(unary_round(address, pid, STEP, native_bodies, args.unary_requests))
        unary["v2"].append(unary_round(address, pid, MODEL_INFER, v2_bodies, args.unary_requests))
        for name, method, bodies in (
            ("native", STEP_STREAM, native_bodies),
            ("v2", MODEL_STREAM_INFER, v2_bodies),
        ):
            before = batch_totals(metrics_address)
            row = asyncio.run(stream_round(address, pid, method, bodies, args.window, args.seconds))
            after = batch_totals(metrics_address)
            row["readings_per_run"] = (after[0] - before[0]) / max(1.0, after[1] - before[1])
            stream[name].append(row)
    medians = {name: median_of(rows) for name, rows in unary.items()}
    yield {
        "scenario": "unary",
        "requests_per_round": args.unary_requests,
        "rounds": args.rounds,
        "native_step": medians["native"],
        "v2_model_infer": medians["v2"],
        "v2_over_native_p50": ratio(medians["v2"]["p50_us"], medians["native"]["p50_us"]),
        "v2_over_native_server_cpu": ratio(
            medians["v2"]["server_cpu_us"], medians["native"]["server_cpu_us"]
        ),
    }
    native, v2 = (median_of(stream[name]) for name in ("native", "v2"))
    yield {
        "scenario": "stream",
        "sequences": args.sequences,
        "window": args.window,
        "seconds_per_round": args.seconds,
        "rounds": args.rounds,
        "native_step_stream": native,
        "v2_model_stream_infer": v2,
        "v2_over_native": ratio(v2["steps_per_s"], native["steps_per_s"]),
        "target": 0.85,
        "v2_over_native_server_cpu": ratio(v2["server_cpu_us"], native["server_cpu_us"]),
    }
    yield {
        "scenario": "client",
        "requests": args.client_requests,
        **client_round(address, args.client_requests),
    }
    model = compute.load(REPO / "models", MODEL)
    yield {"scenario": "compute", "ceiling_steps_per_s": compute.ceiling(model, [1, args.window], 1.0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sequences", type=int, default=1000, help="sequences (streams) per protocol")
    parser.add_argument("--window", type=int, default=256, help="requests in flight per streaming call")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per streaming round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per protocol, alternating")
    parser.add_argument(
        "--unary-requests", type=int, default=2000, help="sequential requests per unary round"
    )
    parser.add_argument("--client-requests", type=int, default=500, help="requests per real-client scenario")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        server = launch("cellstream", cellstream_command(REPO / "models", MODEL), Path(tmp))
        try:
            ready = json.loads((Path(tmp) / "cellstream.ready.json").read_text())
            for row in measure(server.address, server.pid, ready["metrics_address"], args):
                print(json.dumps(row), flush=True)
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
