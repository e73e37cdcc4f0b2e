"""`python -m bench.ab`: two (or more) builds of the server side by side, for one change at a time.

Each server is NAME=SPEC, where SPEC is
  cellstream[+OPT...] [FLAGS]       this checkout's server
  cellstream@REV[+OPT...] [FLAGS]   the server of git revision REV (its service/ exported to a
                                    temp dir; REV must not hold a '+')
  echo | naive                      the transport ceiling and the baseline of `python -m bench`
and the options put the client side in the server's figures too:
  +tls    a throwaway CA and server certificate (trustme) made for this run: the server gets
          --tls-cert/--tls-key, the load generator's channels trust that CA only
  +auth   an auth file with one tenant and a fresh token: the server gets --auth-file, every
          load call sends `authorization: Bearer <token>`
Keys, the auth file and the token live in the run's temp dir only and are never printed.
All servers are started once, given one unmeasured run per scenario, then measured in turns (the
order rotates every repeat), so drift of a shared machine hits each of them alike. Printed: one
JSON line per scenario (medians per server; ratios to the FIRST server, of the medians and of each
repeat's neighbouring runs), one for the host's load (cores used by processes outside the bench),
then a table and, for cellstream servers, readings per model run. On a shared host, read the
load-adjusted ratios (see load_adjusted), or let --max-other measure a noisy window again.

    python -m bench.ab --scenarios unary,stream --repeats 3 \\
        new=cellstream old=cellstream@HEAD~1 echo=echo
    python -m bench.ab --scenarios unary,stream,batch-1 --repeats 5 \\
        plain=cellstream auth=cellstream+auth tls=cellstream+tls both=cellstream+tls+auth
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import replace
from io import BytesIO
from pathlib import Path

import numpy as np

from . import compute, cpu, harness, report, secure
from .load import Job, LoadPool
from .report import Row
from .secure import PLAINTEXT, ClientSide
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


def command_for(
    name: str, spec: str, args: argparse.Namespace, workdir: Path
) -> tuple[list[str], ClientSide]:
    """The server's command line and how the load generator reaches it."""
    kind, *flags = shlex.split(spec)
    base, *options = kind.split("+")
    if base in ("echo", "naive"):
        if options:
            raise SystemExit(f"{kind!r}: +{'+'.join(options)} is for cellstream servers only")
        if base == "naive":
            return baseline_command(args.models, args.model), PLAINTEXT
        model = compute.load(args.models, args.model)
        states = {s.name: s.shape for s in model.states}
        return echo_command(args.model, model.input_size, model.output_size, states), PLAINTEXT
    server, _, revision = base.partition("@")
    if server != "cellstream":
        raise SystemExit(f"unknown server {kind!r}: cellstream[@REV][+tls][+auth], echo or naive")
    try:
        secured = secure.prepare(set(options), workdir / f"{name}.secure")
    except ValueError as exc:
        raise SystemExit(f"{kind!r}: {exc}") from None
    command = cellstream_command(args.models, args.model, *secured.flags, *flags)
    if revision:
        source = export_revision(revision, workdir)
        command = ["env", f"PYTHONPATH={source}", *command]
    return command, secured.client


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


RATIO_KEYS = ("steps_per_s", "p99_ms", "server_us_per_reading")
PAIRED_KEYS = ("steps_per_s", "server_us_per_reading")
QUIET_PATIENCE = 20.0  # seconds a noisy measurement waits for a calmer host before its next try


def _ratio(value: float | None, base: float | None) -> float | None:
    return round(value / base, 3) if value is not None and base else None


def load_adjusted(runs: dict[str, list[Row]], key: str) -> dict[str, tuple[float, float]]:
    """Each server's `key` relative to the first's on an idle host, with its standard error.

    On a shared host the runs scatter mostly with the cores other processes took during each
    window (recorded for every run), far more than by a few percent between servers. Fitting
    value = a + b * other_cores + c_server over all runs of the scenario takes that out:
    (a + c_server) / a is the ratio at no other load. Linear in the load: a guide, not a law."""
    names = list(runs)
    points = [(n, r) for n in names for r in runs[n] if r.get(key) is not None]
    if len(points) < len(names) + 2:
        return {}
    x = np.array([[1.0, r["cpu"]["other"], *(float(n == m) for m in names[1:])] for n, r in points])
    y = np.array([float(r[key]) for _, r in points])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    residual = y - x @ coef
    variance = float(residual @ residual) / max(len(y) - x.shape[1], 1)
    errors = np.sqrt(np.diag(variance * np.linalg.pinv(x.T @ x)))
    if coef[0] <= 0:
        return {}
    return {
        name: (round(float(1 + coef[i + 2] / coef[0]), 3), round(float(errors[i + 2] / coef[0]), 3))
        for i, name in enumerate(names[1:])
    }


