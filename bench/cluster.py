"""`python -m bench.cluster`: 1, 2 and 3 replicas, through the cluster-aware client and HAProxy.

Started here on 127.0.0.1 and alive for the whole run: three clusters (1, 2 and 3 cellstream
replicas, each its own process with a cluster map of 256 shards, plus one HAProxy routing by the
generated config). Measured on each, with the CPU of every process per reading:

  coalesce cluster   tasks awaiting a Stepper over an AsyncClusterClient (batches split by owner)
  batch    cluster   one StepBatch of 10,000 streams in flight, through AsyncClusterClient
  unary    proxy     Step with `x-stream-id`, through HAProxy
  unary    direct    the same Step, each stream's calls sent straight to its owner
and, on the 1-replica cluster, `coalesce plain` and `batch plain` (Stepper and step_batch over
the plain AsyncClient): their ratio to the cluster client is the client's routing cost, and
proxy / direct on unary is the cost of the HAProxy hop. Repeats interleave every measurement of
every cluster (the order rotates), figures are medians, and the host's load outside the bench
is recorded per window, as `python -m bench` does.
"""

# mypy: disallow-untyped-calls=False
# (the generated *_pb2_grpc module is untyped)

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import io
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from cellstream._proto.cellstream.v1 import cellstream_pb2_grpc as pb_grpc
from cellstream.client import (
    CHANNEL_OPTIONS,
    AsyncClient,
    AsyncClusterClient,
    CellStreamError,
    Client,
    Stepper,
    batch_request,
    step_request,
)
from cellstream.cluster import ClusterMap, routing_value
from cellstream.cluster import haproxy as proxy_config

from . import compute, cpu, report
from .ab import load_adjusted
from .harness import log, machine, workspace
from .load import Job, Outcome, Recorder
from .report import Row
from .servers import REPO, Running, cellstream_command, launch

SHARDS = 256
SIZES = (1, 2, 3)
BATCH_SIZE = 10_000
# (mode, route, replicas), in groups measured back to back: each ratio's two sides are neighbours
GROUPS = [
    [("coalesce", "cluster", 1), ("coalesce", "plain", 1)],
    [("batch", "cluster", 1), ("batch", "plain", 1)],
    *([("unary", "proxy", n), ("unary", "direct", n)] for n in SIZES),
    *([(m, "cluster", n)] for n in SIZES[1:] for m in ("coalesce", "batch")),
]
SPECS = [spec for group in GROUPS for spec in group]


@dataclass(frozen=True)
class ClusterJob:
    """One client process's share of one measurement."""

    mode: str  # unary | batch | coalesce
    route: str  # plain (one replica) | cluster (AsyncClusterClient) | proxy (HAProxy) | direct
    address: str  # plain: the replica; proxy: HAProxy
    seeds: tuple[str, ...]  # cluster: the replicas
    owners: tuple[str, ...]  # direct: the owner's address of stream i (prefix + i)
    model: str
    input_size: int
    start_at: float
    warmup: float
    duration: float
    streams: int
    prefix: str
    omit_state: bool
    shard: int = 0
    shards: int = 1


def _recorder(job: ClusterJob) -> Recorder:
    timing = Job(job.mode, job.address, job.model, job.input_size, job.start_at, job.warmup, job.duration)
    return Recorder(timing)


def _readings(job: ClusterJob) -> np.ndarray:
    return np.random.default_rng(99 + job.shard).standard_normal((64, job.input_size)).astype(np.float32)


def _mine(job: ClusterJob) -> list[int]:
    return [i for i in range(job.streams) if i % job.shards == job.shard]


async def _until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


async def unary(job: ClusterJob, rec: Recorder) -> Outcome:
    """Each stream: Step, wait, Step again; through HAProxy or to its owner, same header both ways
    (a replica ignores it), so the proxy hop is the only difference."""
    readings = _readings(job)
    targets = job.owners if job.route == "direct" else (job.address,) * job.streams
    channels = {a: grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS) for a in set(targets)}
    stubs = {a: pb_grpc.CellStreamStub(c) for a, c in channels.items()}

    async def one_stream(i: int) -> None:
        stream_id = f"{job.prefix}{i}"
        stub, metadata = stubs[targets[i]], (("x-stream-id", routing_value(stream_id)),)
        requests = [
            step_request(stream_id, readings[(i + k) % 64], model=job.model, omit_state=job.omit_state)
            for k in range(4)
        ]
        k = 0
        while (sent_at := time.monotonic()) < rec.end:
            try:
                await stub.Step(requests[k & 3], metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                rec.failed(exc.details())
                await asyncio.sleep(0.01)
                continue
            rec.done(sent_at)
            k += 1

    try:
        await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), 10) for c in channels.values()))
        await _until(job.start_at)
        await asyncio.gather(*(one_stream(i) for i in _mine(job)))
    finally:
        for channel in channels.values():
            await channel.close(None)
    return rec.outcome()


