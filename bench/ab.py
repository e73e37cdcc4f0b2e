"""`python -m bench.ab`: two (or more) builds of the server side by side, for one change at a time.

Each server is NAME=SPEC, where SPEC is
  cellstream [FLAGS]        this checkout's server
  cellstream@REV [FLAGS]    the server of git revision REV (its service/ exported to a temp dir)
  echo | naive              the transport ceiling and the baseline of `python -m bench`
All of them are started once and measured in turns (the order rotates every repeat), so drift of
a shared machine hits each of them alike; medians per server are printed, with the server's CPU
time per reading and, for cellstream servers, readings per model run.

    python -m bench.ab --scenarios unary,stream --repeats 3 \\
        new=cellstream old=cellstream@HEAD~1 echo=echo
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import replace
from io import BytesIO
from pathlib import Path

from . import compute, harness
from .load import LoadPool
from .servers import REPO, Running, baseline_command, cellstream_command, echo_command, launch

SCENARIOS = ("unary", "stream", "batch-1", "batch-2", "fanin", "coalesce")


def export_revision(revision: str, into: Path) -> Path:
    """The service/ tree of a git revision, unpacked under `into`; its path goes on PYTHONPATH."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", revision, "service"], cwd=REPO, capture_output=True, check=True
    ).stdout
    target = into / revision.replace("/", "_")
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target / "service"


def command_for(spec: str, args: argparse.Namespace, workdir: Path) -> list[str]:
    kind, *flags = shlex.split(spec)
    if kind == "echo":
        model = compute.load(args.models, args.model)
        states = {s.name: s.shape for s in model.states}
        return echo_command(args.model, model.input_size, model.output_size, states)
    if kind == "naive":
        return baseline_command(args.models, args.model)
    name, _, revision = kind.partition("@")
    if name != "cellstream":
        raise SystemExit(f"unknown server {kind!r}: cellstream[@REV], echo or naive")
    command = cellstream_command(args.models, args.model, *flags)
    if revision:
        source = export_revision(revision, workdir)
        command = ["env", f"PYTHONPATH={source}", *command]
    return command


def readings_per_run(server: Running) -> float | None:
    """Mean readings per model run, from the server's /metrics (None for the bench's own servers)."""
    ready = json.loads((server.log_path.parent / f"{server.name}.ready.json").read_text())
    if not ready.get("metrics_address"):
        return None
    text = urllib.request.urlopen(f"http://{ready['metrics_address']}/metrics", timeout=5).read().decode()
    total = runs = 0.0
    for line in text.splitlines():
        if line.startswith("cellstream_batch_size_sum{"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("cellstream_batch_size_count{"):
            runs += float(line.rsplit(" ", 1)[1])
    return round(total / runs, 1) if runs else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("servers", nargs="+", help="NAME=SPEC (see above)")
    parser.add_argument("--scenarios", default="unary,stream", help=f"comma-separated: {','.join(SCENARIOS)}")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--fanin-rate", type=float, default=3757.0, help="fanin offered readings/s")
    parser.add_argument("--unary-streams", type=int, default=64, help="unary: streams (= calls in flight)")
    args = parser.parse_args(argv)
    scenarios = args.scenarios.split(",")
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}")
    bench_args = harness.parse_args(["--duration", str(args.duration), "--warmup", str(args.warmup)])
    with tempfile.TemporaryDirectory(prefix="cellstream-ab-") as tmp:
        workdir = Path(tmp)
        bench = harness.Bench(bench_args, workdir)
        bench.context["fanin_rate"] = args.fanin_rate
        try:
            for item in args.servers:
                name, _, spec = item.partition("=")
                if not spec:
                    parser.error(f"{item!r}: expected NAME=SPEC")
                bench.servers[name] = launch(name, command_for(spec, bench_args, workdir), workdir)
            bench.pool = LoadPool(bench_args.clients)
            results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
            for repeat in range(args.repeats):
                for scenario in scenarios:
                    names = list(bench.servers)
                    names = names[repeat % len(names) :] + names[: repeat % len(names)]
                    for name in names:
                        job = bench.jobs()[scenario]
                        if scenario == "unary":
                            job = replace(job, streams=args.unary_streams)
                        row = bench.measure(name, job, args.duration, args.warmup)
                        per_reading = row["cpu"]["server"] / max(row["steps_per_s"], 1) * 1e6
                        results.setdefault((scenario, name), []).append(
                            (row["steps_per_s"], row["p99_ms"], per_reading)
                        )
                        harness.log(
                            f"{scenario:8} {name:12} {row['steps_per_s']:>11,.0f} steps/s  p99 "
                            f"{row['p99_ms']:8.2f} ms  server {per_reading:6.1f} µs/reading  "
                            f"other cores {row['cpu']['other']}"
                        )
            print("\nmedians:")
            for (scenario, name), values in results.items():
                print(
                    f"{scenario:8} {name:12} {statistics.median(v[0] for v in values):>11,.0f} steps/s  p99 "
                    f"{statistics.median(v[1] for v in values):8.2f} ms  server "
                    f"{statistics.median(v[2] for v in values):6.1f} µs/reading"
                )
            for name, server in bench.servers.items():
                per_run = readings_per_run(server)
                if per_run is not None:
                    print(f"{name}: {per_run} readings per model run (whole session)")
        finally:
            if bench.pool is not None:
                bench.pool.close()
            bench.stop_servers()
    return 0


if __name__ == "__main__":
    sys.exit(main())