def scenario_line(
    scenario: str, params: Row, runs: dict[str, list[Row]], sides: dict[str, ClientSide]
) -> Row:
    """Medians per server; ratios to the first server of the medians and, per repeat, of runs
    taken next to each other (`paired`: their median, steadier when the host's load drifts;
    their spread says how noisy the run was; `adjusted`: see load_adjusted)."""
    names = list(runs)
    base = names[0]
    # (the ratio keys explicitly: report.medians takes its keys from the first run, which may lack one)
    results = {
        name: report.medians(rows)
        | {key: report.median([r.get(key) for r in rows]) for key in RATIO_KEYS}
        | {"security": sides[name].label}
        for name, rows in runs.items()
    }
    ratios: Row = {}
    for name in names[1:]:
        ratios[name] = {key: _ratio(results[name].get(key), results[base].get(key)) for key in RATIO_KEYS}
        for key in PAIRED_KEYS:
            by_repeat = [
                _ratio(mine.get(key), theirs.get(key))
                for mine, theirs in zip(runs[name], runs[base], strict=False)
            ]
            ratios[name][f"{key}_by_repeat"] = by_repeat
            ratios[name][f"{key}_paired"] = report.median(by_repeat)
    for key in PAIRED_KEYS:
        for name, (ratio, error) in load_adjusted(runs, key).items():
            ratios[name][f"{key}_adjusted"] = ratio
            ratios[name][f"{key}_adjusted_se"] = error
    return {"scenario": scenario, "params": params, "baseline": base, "results": results, "ratios": ratios}


def _cell(value: float | None, ratio: float | None, digits: int) -> str:
    text = "-" if value is None else f"{value:,.{digits}f}"
    return text if ratio is None else f"{text} ({ratio:.3f})"


def _paired(ratio: Row, key: str) -> str:
    values = [v for v in ratio.get(f"{key}_by_repeat", []) if v is not None]
    if not values:
        return ""
    return f"{ratio[f'{key}_paired']:.3f} [{min(values):.2f}-{max(values):.2f}]"


def _adjusted(ratio: Row, key: str) -> str:
    value = ratio.get(f"{key}_adjusted")
    return "" if value is None else f"{value:.3f} ± {ratio[f'{key}_adjusted_se']:.3f}"