def _client(job: ClusterJob) -> AsyncClient | AsyncClusterClient:
    if job.route == "plain":
        return AsyncClient(job.address, timeout=60)
    return AsyncClusterClient(list(job.seeds), timeout=60)


async def batch(job: ClusterJob, rec: Recorder) -> Outcome:
    """One StepBatch of `streams` readings in flight (from the first client process only)."""
    if job.shard != 0:
        return rec.outcome()
    client = _client(job)
    ids = [f"{job.prefix}{j}" for j in range(job.streams)]
    x = _readings(job)[np.arange(job.streams) % 64]
    inputs = [x, np.roll(x, 1, axis=0)]
    try:
        await client.list_models()  # (the cluster client's map and channels, before the window)
        await _until(job.start_at)
        k = 0
        while (sent_at := time.monotonic()) < rec.end:
            try:
                await client.step_batch(ids, inputs[k & 1], model=job.model, omit_state=job.omit_state)
            except CellStreamError as exc:
                rec.failed(exc, job.streams)
                await asyncio.sleep(0.01)
                continue
            rec.done(sent_at, job.streams)
            k += 1
    finally:
        await client.close()
    return rec.outcome()


async def coalesce(job: ClusterJob, rec: Recorder) -> Outcome:
    """Application tasks, one per stream, awaiting one shared Stepper per process."""
    readings = _readings(job)
    client = _client(job)
    stepper = Stepper(client, job.model, want_state=not job.omit_state)
    await stepper.contract()
    before = (0, 0)

    async def app(i: int) -> None:
        stream_id, k = f"{job.prefix}{i}", i
        while (sent_at := time.monotonic()) < rec.end:
            try:
                await stepper.step(stream_id, readings[k % 64])
            except CellStreamError as exc:
                rec.failed(exc)
                await asyncio.sleep(0.01)
                continue
            rec.done(sent_at)
            k += 1

    async def count_from_window() -> None:
        nonlocal before
        await _until(rec.begin)
        before = (stepper.stats.batches, stepper.stats.readings)

    try:
        await _until(job.start_at)
        await asyncio.gather(count_from_window(), *(app(i) for i in _mine(job)))
    finally:
        await stepper.close()
        await client.close()
    batches = stepper.stats.batches - before[0]
    mean_batch = (stepper.stats.readings - before[1]) / batches if batches else 0.0
    return rec.outcome(mean_batch=mean_batch, batches=float(batches))


MODES = {"unary": unary, "batch": batch, "coalesce": coalesce}


def _worker(conn: Connection) -> None:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    while (job := conn.recv()) is not None:
        try:
            result: Outcome | str = loop.run_until_complete(MODES[job.mode](job, _recorder(job)))
        except BaseException:
            result = traceback.format_exc()
        conn.send(result)
    loop.close()


class ClientPool:
    """Client processes, started once and given one job each per measurement."""

    def __init__(self, processes: int) -> None:
        context = multiprocessing.get_context("spawn")  # no fork: grpc does not survive one
        self.workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
        for _ in range(processes):
            mine, theirs = context.Pipe()
            process = context.Process(target=_worker, args=(theirs,), daemon=True)
            process.start()
            self.workers.append((process, mine))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p, _ in self.workers if p.pid is not None]

    def run(self, job: ClusterJob, timeout: float) -> list[Outcome]:
        for i, (_, conn) in enumerate(self.workers):
            conn.send(replace(job, shard=i, shards=len(self.workers)))
        results = []
        for _, conn in self.workers:
            if not conn.poll(timeout):
                raise RuntimeError("a client process did not answer in time")
            result = conn.recv()
            if isinstance(result, str):
                raise RuntimeError(f"a client process failed:\n{result}")
            results.append(result)
        return results

    def close(self) -> None:
        for process, conn in self.workers:
            with contextlib.suppress(OSError):
                conn.send(None)
            process.join(5)
            if process.is_alive():
                process.kill()


