"""`python -m bench`: every scenario against cellstream, its ceilings and its baselines, in one run.

Servers under test, all started here on 127.0.0.1 and alive for the whole run:
  cellstream       the real server (defaults)
  cellstream-mb1   the real server with --max-batch 1 (batching off)
  echo             no-op gRPC server, same RPCs and reply sizes (transport ceiling)
  naive            dict of numpy states, one session.run per request (baseline)
plus the in-process onnxruntime run (compute ceiling). Repeats interleave the servers so every
ratio compares numbers taken minutes apart at most; the reported figure is the median.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from . import compute, cpu, report
from .load import Job, LoadPool
from .profile import Profiler
from .report import CELLSTREAM, ECHO, MB1, NAIVE, TARGETS, Row
from .servers import REPO, Running, baseline_command, cellstream_command, echo_command, launch

MAIN_SCENARIOS = ("unary", "stream", "batch", "fanin", "coalesce")
ALL_SCENARIOS = (*MAIN_SCENARIOS, "memory", "startup", "sweep")
COMPUTE_BATCHES = [1, 64, 1000, 2048, 10_000]
BATCH_SIZE = 10_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="gru", help="model under test (a directory of --models)")
    parser.add_argument("--models", type=Path, default=REPO / "models", help="model repository")
    parser.add_argument(
        "--scenarios",
        default=",".join(ALL_SCENARIOS),
        help=f"comma-separated subset of {','.join(ALL_SCENARIOS)}",
    )
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per scenario and server (median)")
    parser.add_argument("--clients", type=int, default=2, help="load generator processes")
    parser.add_argument("--window", type=int, default=128, help="stream: readings in flight per StepStream")
    parser.add_argument(
        "--fanin-rate", type=float, default=0.0, help="fanin offered rate (0: half echo stream)"
    )
    parser.add_argument(
        "--omit-state", action="store_true", help="ask for replies without state (default: with, as the SDK)"
    )
    parser.add_argument("--memory-streams", type=int, default=1_000_000)
    parser.add_argument("--sweep-duration", type=float, default=2.0)
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "latest.json")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="py-spy the cellstream server during the first repeat; write profiles here",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="about a minute: 1 repeat, short runs, 200k idle streams, 3 sweep points",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.repeats = min(args.duration, 1.5), min(args.warmup, 0.5), 1
        args.memory_streams = min(args.memory_streams, 200_000)
        args.sweep_duration = min(args.sweep_duration, 1.0)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenarios) - set(ALL_SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {ALL_SCENARIOS}")
    return args


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> Row:
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    import grpc  # noqa: PLC0415
    import onnxruntime  # noqa: PLC0415

    return {
        "cpu": cpu_model,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.model = compute.load(args.models, args.model)
        self.servers: dict[str, Running] = {}
        self.runs: list[Row] = []
        self.lines: list[Row] = []
        self.checks: list[Row] = []
        self.context: Row = {}
        self.pool: LoadPool | None = None
        self.profiler = Profiler(args.profile) if args.profile else None

    def start_servers(self) -> None:
        m, a = self.model, self.args
        states = {s.name: s.shape for s in m.states}
        commands = {
            CELLSTREAM: cellstream_command(a.models, a.model),
            MB1: cellstream_command(a.models, a.model, "--max-batch", "1"),
            ECHO: echo_command(a.model, m.input_size, m.output_size, states),
            NAIVE: baseline_command(a.models, a.model),
        }
        for name, command in commands.items():
            self.servers[name] = launch(name, command, self.workdir)
            log(f"{name} serving on {self.servers[name].address} in {self.servers[name].startup_s:.2f} s")

    def stop_servers(self) -> None:
        for server in self.servers.values():
            code = server.stop()
            if code not in (0, -15):
                log(f"{server.name} exited with {code}; log:\n{server.log()[-2000:]}")

    def measure(self, target: str, job: Job, duration: float, warmup: float, profile_as: str = "") -> Row:
        """Run one job spread over the load processes; record steps/s, latency and CPU use."""
        assert self.pool is not None
        server = self.servers[target]
        start_at = time.monotonic() + 0.4
        job = replace(
            job,
            address=server.address,
            start_at=start_at,
            warmup=warmup,
            duration=duration,
            shards=self.pool.size,
        )
        self.pool.submit([replace(job, shard=i) for i in range(self.pool.size)])
        groups = {
            "server": [server.pid],
            "clients": self.pool.pids,
            "bench": [os.getpid(), *(s.pid for n, s in self.servers.items() if n != target)],
        }
        time.sleep(max(0.0, start_at + warmup - time.monotonic()))
        wanted = self.profiler is not None and target == CELLSTREAM and profile_as
        profile = self.profiler.start(server.pid, duration) if self.profiler and wanted else None
        before = cpu.snapshot(groups)
        time.sleep(max(0.0, start_at + warmup + duration - time.monotonic()))
        after = cpu.snapshot(groups)
        outcomes = self.pool.collect(self.pool.size, timeout=duration + warmup + 60)
        row = report.summarize(outcomes, duration)
        row["cpu"] = cpu.usage(before, after)
        if profile is not None and self.profiler is not None:
            row["profile"] = self.profiler.finish(profile, profile_as)
        return row

    def jobs(self) -> dict[str, Job]:
        base = Job(
            scenario="",
            address="",
            model=self.args.model,
            input_size=self.model.input_size,
            start_at=0.0,
            warmup=0.0,
            duration=0.0,
            omit_state=self.args.omit_state,
        )
        rate = self.context.get("fanin_rate") or 1.0
        return {
            "unary": replace(base, scenario="unary", streams=64, prefix="u"),
            "stream": replace(
                base, scenario="stream", streams=1000, concurrency=8, window=self.args.window, prefix="s"
            ),
            "batch-1": replace(base, scenario="batch", concurrency=1, batch_size=BATCH_SIZE, prefix="b1-"),
            "batch-2": replace(base, scenario="batch", concurrency=2, batch_size=BATCH_SIZE, prefix="b2-"),
            "fanin": replace(base, scenario="fanin", streams=10_000, concurrency=8, rate=rate, prefix="f"),
            "coalesce": replace(base, scenario="coalesce", streams=1000, prefix="c"),
        }

    def params(self, name: str) -> Row:
        job = self.jobs()[name]
        keep = {
            "unary": ("streams",),
            "stream": ("streams", "concurrency", "window"),
            "batch": ("concurrency", "batch_size"),
            "fanin": ("streams", "concurrency", "rate"),
            "coalesce": ("streams",),
        }[job.scenario]
        return {k: getattr(job, k) for k in keep} | {"model": job.model, "clients": self.args.clients}

    def run_main(self) -> None:
        a = self.args
        names = [
            n
            for n in ("unary", "stream", "batch-1", "batch-2", "fanin", "coalesce")
            if n.split("-")[0] in a.scenarios
        ]
        if a.fanin_rate:
            self.context["fanin_rate"] = a.fanin_rate
        for repeat in range(a.repeats):
            if "batch" in a.scenarios:
                ceiling = compute.ceiling(self.model, COMPUTE_BATCHES, min(1.0, a.duration / 3))
                self.runs.append(
                    {"scenario": "compute", "target": "onnxruntime", "repeat": repeat, **ceiling}
                )
                log(f"compute ceiling (steps/s by batch size): {ceiling}")
            for name in names:
                if name == "fanin" and "fanin_rate" not in self.context:
                    self.calibrate_fanin()
                order = TARGETS[repeat % len(TARGETS) :] + TARGETS[: repeat % len(TARGETS)]
                for target in order:
                    row = self.measure(
                        target, self.jobs()[name], a.duration, a.warmup, name if repeat == 0 else ""
                    )
                    row.update(scenario=name, target=target, repeat=repeat)
                    self.runs.append(row)
                    log(
                        f"{name:9} {target:15} {row['steps_per_s']:>11,.0f} steps/s  p99 {row['p99_ms']} ms  "
                        f"errors {row['errors']}  cpu {row['cpu']}"
                    )
                    if name == "stream" and target == ECHO and "fanin_rate" not in self.context:
                        self.context["fanin_rate"] = round(row["steps_per_s"] / 2, 1)
        self.summarize_main(names)

    def calibrate_fanin(self) -> None:
        row = self.measure(ECHO, self.jobs()["stream"], self.args.duration, self.args.warmup)
        self.context["fanin_rate"] = round(row["steps_per_s"] / 2, 1)
        log(f"fanin rate set to half the echo's stream capacity: {self.context['fanin_rate']} readings/s")

    def summarize_main(self, names: list[str]) -> None:
        compute_runs = [r for r in self.runs if r["scenario"] == "compute"]
        if compute_runs:
            ceiling = {b: report.median([r[str(b)] for r in compute_runs]) for b in COMPUTE_BATCHES}
            self.context["compute_10000"] = ceiling.get(BATCH_SIZE)
            self.emit(
                {
                    "scenario": "compute",
                    "steps_per_s_by_batch": {str(b): v for b, v in ceiling.items()},
                    "repeats": len(compute_runs),
                }
            )
        results_by_name: dict[str, dict[str, Row]] = {}
        for name in names:
            results_by_name[name] = {
                t: report.medians([r for r in self.runs if r["scenario"] == name and r["target"] == t])
                for t in TARGETS
            }
        if "stream" in results_by_name:
            self.context["echo_stream_steps"] = results_by_name["stream"][ECHO]["steps_per_s"]
        for name in names:
            results = results_by_name[name]
            checks = [c.as_row() for c in report.checks_for(name, results, self.context)]
            line: Row = {
                "scenario": name,
                "params": self.params(name),
                "results": results,
                "ratios": self.ratios(name, results),
                "checks": checks,
            }
            self.checks += checks
            self.emit(line)

    def ratios(self, name: str, results: dict[str, Row]) -> Row:
        cs = results[CELLSTREAM]
        out: Row = {}
        for other in (ECHO, NAIVE, MB1):
            o = results[other]
            if o.get("steps_per_s"):
                out[f"steps_vs_{other}"] = round(cs["steps_per_s"] / o["steps_per_s"], 3)
            if o.get("p99_ms") and cs.get("p99_ms"):
                out[f"p99_vs_{other}"] = round(cs["p99_ms"] / o["p99_ms"], 3)
        if name.startswith("batch") and self.context.get("compute_10000"):
            out["steps_vs_onnxruntime_10000"] = round(cs["steps_per_s"] / self.context["compute_10000"], 3)
        return out

    def run_sweep(self) -> None:
        a = self.args
        levels = {"unary": [1, 4, 16, 64, 256], "stream": [8, 32, 128, 512, 2048]}
        if a.quick:
            levels = {"unary": [1, 16, 64], "stream": [8, 128, 1024]}
        jobs = self.jobs()
        line: Row = {"scenario": "sweep", "duration_s": a.sweep_duration, "unary": {}, "stream": {}}
        for mode, points in levels.items():
            for target in (CELLSTREAM, ECHO, NAIVE):
                series = []
                for level in points:
                    job = (
                        replace(jobs["unary"], streams=level, prefix=f"w{level}-")
                        if mode == "unary"
                        else replace(jobs["stream"], window=max(1, level // 8), prefix=f"ws{level}-")
                    )
                    row = self.measure(target, job, a.sweep_duration, min(a.warmup, 0.5))
                    series.append(
                        {
                            "concurrency": level,
                            "steps_per_s": row["steps_per_s"],
                            "p50_ms": row["p50_ms"],
                            "p99_ms": row["p99_ms"],
                            "errors": row["errors"],
                            "other_cores": row["cpu"]["other"],
                        }
                    )
                    steps, p99 = row["steps_per_s"], row["p99_ms"]
                    log(f"sweep {mode} {target} {level}: {steps:,.0f} steps/s p99 {p99} ms")
                line[mode][target] = series
        self.emit(line)

    def run_startup(self) -> None:
        times = [s.startup_s for n, s in self.servers.items() if n in (CELLSTREAM, MB1)]
        for i in range(self.args.repeats):
            server = launch(
                f"startup-{i}", cellstream_command(self.args.models, self.args.model), self.workdir
            )
            times.append(server.startup_s)
            server.stop()
        row: Row = {
            "scenario": "startup",
            "runs_s": [round(t, 3) for t in times],
            "median_s": round(float(np.median(times)), 3),
            "others_s": {
                n: round(s.startup_s, 3) for n, s in self.servers.items() if n not in (CELLSTREAM, MB1)
            },
        }
        check = report.startup_check(row)
        row["checks"] = [check.as_row()]
        self.checks += row["checks"]
        self.emit(row)

    def run_memory(self) -> None:
        n = self.args.memory_streams
        state_bytes = sum(4 * math.prod(s.shape) for s in self.model.states)
        row: Row = {"scenario": "memory", "streams": n, "state_bytes": state_bytes}
        for target, command in (
            (CELLSTREAM, cellstream_command(self.args.models, self.args.model)),
            (NAIVE, baseline_command(self.args.models, self.args.model)),
        ):
            server = launch(f"memory-{target}", command, self.workdir)
            try:
                row[target] = memory_growth(
                    server.address, server.pid, self.args.model, self.model.input_size, n
                )
            finally:
                server.stop()
            log(f"memory {target}: {row[target]}")
        row["bytes_per_stream"] = row[CELLSTREAM]["bytes_per_stream"]
        check = report.memory_check(row, state_bytes)
        row["checks"] = [check.as_row()]
        self.checks += row["checks"]
        self.emit(row)

    def emit(self, line: Row) -> None:
        self.lines.append(line)
        print(json.dumps(line, default=_jsonable), flush=True)


def memory_growth(address: str, pid: int, model: str, input_size: int, n: int) -> Row:
    """RSS growth of a server for n new idle streams, created by StepBatch of 10,000."""
    from cellstream.client import Client  # noqa: PLC0415

    process = psutil.Process(pid)
    x = np.zeros((BATCH_SIZE, input_size), np.float32)
    with Client(address, timeout=120) as client:
        client.step_batch([f"warm-{j}" for j in range(BATCH_SIZE)], x, model=model, omit_state=True)
        time.sleep(0.2)
        before = process.memory_info().rss
        started = time.perf_counter()
        for start in range(0, n, BATCH_SIZE):
            ids = [f"idle-{j}" for j in range(start, min(n, start + BATCH_SIZE))]
            client.step_batch(ids, x[: len(ids)], model=model, omit_state=True)
        seconds = time.perf_counter() - started
        time.sleep(0.2)
        after = process.memory_info().rss
    return {
        "rss_before_mib": round(before / 2**20, 1),
        "rss_after_mib": round(after / 2**20, 1),
        "bytes_per_stream": round((after - before) / n, 1),
        "create_s": round(seconds, 2),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON: {type(value)}")


@contextmanager
def workspace() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="cellstream-bench-") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    info = machine()
    idle = cpu.idle_load(1.0)
    log(f"machine: {info['cpu']}, {info['cores']} cores; before the run: {idle}")
    with workspace() as workdir:
        bench = Bench(args, workdir)
        mains = [s for s in args.scenarios if s in MAIN_SCENARIOS or s == "sweep"]
        if mains:
            bench.start_servers()
            bench.pool = LoadPool(args.clients)
        try:
            if [s for s in args.scenarios if s in MAIN_SCENARIOS]:
                bench.run_main()
            if "sweep" in args.scenarios:
                bench.run_sweep()
        finally:
            if bench.pool is not None:
                bench.pool.close()
            bench.stop_servers()
        if "startup" in args.scenarios:
            bench.run_startup()
        if "memory" in args.scenarios:
            bench.run_memory()
    elapsed = time.perf_counter() - started
    others = [r["cpu"]["other"] for r in bench.runs if "cpu" in r]
    busy = {
        "other_cores_median": report.median(others),
        "other_cores_max": max(others, default=None),
        "cores": os.cpu_count(),
        "note": "cores used by processes outside the bench during the measurement windows",
    }
    document = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        "git": _git_revision(),
        "machine": info,
        "load_before": idle,
        "load_after": cpu.idle_load(1.0),
        "busy_during_runs": busy,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "scenarios": bench.lines,
        "checks": bench.checks,
        "runs": bench.runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=1, default=_jsonable))
    if "sweep" in args.scenarios:
        from .plot import plot  # noqa: PLC0415 - matplotlib is only needed for the picture

        plot(document, args.output.with_suffix(".png"))
    print()
    print(summary(document))
    log(f"done in {elapsed:.0f} s; JSON in {args.output}")
    return 0


def summary(document: Row) -> str:
    lines = [line for line in document["scenarios"] if "results" in line]
    busy = document["busy_during_runs"]
    parts = [
        f"machine: {document['machine']['cpu']}, {document['machine']['cores']} cores; "
        f"other load before/after: {document['load_before']['other']}/{document['load_after']['other']} "
        f"cores (load average {document['load_before']['loadavg_1m']:.2f}); during the runs: median "
        f"{busy['other_cores_median']}, max {busy['other_cores_max']} "
        "cores used by processes outside the bench"
    ]
    if lines:
        parts += ["", report.results_table(lines)]
    compute_line = next((line for line in document["scenarios"] if line["scenario"] == "compute"), None)
    if compute_line:
        parts += [
            "",
            "in-process onnxruntime steps/s by batch: "
            + ", ".join(f"{b}: {v:,.0f}" for b, v in compute_line["steps_per_s_by_batch"].items()),
        ]
    if document["checks"]:
        parts += ["", report.checks_table(document["checks"])]
    return "\n".join(parts)


def _git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        return ""
