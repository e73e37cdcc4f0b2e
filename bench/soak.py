"""`python -m bench.soak`: resource attacks on a real cellstream server, each with its bounds measured.

Every attack gets a fresh server on 127.0.0.1 port 0 (the bundled `gru` model), a stall probe in
its own process (a Health/Check and a one-reading Step of another stream every ~10 ms; see
bench/soak_watch.py) and a sampler of the server's RSS and fds. The probe runs for an idle
window first, so every stall is shown next to the same server's idle figure. One JSON line per
attack, then a table; the whole document goes to --output.

  repeated-id-batch  one StepBatch of one stream id repeated N times, omit_state
  import-flood       ImportStates of garbage chunks far past the server's import cap
  unread-stream      a StepStream that never reads its replies; each request is a valid reading
                     plus a ~3 MB unknown field (number 99); cancelled after a bounded send
  idle-connections   many raw TCP connections that send the HTTP/2 preface and then nothing

Every loop is bounded in count and time, sending stops when the server's RSS passes
--rss-ceiling-mib, and each process started here is stopped by its pid before the next attack.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import psutil

from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
from cellstream.client import CHANNEL_OPTIONS, Client, step_request

from . import cpu
from .report import Row, markdown
from .servers import REPO, cellstream_command, launch
from .soak_watch import FRESH, MODEL, Probe, Sampler, Window, fetch_metrics, peak, served

# The client connection preface alone (RFC 9113 §3.4): no SETTINGS frame follows, so the
# connection never completes its HTTP/2 handshake.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FD_MARGIN = 256  # fds kept free for the bench's own channels, pipes and files
IMPORT = "/cellstream.v1.CellStream/ImportStates"
STEP_STREAM = "/cellstream.v1.CellStream/StepStream"
MIB = 2**20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--attacks", default=",".join(ATTACKS), help=f"comma-separated subset of {','.join(ATTACKS)}")
    add("--models", type=Path, default=REPO / "models", help="model repository (must hold gru)")
    add("--batch-ids", type=int, default=100_000, help="repeated-id-batch: readings in the StepBatch")
    add("--import-mib", type=int, default=512, help="import-flood: MiB of garbage to offer")
    add("--import-chunk-kib", type=int, default=1024, help="import-flood: KiB per SnapshotChunk")
    add("--unread-messages", type=int, default=300, help="unread-stream: most requests sent")
    add("--unread-kib", type=int, default=3072, help="unread-stream: KiB of the unknown field per request")
    add("--connections", type=int, default=2000, help="idle-connections: raw connections (fd limit too)")
    add("--hold-seconds", type=float, default=5.0, help="idle-connections: seconds they stay open")
    add("--attack-seconds", type=float, default=30.0, help="longest time any attack keeps sending")
    add("--call-timeout", type=float, default=120.0, help="deadline of each attack call (s)")
    add("--baseline-seconds", type=float, default=1.0, help="idle probe window before each attack")
    add("--settle-seconds", type=float, default=2.0, help="wait after an attack before RSS 'after'")
    add("--probe-interval-ms", type=float, default=10.0, help="pause between probe rounds")
    add("--probe-timeout", type=float, default=10.0, help="deadline of each probe call (s)")
    add("--rss-ceiling-mib", type=int, default=3072, help="stop sending once the server's RSS passes this")
    add("--server-max-import-bytes", type=int, default=64 * MIB, help="passed if the server has the flag")
    add("--server-max-connections", type=int, default=1000, help="passed if the server has the flag")
    add("--server-handshake-timeout", type=float, default=2.0, help="passed if the server has the flag")
    add("--output", type=Path, default=REPO / "bench" / "results" / "soak.json")
    add("--quick", action="store_true", help="smoke run: a few seconds per attack")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_ids = min(args.batch_ids, 10_000)
        args.import_mib = min(args.import_mib, 128)
        args.unread_messages = min(args.unread_messages, 20)
        args.connections = min(args.connections, 200)
        args.hold_seconds = min(args.hold_seconds, 1.5)
        args.attack_seconds = min(args.attack_seconds, 5.0)
        args.call_timeout = min(args.call_timeout, 30.0)
        args.baseline_seconds = min(args.baseline_seconds, 0.5)
        args.settle_seconds = min(args.settle_seconds, 0.5)
    args.attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    unknown = set(args.attacks) - set(ATTACKS)
    if unknown:
        parser.error(f"unknown attacks {sorted(unknown)}; choose from {','.join(ATTACKS)}")
    return args


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Target:
    """The server one attack runs against."""

    address: str
    metrics_address: str
    pid: int
    input_size: int
    sampler: Sampler
    args: argparse.Namespace
    server_args: list[str]

    def over_ceiling(self) -> bool:
        return self.sampler.latest_rss > int(self.args.rss_ceiling_mib) * MIB


@dataclass
class Progress:
    """What a request generator has handed to gRPC, and why it stopped."""

    count: int = 0
    stopped_by: str = ""

    def stop_reason(self, deadline: float, target: Target) -> str:
        if time.monotonic() > deadline:
            return "time"
        return "rss-ceiling" if target.over_ceiling() else ""


def _raw(message: bytes) -> bytes:
    return message


def _failure(exc: grpc.RpcError) -> tuple[str, str]:
    return exc.code().name, (exc.details() or "")[:200]


def repeated_id_batch(t: Target) -> Row:
    n = t.args.batch_ids
    expected = ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")
    inputs = np.zeros((n, t.input_size), np.float32)
    code, details, last_step = "OK", "", None
    started = time.perf_counter()
    with Client(t.address, timeout=t.args.call_timeout, options=FRESH) as client:
        try:
            reply = client.step_batch(["soak-repeat"] * n, inputs, model=MODEL, omit_state=True)
            last_step = int(reply.steps[-1])
        except grpc.RpcError as exc:
            code, details = _failure(exc)
    # An OK reply must have applied all N readings, in order, to the one stream.
    ok = code in expected and (code != "OK" or last_step == n)
    return {
        "code": code,
        "expected": expected,
        "codes_ok": ok,
        "call_s": round(time.perf_counter() - started, 2),
        "last_step": last_step,
        "details": details,
    }


def import_flood(t: Target) -> Row:
    a = t.args
    expected = ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")
    chunk = pb.SnapshotChunk(data=os.urandom(a.import_chunk_kib * 1024)).SerializeToString()
    chunks = max(1, a.import_mib * MIB // (a.import_chunk_kib * 1024))
    deadline = time.monotonic() + a.attack_seconds
    sent = Progress(stopped_by="server")  # stays "server" when the server ends the call first

    def requests() -> Iterator[bytes]:
        for _ in range(chunks):
            if reason := sent.stop_reason(deadline, t):
                sent.stopped_by = reason
                return
            sent.count += 1
            yield chunk
        sent.stopped_by = "count"

    code, details = "OK", ""
    started = time.perf_counter()
    with grpc.insecure_channel(t.address, options=[*CHANNEL_OPTIONS, *FRESH]) as channel:
        call = channel.stream_unary(
            IMPORT, request_serializer=_raw, response_deserializer=pb.ImportStatesResponse.FromString
        )
        try:
            call(requests(), timeout=a.call_timeout)
        except grpc.RpcError as exc:
            code, details = _failure(exc)
    return {
        "code": code,
        "expected": expected,
        "codes_ok": code in expected,
        "call_s": round(time.perf_counter() - started, 2),
        "sent_mib": round(sent.count * len(chunk) / MIB, 1),
        "stopped_by": sent.stopped_by,
        "ended_early": sent.stopped_by == "server",
        "details": details,
    }


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def unknown_field(number: int, payload: bytes) -> bytes:
    """A length-delimited field `number` as wire bytes; appended to a message it is an unknown field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def unread_stream(t: Target) -> Row:
    a = t.args
    expected = ("CANCELLED", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")
    reading = step_request("soak-unread", np.zeros(t.input_size, np.float32), model=MODEL)
    message = reading.SerializeToString() + unknown_field(99, bytes(a.unread_kib * 1024))
    deadline = time.monotonic() + a.attack_seconds
    finished = threading.Event()
    sent = Progress(stopped_by="blocked")  # stays "blocked" if flow control holds the sender

    def requests() -> Iterator[bytes]:
        try:
            for _ in range(a.unread_messages):
                if reason := sent.stop_reason(deadline, t):
                    sent.stopped_by = reason
                    return
                sent.count += 1
                yield message
            sent.stopped_by = "count"
        finally:
            finished.set()

    started = time.perf_counter()
    with grpc.insecure_channel(t.address, options=[*CHANNEL_OPTIONS, *FRESH]) as channel:
        call = channel.stream_stream(STEP_STREAM, request_serializer=_raw, response_deserializer=_raw)
        replies = call(requests(), timeout=a.call_timeout)  # never read
        finished.wait(a.attack_seconds + 1.0)
        time.sleep(min(1.0, a.settle_seconds))  # let the server take in what is on the wire
        rss_at_cancel = t.sampler.sample_now()[0]
        ended_by_server = not replies.is_active()
        replies.cancel()  # type: ignore[no-untyped-call]  # (untyped in grpc-stubs)
        code, details = replies.code().name, (replies.details() or "")[:200]
    return {
        "code": code,
        "expected": expected,
        "codes_ok": code in expected,
        "send_s": round(time.perf_counter() - started, 2),
        "sent_messages": sent.count,
        "sent_mib": round(sent.count * len(message) / MIB, 1),
        "stopped_by": sent.stopped_by,
        "ended_by_server": ended_by_server,
        "rss_at_cancel_mib": round(rss_at_cancel / MIB, 1),
        "details": details,
    }


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `wanted` (up to the hard limit); the new soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft if soft != resource.RLIM_INFINITY else wanted


def closed_by_peer(sockets: list[socket.socket]) -> int:
    """How many of the sockets the server has closed (EOF or reset once its bytes are drained)."""
    closed = 0
    for sock in sockets:
        sock.setblocking(False)
        try:
            while sock.recv(65536):
                pass
            closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    return closed


def idle_connections(t: Target) -> Row:
    a = t.args
    limit = raise_fd_limit(a.connections + FD_MARGIN)
    wanted = max(0, min(a.connections, limit - FD_MARGIN))
    host, port = t.address.rsplit(":", 1)
    deadline = time.monotonic() + a.attack_seconds
    sockets: list[socket.socket] = []
    failures: Counter[str] = Counter()
    started = time.perf_counter()
    try:
        for _ in range(wanted):
            if time.monotonic() > deadline:
                break
            try:
                sock = socket.create_connection((host, int(port)), timeout=2.0)
            except OSError as exc:
                failures[type(exc).__name__] += 1
                continue
            sockets.append(sock)
            try:
                sock.sendall(PREFACE)
            except OSError as exc:
                failures[f"send {type(exc).__name__}"] += 1
        open_s = time.perf_counter() - started
        metrics = fetch_metrics(t.metrics_address)
        # A new client every half second while they are open: when (if ever) is it served?
        checks: list[Row] = []
        hold_end = time.perf_counter() + a.hold_seconds
        while not checks or time.perf_counter() < hold_end:
            at = time.perf_counter() - started
            checks.append({"at_s": round(at, 2), **served(t.address, t.input_size)})
            time.sleep(max(0.0, min(0.5, hold_end - time.perf_counter())))
        closed = closed_by_peer(sockets)
    finally:
        for sock in sockets:
            sock.close()
    # At --max-connections the server may refuse a newcomer (UNAVAILABLE) until its handshake
    # timeout frees the slots; the last check, after the hold, must be served.
    at_cap = "--max-connections" in t.server_args and len(sockets) >= a.server_max_connections
    early = {"OK", "UNAVAILABLE"} if at_cap else {"OK"}
    ok = (
        all(c["code"] in early for c in checks)
        and checks[-1]["code"] == "OK"
        and metrics["status"] in (200, None)
    )
    return {
        "code": checks[-1]["code"],
        "expected": ("OK", "UNAVAILABLE until freed") if at_cap else ("OK",),
        "codes_ok": ok,
        "wanted": wanted,
        "opened": len(sockets),
        "failures": dict(failures),
        "open_s": round(open_s, 2),
        "closed_by_server": closed,
        "new_client": checks,
        "first_served_s": next((c["at_s"] for c in checks if c["code"] == "OK"), None),
        "metrics": metrics,
        "client_fd_limit": limit,
    }


ATTACKS: dict[str, Callable[[Target], Row]] = {
    "repeated-id-batch": repeated_id_batch,
    "import-flood": import_flood,
    "unread-stream": unread_stream,
    "idle-connections": idle_connections,
}


def params(name: str, a: argparse.Namespace) -> Row:
    return {
        "repeated-id-batch": {"ids": a.batch_ids},
        "import-flood": {"total_mib": a.import_mib, "chunk_kib": a.import_chunk_kib},
        "unread-stream": {"messages": a.unread_messages, "unknown_field_kib": a.unread_kib},
        "idle-connections": {"connections": a.connections, "hold_s": a.hold_seconds},
    }[name] | {"attack_seconds": a.attack_seconds, "rss_ceiling_mib": a.rss_ceiling_mib}


def server_flags() -> set[str]:
    """The options `cellstream serve --help` lists (the hardening flags are landing meanwhile)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLSTREAM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    help_text = subprocess.run(
        [sys.executable, "-m", "cellstream", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
        check=False,
    ).stdout
    return set(re.findall(r"--[a-z][a-z0-9-]*", help_text))


def hardening_args(a: argparse.Namespace, flags: set[str]) -> list[str]:
    wanted = {
        "--max-import-bytes": str(a.server_max_import_bytes),
        "--max-connections": str(a.server_max_connections),
        "--handshake-timeout": f"{a.server_handshake_timeout:g}",
    }
    return [part for flag, value in wanted.items() if flag in flags for part in (flag, value)]


def _loopback(address: str) -> str:
    if address and not address.startswith("127.0.0.1:"):
        raise RuntimeError(f"server reported {address}; soak attacks only 127.0.0.1")
    return address


def _mib(value: int) -> float:
    return round(value / MIB, 1)


def run_attack(name: str, a: argparse.Namespace, workdir: Path, extra: list[str]) -> Row:
    server = launch(f"soak-{name}", cellstream_command(a.models, MODEL, *extra), workdir)
    try:
        ready = json.loads((workdir / f"soak-{name}.ready.json").read_text())
        address, metrics_address = _loopback(server.address), _loopback(ready.get("metrics_address", ""))
        with Client(address, timeout=10.0) as client:
            input_size = next(int(m.input_size) for m in client.list_models() if m.name == MODEL)
        limit = a.baseline_seconds + a.attack_seconds + a.call_timeout + a.hold_seconds + 120
        fd_limit = psutil.Process(server.pid).rlimit(psutil.RLIMIT_NOFILE)[0]
        with (
            Sampler(server.pid, limit=limit) as sampler,
            Probe(address, MODEL, input_size, a.probe_interval_ms / 1000, a.probe_timeout, limit) as probe,
        ):
            idle = Window(time.monotonic(), time.monotonic() + a.baseline_seconds)
            time.sleep(a.baseline_seconds)
            rss_before, fds_before = sampler.sample_now()
            groups = {"server": [server.pid], "probe": [probe.pid], "bench": [os.getpid()]}
            target = Target(address, metrics_address, server.pid, input_size, sampler, a, extra)
            cpu_before, started = cpu.snapshot(groups), time.monotonic()
            result = ATTACKS[name](target)
            ended, cpu_after = time.monotonic(), cpu.snapshot(groups)
            time.sleep(a.settle_seconds)
            rss_after, fds_after = sampler.sample_now()
            settled = time.monotonic()
            served_after = served(address, input_size)
        alive = server.process.poll() is None
    finally:
        exit_code = server.stop()
    attack = Window(started, ended).summary(probe.samples)
    return {
        "attack": name,
        "params": params(name, a),
        "server_args": extra,
        "result": result,
        "codes_ok": result["codes_ok"],
        "attack_s": round(ended - started, 2),
        # The peak spans the attack and the settle after it: a server may free or grow late.
        "rss_mib": {
            "before": _mib(rss_before),
            "peak": _mib(max(peak(sampler.rss, started, settled), rss_before)),
            "after": _mib(rss_after),
        },
        "fds": {
            "before": fds_before,
            "peak": max(peak(sampler.fds, started, settled), fds_before),
            "after": fds_after,
            "limit": fd_limit,
        },
        "stall_ms": attack["stall_ms"],
        "probe": {"idle": idle.summary(probe.samples), "attack": attack},
        "served_after": served_after,
        "server_alive_after": alive,
        "server_exit": exit_code,
        "cpu": cpu.usage(cpu_before, cpu_after),
    }


def table(lines: list[Row]) -> str:
    def ms(probe: Row, kind: str) -> str:
        return f"{probe[kind]['p50_ms']} / {probe[kind]['max_ms']}"

    rows = []
    for line in lines:
        if "error" in line:
            rows.append([line["attack"], "ERROR", line["error"][:60], *["-"] * 8])
            continue
        r, rss, probe = line["result"], line["rss_mib"], line["probe"]
        rows.append(
            [
                line["attack"],
                "yes" if line["codes_ok"] else "NO",
                r["code"],
                f"{line['attack_s']:.2f}",
                f"{rss['before']} / {rss['peak']} / {rss['after']}",
                str(line["fds"]["peak"]),
                f"{probe['idle']['stall_ms']} / {line['stall_ms']}",
                ms(probe["attack"], "health"),
                ms(probe["attack"], "step"),
                line["served_after"]["code"],
                f"{line['cpu'].get('server', 0):.2f} / {line['cpu'].get('other', 0):.2f}",
            ]
        )
    header = [
        "attack",
        "codes ok",
        "code",
        "attack s",
        "RSS MiB before / peak / after",
        "fds peak",
        "stall ms idle / attack",
        "health ms p50 / max",
        "step ms p50 / max",
        "served after",
        "cores server / other",
    ]
    return markdown(header, rows)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    started = time.perf_counter()
    load_before = cpu.idle_load(a.baseline_seconds)
    log(f"{cpu.CORES} cores; before the run: {load_before}")
    extra = hardening_args(a, server_flags())
    log(f"server hardening flags passed: {extra or 'none (the server lists none of them yet)'}")
    lines: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="cellstream-soak-") as tmp:
        for name in a.attacks:
            log(f"{name}: {params(name, a)}")
            try:
                line = run_attack(name, a, Path(tmp), extra)
            except Exception as exc:  # one broken attack must not hide the others' figures
                traceback.print_exc()
                line = {"attack": name, "error": f"{type(exc).__name__}: {exc}"}
            lines.append(line)
            print(json.dumps(line), flush=True)
    document: Row = {
        "command": " ".join(["python -m bench.soak", *(argv if argv is not None else sys.argv[1:])]),
        "elapsed_s": round(time.perf_counter() - started, 1),
        "load_before": load_before,
        "load_after": cpu.idle_load(a.baseline_seconds),
        "server_args": extra,
        "attacks": lines,
    }
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(json.dumps(document, indent=1))
    print()
    print(
        f"machine: {cpu.CORES} cores; other load before/after: {load_before['other']}/"
        f"{document['load_after']['other']} cores (load average {load_before['loadavg_1m']:.2f}); "
        f"server flags: {' '.join(extra) or 'defaults'}"
    )
    print()
    print(table(lines))
    log(f"done in {document['elapsed_s']} s; JSON in {a.output}")
    return 1 if any("error" in line for line in lines) else 0


if __name__ == "__main__":
    raise SystemExit(main())