@dataclass
class Proxy:
    process: subprocess.Popen[bytes]
    address: str
    socket_path: Path
    log_path: Path

    def backends_up(self, names: list[str]) -> bool:
        try:
            text = proxy_config.runtime_command(self.socket_path, "show stat").removeprefix("# ")
        except proxy_config.RuntimeAPIError:
            return False
        rows = csv.DictReader(io.StringIO(text))
        up = {r["pxname"] for r in rows if r["svname"] == r["pxname"] and r["status"] == "UP"}
        return set(names) <= up

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(10)


@dataclass
class Cluster:
    replicas: dict[str, Running]
    cluster_map: ClusterMap
    proxy: Proxy | None = None

    @property
    def pids(self) -> list[int]:
        proxy = [] if self.proxy is None else [self.proxy.process.pid]
        return [*(r.pid for r in self.replicas.values()), *proxy]

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        for replica in self.replicas.values():
            code = replica.stop()
            if code not in (0, -15):
                log(f"{replica.name} exited with {code}; log:\n{replica.log()[-2000:]}")


def start_proxy(cluster_map: ClusterMap, workdir: Path) -> Proxy:
    """HAProxy in the foreground on a socket bound here (no port race), the generated config."""
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        raise SystemExit("haproxy is not installed (Debian: apt-get install haproxy)")
    listener = socket.create_server(("127.0.0.1", 0))
    settings = proxy_config.ProxySettings(
        map_path=workdir / "shards.map",
        socket_path=workdir / "haproxy.sock",
        bind=f"fd@{listener.fileno()}",
        check_interval_ms=1000,
    )
    config, _ = proxy_config.write(cluster_map, workdir, settings)
    log_path = workdir / "haproxy.log"
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            [haproxy, "-db", "-f", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            pass_fds=[listener.fileno()],
        )
    host, port = listener.getsockname()[:2]
    listener.close()
    proxy = Proxy(process, f"{host}:{port}", settings.socket_path, log_path)
    deadline = time.monotonic() + 30
    while not proxy.backends_up(list(cluster_map.replicas)):
        if process.poll() is not None or time.monotonic() > deadline:
            proxy.stop()
            raise RuntimeError(f"HAProxy did not get every backend UP:\n{log_path.read_text()[-2000:]}")
        time.sleep(0.05)
    return proxy


def start_cluster(n: int, args: argparse.Namespace, workdir: Path) -> Cluster:
    """n replicas on port 0 with a placeholder map, then the real addresses (epoch 2) given to each."""
    names = [f"cellstream-{i}" for i in range(n)]
    placeholder = ClusterMap.initial({name: f"{name}.invalid:50051" for name in names}, SHARDS)
    cluster = Cluster({}, placeholder)
    home = workdir / f"cluster-{n}"
    try:
        for name in names:
            path = home / f"{name}.map.json"
            home.mkdir(parents=True, exist_ok=True)
            placeholder.write(path)
            flags = ("--cluster-map", str(path), "--replica-name", name)
            cluster.replicas[name] = launch(
                f"{n}r-{name}", cellstream_command(args.models, args.model, *flags), home
            )
        addresses = {name: r.address for name, r in cluster.replicas.items()}
        cluster.cluster_map = ClusterMap(2, SHARDS, addresses, placeholder.ranges)
        for replica in cluster.replicas.values():
            with Client(replica.address) as admin:
                admin.set_cluster_map(cluster.cluster_map)
        cluster.proxy = start_proxy(cluster.cluster_map, home / "haproxy")
    except BaseException:
        cluster.stop()
        raise
    return cluster