def table(lines: list[Row]) -> str:
    """Medians per scenario and server with their ratio to the baseline (the first server) in
    brackets; `paired`: the median [range] of the per-repeat ratios; `load-adjusted`: the ratio
    at no other load ± its standard error."""
    header = (
        "scenario",
        "server",
        "security",
        "steps/s",
        "p99 ms",
        "server µs/reading",
        "paired steps/s",
        "paired µs/reading",
        "load-adjusted steps/s",
        "load-adjusted µs/reading",
        "other cores",
    )
    rows = [header]
    for line in lines:
        for name, result in line["results"].items():
            ratio = line["ratios"].get(name, {})
            rows.append(
                (
                    line["scenario"],
                    name,
                    result["security"],
                    _cell(result.get("steps_per_s"), ratio.get("steps_per_s"), 0),
                    _cell(result.get("p99_ms"), ratio.get("p99_ms"), 2),
                    _cell(result.get("server_us_per_reading"), ratio.get("server_us_per_reading"), 1),
                    _paired(ratio, "steps_per_s"),
                    _paired(ratio, "server_us_per_reading"),
                    _adjusted(ratio, "steps_per_s"),
                    _adjusted(ratio, "server_us_per_reading"),
                    f"{result['cpu'].get('other', 0.0):.2f}",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    text = [
        "  ".join(
            cell.ljust(w) if i < 3 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    return "\n".join([text[0], "  ".join("-" * w for w in widths), *text[1:]])


def wait_for_quiet(limit: float, patience: float = QUIET_PATIENCE) -> float:
    """Wait until processes outside the bench use at most `limit` cores (or `patience` s passed)."""
    deadline = time.monotonic() + patience
    while True:
        other = cpu.idle_load(0.5)["other"]
        if other <= limit or time.monotonic() > deadline:
            return other


def measure_quietly(bench: harness.Bench, name: str, job: Job, args: argparse.Namespace) -> Row:
    """One measurement; with --max-other, taken again (after waiting for a calmer host) while
    other processes used more than that many cores during its window. `tries` says how often."""
    tries = 0
    while True:
        tries += 1
        row = bench.measure(name, job, args.duration, args.warmup)
        if args.max_other is None or row["cpu"]["other"] <= args.max_other or tries > args.retries:
            row["tries"] = tries
            return row
        harness.log(f"{name}: other processes used {row['cpu']['other']} cores in the window; again")
        wait_for_quiet(args.max_other)


def measure_all(
    bench: harness.Bench, args: argparse.Namespace, scenarios: list[str], sides: dict[str, ClientSide]
) -> dict[str, dict[str, list[Row]]]:
    """Every scenario on every server, `repeats` times, the servers' order rotating each repeat.

    First one unmeasured run of each: the streams, connections and handshakes a server makes at
    its first load would otherwise fall into the first server's first window only."""

    def job(scenario: str, name: str) -> Job:
        job = replace(bench.jobs()[scenario], client=sides[name])
        return replace(job, streams=args.unary_streams) if scenario == "unary" else job

    for scenario in scenarios:
        for name in bench.servers:
            bench.measure(name, job(scenario, name), min(args.duration, 1.0), 0.0)
    results: dict[str, dict[str, list[Row]]] = {s: {n: [] for n in bench.servers} for s in scenarios}
    for repeat in range(args.repeats):
        for scenario in scenarios:
            names = list(bench.servers)
            names = names[repeat % len(names) :] + names[: repeat % len(names)]
            for name in names:
                row = measure_quietly(bench, name, job(scenario, name), args)
                # (None for a window in which nothing completed: its CPU bought no reading)
                per_reading = row["cpu"]["server"] / row["steps_per_s"] * 1e6 if row["steps_per_s"] else None
                row.update(server_us_per_reading=per_reading and round(per_reading, 2), repeat=repeat)
                results[scenario][name].append(row)
                harness.log(
                    f"{scenario:8} {name:12} {row['steps_per_s']:>11,.0f} steps/s"
                    f"  p99 {row['p99_ms'] or 0:8.2f} ms  server {per_reading or 0:6.1f} µs/reading"
                    f"  errors {row['errors']}  other cores {row['cpu']['other']}"
                    + (f"  first error: {row['error_sample']}" if row.get("error_sample") else "")
                )
    return results


def host_line(results: dict[str, dict[str, list[Row]]], before: Row, started: float) -> Row:
    """How busy the machine was apart from the bench: before, after and during the windows."""
    others = [row["cpu"]["other"] for runs in results.values() for rows in runs.values() for row in rows]
    return {
        "scenario": "host",
        "elapsed_s": round(time.perf_counter() - started, 1),
        "load_before": before,
        "load_after": cpu.idle_load(1.0),
        "other_cores_median": report.median(others),
        "other_cores_max": max(others, default=None),
        "note": "cores used by processes outside the bench (other_cores: during the measurement windows)",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("servers", nargs="+", help="NAME=SPEC (see above); ratios are to the first")
    parser.add_argument("--scenarios", default="unary,stream", help=f"comma-separated: {','.join(SCENARIOS)}")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--fanin-rate", type=float, default=3757.0, help="fanin offered readings/s")
    parser.add_argument("--unary-streams", type=int, default=64, help="unary: streams (= calls in flight)")
    parser.add_argument(
        "--max-other",
        type=float,
        default=None,
        help="take a measurement again while processes outside the bench used more cores than this",
    )
    parser.add_argument("--retries", type=int, default=3, help="--max-other: tries after the first")
    args = parser.parse_args(argv)
    scenarios = args.scenarios.split(",")
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}")
    specs = dict(item.partition("=")[::2] for item in args.servers)
    if len(specs) != len(args.servers) or not all(specs.values()):
        parser.error("expected NAME=SPEC, each NAME once")
    started = time.perf_counter()
    load_before = cpu.idle_load(1.0)
    harness.log(f"before the run, processes outside the bench used {load_before['other']} cores")
    bench_args = harness.parse_args(["--duration", str(args.duration), "--warmup", str(args.warmup)])
    with tempfile.TemporaryDirectory(prefix="cellstream-ab-") as tmp:
        workdir = Path(tmp)
        bench = harness.Bench(bench_args, workdir)
        bench.context["fanin_rate"] = args.fanin_rate
        sides: dict[str, ClientSide] = {}
        try:
            for name, spec in specs.items():
                command, sides[name] = command_for(name, spec, bench_args, workdir)
                bench.servers[name] = launch(name, command, workdir, credentials=sides[name].credentials())
            bench.pool = LoadPool(bench_args.clients)
            results = measure_all(bench, args, scenarios, sides)
            lines: list[Row] = []
            for scenario in scenarios:
                params = bench.params(scenario) | {"duration_s": args.duration, "repeats": args.repeats}
                if scenario == "unary":
                    params["streams"] = args.unary_streams
                lines.append(scenario_line(scenario, params, results[scenario], sides))
                print(json.dumps(lines[-1]), flush=True)
            host = host_line(results, load_before, started) | {"servers": specs}
            print(json.dumps(host), flush=True)
            print(f"\n{table(lines)}\n")
            print(
                f"ratios (in brackets) are to {next(iter(specs))}. Processes outside the bench used "
                f"{load_before['other']} cores before the run, {host['load_after']['other']} after, a median "
                f"of {host['other_cores_median']} (max {host['other_cores_max']}) during the windows"
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