class ClusterBench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.model = compute.load(args.models, args.model)
        self.clusters: dict[int, Cluster] = {}
        self.pool: ClientPool | None = None
        self.runs: list[Row] = []
        self.lines: list[Row] = []
        self.workdir = workdir

    def job(self, mode: str, route: str, n: int) -> ClusterJob:
        cluster, a = self.clusters[n], self.args
        assert cluster.proxy is not None
        streams = {"unary": a.unary_streams, "batch": BATCH_SIZE, "coalesce": a.coalesce_streams}[mode]
        prefix = f"{mode[0]}{route[0]}-"
        owners = tuple(
            cluster.cluster_map.address_of(cluster.cluster_map.owner_of_stream(f"{prefix}{i}"))
            for i in range(streams)
        )
        return ClusterJob(
            mode=mode,
            route=route,
            address=cluster.proxy.address if route == "proxy" else cluster.replicas["cellstream-0"].address,
            seeds=tuple(r.address for r in cluster.replicas.values()),
            owners=owners,
            model=a.model,
            input_size=self.model.input_size,
            start_at=0.0,
            warmup=0.0,
            duration=0.0,
            streams=streams,
            prefix=prefix,
            omit_state=a.omit_state,
        )

    def measure(self, spec: tuple[str, str, int], duration: float, warmup: float) -> Row:
        """One run of one spec; steps/s, latency, and the cores of every process per group."""
        assert self.pool is not None
        mode, route, n = spec
        cluster = self.clusters[n]
        start_at = time.monotonic() + 0.4
        job = replace(self.job(*spec), start_at=start_at, warmup=warmup, duration=duration)
        groups: dict[str, list[int]] = {name: [r.pid] for name, r in cluster.replicas.items()}
        assert cluster.proxy is not None
        groups["haproxy"] = [cluster.proxy.process.pid]
        groups["clients"] = self.pool.pids
        groups["bench"] = [os.getpid(), *(p for m, c in self.clusters.items() if m != n for p in c.pids)]
        results: list[list[Outcome]] = []
        pool = self.pool

        def collect() -> None:  # (the pool blocks; the CPU windows are taken meanwhile)
            results.append(pool.run(job, duration + warmup + 60))

        runner = threading.Thread(target=collect, daemon=True)
        runner.start()
        time.sleep(max(0.0, start_at + warmup - time.monotonic()))
        before = cpu.snapshot(groups)
        time.sleep(max(0.0, start_at + warmup + duration - time.monotonic()))
        after = cpu.snapshot(groups)
        runner.join()
        if not results:
            raise RuntimeError("the client processes failed (see above)")
        row = report.summarize(results[0], duration)
        usage = cpu.usage(before, after)
        usage["replicas"] = round(sum(usage[name] for name in cluster.replicas), 3)
        row["cpu"] = usage
        steps = row["steps_per_s"]
        for group in ("replicas", "haproxy", "clients"):
            row[f"{group}_us_per_reading"] = round(usage[group] / steps * 1e6, 2) if steps else None
        row.update(mode=mode, route=route, replicas=n)
        return row

    def run(self) -> None:
        a = self.args
        for spec in SPECS:  # streams, channels and maps made before any measured window
            self.measure(spec, min(a.duration, 0.5), 0.3)
        for repeat in range(a.repeats):
            groups = GROUPS[repeat % len(GROUPS) :] + GROUPS[: repeat % len(GROUPS)]
            # (which side goes first alternates too: a drifting load then favours neither)
            order = [spec for group in groups for spec in (group if repeat % 2 == 0 else group[::-1])]
            for spec in order:
                row = self.measure(spec, a.duration, a.warmup)
                row["repeat"] = repeat
                self.runs.append(row)
                log(
                    f"{spec[0]:8} {spec[1]:7} {spec[2]} replica(s) {row['steps_per_s']:>11,.0f} steps/s"
                    f"  p50 {row['p50_ms'] or 0:7.2f} ms  replicas {row['replicas_us_per_reading'] or 0:6.1f}"
                    f"  haproxy {row['haproxy_us_per_reading'] or 0:6.1f}  clients"
                    f" {row['clients_us_per_reading'] or 0:6.1f} µs/reading  errors {row['errors']}"
                    f"  other cores {row['cpu']['other']}"
                    + (f"  first error: {row['error_sample']}" if row.get("error_sample") else "")
                )

    def runs_of(self, spec: tuple[str, str, int]) -> list[Row]:
        return [r for r in self.runs if (r["mode"], r["route"], r["replicas"]) == spec]

    def summarize(self) -> None:
        medians: dict[tuple[str, str, int], Row] = {}
        for spec in SPECS:
            medians[spec] = report.medians(self.runs_of(spec))
            mode, route, n = spec
            line: Row = {"scenario": "cluster", "mode": mode, "route": route, "replicas": n}
            one = medians.get((mode, route, 1))
            if one and one.get("steps_per_s") and n > 1:
                line["steps_vs_1_replica"] = round(medians[spec]["steps_per_s"] / one["steps_per_s"], 3)
            self.emit(line | {"results": medians[spec]})
        for mode in ("batch", "coalesce"):
            self.emit(self.ratio_line(f"routing-{mode}", (mode, "cluster", 1), (mode, "plain", 1), 0.9))
        for n in SIZES:
            self.emit(self.ratio_line(f"proxy-hop-{n}", ("unary", "proxy", n), ("unary", "direct", n), None))

    def ratio_line(
        self, name: str, spec: tuple[str, str, int], base: tuple[str, str, int], target: float | None
    ) -> Row:
        """spec / base: of the medians, and the median of each repeat's pair (steadier on a
        shared host), plus the latency and CPU per reading each side."""
        mine, theirs = self.runs_of(spec), self.runs_of(base)
        by_repeat = [
            round(m["steps_per_s"] / t["steps_per_s"], 3)
            for m, t in zip(mine, theirs, strict=False)
            if t["steps_per_s"]
        ]
        a, b = report.medians(mine), report.medians(theirs)
        line: Row = {
            "scenario": name,
            "measured": "/".join(map(str, spec)),
            "baseline": "/".join(map(str, base)),
            "steps_ratio": round(a["steps_per_s"] / b["steps_per_s"], 3) if b["steps_per_s"] else None,
            "steps_ratio_paired": report.median(by_repeat),
            "steps_ratio_by_repeat": by_repeat,
            "p50_ms": [a.get("p50_ms"), b.get("p50_ms")],
            "added_p50_ms": round(a["p50_ms"] - b["p50_ms"], 3)
            if a.get("p50_ms") and b.get("p50_ms")
            else None,
        }
        for group in ("replicas", "haproxy", "clients"):
            key = f"{group}_us_per_reading"
            line[key] = [a.get(key), b.get(key)]
        for key in ("steps_per_s", "clients_us_per_reading"):
            adjusted = load_adjusted({"base": theirs, "measured": mine}, key).get("measured")
            if adjusted is not None:
                line[f"{key}_ratio_load_adjusted"] = {"ratio": adjusted[0], "se": adjusted[1]}
        if target is not None:
            value = line["steps_ratio_paired"]
            line["check"] = {"target": f">= {target}", "pass": None if value is None else value >= target}
        return line

    def message_sizes(self) -> Row:
        """Wire bytes per reading, for the network part of the model (protobuf, before HTTP/2)."""
        address = self.clusters[1].replicas["cellstream-0"].address
        x = np.zeros((1000, self.model.input_size), np.float32)
        ids = [f"size-{j:06d}" for j in range(1000)]
        with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.CellStreamStub(channel)
            sizes: Row = {"stream_id_bytes": len(ids[0])}
            for omit in (False, True):
                request = batch_request(ids, x, model=self.args.model, omit_state=omit)
                reply = stub.StepBatch(request, timeout=30)
                unary = step_request(ids[0], x[0], model=self.args.model, omit_state=omit)
                unary_reply = stub.Step(unary, timeout=30)
                label = "omit_state" if omit else "with_state"
                sizes[label] = {
                    "batch_request_per_reading": round(request.ByteSize() / 1000, 1),
                    "batch_reply_per_reading": round(reply.ByteSize() / 1000, 1),
                    "step_request": unary.ByteSize(),
                    "step_reply": unary_reply.ByteSize(),
                }
        return {"scenario": "message-sizes", **sizes}

    def emit(self, line: Row) -> None:
        self.lines.append(line)
        print(json.dumps(line, default=_jsonable), flush=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON: {type(value)}")


def _cell(value: Any, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(bench: ClusterBench) -> str:
    """Medians per measurement: throughput, latency, and cores and µs of CPU per reading."""
    header = [
        *("mode", "route", "replicas", "steps/s", "vs 1", "p50 ms", "p99 ms", "replica cores"),
        *("haproxy cores", "client cores", "other cores", "µs/reading replicas", "haproxy", "clients"),
    ]
    rows = [header]
    for line in bench.lines:
        if line.get("scenario") != "cluster":
            continue
        r = line["results"]
        each = "+".join(f"{r['cpu'].get(f'cellstream-{i}', 0):.2f}" for i in range(line["replicas"]))
        rows.append(
            [
                line["mode"],
                line["route"],
                str(line["replicas"]),
                _cell(r["steps_per_s"]),
                _cell(line.get("steps_vs_1_replica"), 2),
                _cell(r.get("p50_ms"), 2),
                _cell(r.get("p99_ms"), 2),
                each,
                _cell(r["cpu"].get("haproxy"), 2),
                _cell(r["cpu"].get("clients"), 2),
                _cell(r["cpu"].get("other"), 2),
                _cell(r.get("replicas_us_per_reading"), 1),
                _cell(r.get("haproxy_us_per_reading"), 1),
                _cell(r.get("clients_us_per_reading"), 1),
            ]
        )
    ratio_rows = [["ratio", "measured / baseline", "steps/s paired [range]", "of medians", "added p50 ms"]]
    ratio_rows[0] += ["load-adjusted", "client µs/reading", "haproxy µs/reading", "target"]
    for line in bench.lines:
        if "steps_ratio" in line:
            spread = [v for v in line["steps_ratio_by_repeat"] if v is not None] or [0.0]
            check = line.get("check")
            ratio_rows.append(
                [
                    line["scenario"],
                    f"{line['measured']} / {line['baseline']}",
                    f"{_cell(line['steps_ratio_paired'], 3)} [{min(spread):.2f}-{max(spread):.2f}]",
                    _cell(line["steps_ratio"], 3),
                    _cell(line["added_p50_ms"], 2),
                    _adjusted(line.get("steps_per_s_ratio_load_adjusted")),
                    " / ".join(_cell(v, 1) for v in line["clients_us_per_reading"]),
                    " / ".join(_cell(v, 1) for v in line["haproxy_us_per_reading"]),
                    "" if check is None else f"{check['target']}: {'pass' if check['pass'] else 'FAIL'}",
                ]
            )
    return _aligned(rows, 3) + "\n\n" + _aligned(ratio_rows, 2)


def _adjusted(value: Row | None) -> str:
    return "-" if value is None else f"{value['ratio']:.3f} ± {value['se']:.3f}"


def _aligned(rows: list[list[str]], left: int) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    text = [
        "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    return "\n".join([text[0], "  ".join("-" * w for w in widths), *text[1:]])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="gru")
    parser.add_argument("--models", type=Path, default=REPO / "models")
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--clients", type=int, default=2, help="client processes")
    parser.add_argument("--unary-streams", type=int, default=64, help="unary: streams (= calls in flight)")
    parser.add_argument("--coalesce-streams", type=int, default=1000, help="coalesce: application tasks")
    parser.add_argument("--omit-state", action="store_true", help="replies without state (default: with)")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "cluster.json")
    parser.add_argument("--quick", action="store_true", help="1 repeat of 1 s runs: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.repeats = 1.0, 0.3, 1
    return args


@contextlib.contextmanager
def running(args: argparse.Namespace, workdir: Path) -> Iterator[ClusterBench]:
    bench = ClusterBench(args, workdir)
    try:
        for n in SIZES:
            bench.clusters[n] = start_cluster(n, args, workdir)
            log(f"{n} replica(s) up; HAProxy on {bench.clusters[n].proxy.address}")  # type: ignore[union-attr]
        bench.pool = ClientPool(args.clients)
        yield bench
    finally:
        if bench.pool is not None:
            bench.pool.close()
        for cluster in bench.clusters.values():
            cluster.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    info = machine()
    load_before = cpu.idle_load(1.0)
    log(f"machine: {info['cpu']}, {info['cores']} cores; before the run: {load_before}")
    with workspace() as workdir, running(args, workdir) as bench:
        bench.emit(bench.message_sizes())
        bench.run()
        bench.summarize()
    others = [r["cpu"]["other"] for r in bench.runs]
    host: Row = {
        "scenario": "host",
        "elapsed_s": round(time.perf_counter() - started, 1),
        "load_before": load_before,
        "load_after": cpu.idle_load(1.0),
        "other_cores_median": report.median(others),
        "other_cores_max": max(others, default=None),
        "note": "cores used by processes outside the bench during the measurement windows",
    }
    bench.emit(host)
    document = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.cluster", *(argv if argv is not None else sys.argv[1:])]),
        "machine": info,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "scenarios": bench.lines,
        "runs": bench.runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=1, default=_jsonable))
    print()
    print(table(bench))
    log(
        f"done in {host['elapsed_s']:.0f} s; other cores during the windows: median "
        f"{host['other_cores_median']}, max {host['other_cores_max']}; JSON in {args.output}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
