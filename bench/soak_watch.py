"""What `bench.soak` measures around an attack: the server's memory and fds, its stalls, and
whether a newcomer (a new gRPC client, a /metrics scrape) is still served.

The stall probe lives in its own process (spawned: grpc does not survive a fork) so that the
attack's client work in the bench process cannot delay the probe and pass for a server stall.
Probe and sampler timestamp every sample with time.monotonic() (one clock for all processes on
Linux), so the bench cuts their records into an idle window and an attack window afterwards.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from types import TracebackType

import grpc
import numpy as np
import psutil

from cellstream.client import Client

from .report import Row

# (started at, "health" or "step", round trip in s, status code name)
Sample = tuple[float, str, float, str]
PROBE_STREAM = "soak-probe"
MODEL = "gru"
FRESH = [("grpc.use_local_subchannel_pool", 1)]  # a channel of its own connection, not a shared one


def probe_loop(
    address: str,
    model: str,
    input_size: int,
    interval: float,
    call_timeout: float,
    max_seconds: float,
    ready: Event,
    stop: Event,
    sink: Connection,
) -> None:
    """Child process: Health/Check and one-reading Steps, each in its own loop, until told to stop.

    Two threads on two connections, so a stall of one RPC does not hide whether the other is
    answered meanwhile.
    """
    reading = np.zeros(input_size, np.float32)
    samples: dict[str, list[Sample]] = {"health": [], "step": []}
    answered = {kind: threading.Event() for kind in samples}
    end = time.monotonic() + max_seconds

    def loop(kind: str) -> None:
        with Client(address, timeout=call_timeout, options=FRESH) as client:
            while not stop.is_set() and time.monotonic() < end:
                started = time.monotonic()
                code = "OK"
                try:
                    if kind == "step":
                        client.step(PROBE_STREAM, reading, model=model, omit_state=True)
                    elif not client.health():
                        code = "NOT_SERVING"
                except grpc.RpcError as exc:
                    code = exc.code().name
                samples[kind].append((started, kind, time.monotonic() - started, code))
                if code == "OK":
                    answered[kind].set()
                stop.wait(interval)

    threads = [threading.Thread(target=loop, args=(kind,), daemon=True) for kind in samples]
    for thread in threads:
        thread.start()
    while not ready.is_set() and not stop.is_set() and time.monotonic() < end:
        if all(event.wait(0.05) for event in answered.values()):
            ready.set()
    for thread in threads:
        thread.join(call_timeout + 5.0)
    sink.send(samples["health"] + samples["step"])
    sink.close()


class Probe:
    """The stall probe process: started on enter, stopped (by its pid, if need be) on exit."""

    def __init__(
        self, address: str, model: str, input_size: int, interval: float, call_timeout: float, limit: float
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self._ready, self._stop = context.Event(), context.Event()
        self._mine, theirs = context.Pipe(duplex=False)
        self._limit = limit
        self._process = context.Process(
            target=probe_loop,
            args=(address, model, input_size, interval, call_timeout, limit, self._ready, self._stop, theirs),
            daemon=True,
            name="soak-probe",
        )
        self.samples: list[Sample] = []

    @property
    def pid(self) -> int:
        return self._process.pid or 0

    def __enter__(self) -> Probe:
        self._process.start()
        if not self._ready.wait(60.0):
            self._halt()
            raise RuntimeError("the stall probe got no answer from the server within 60 s")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._mine.poll(30.0):
            self.samples = self._mine.recv()
        self._halt()

    def _halt(self) -> None:
        self._process.join(5.0)
        if self._process.is_alive():
            self._process.terminate()  # SIGTERM to the probe's own pid
            self._process.join(5.0)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5.0)


class Sampler:
    """A thread that reads the server's RSS every `interval` s (and its open fds every 5th time)."""

    def __init__(self, pid: int, interval: float = 0.02, limit: float = 900.0) -> None:
        self._process = psutil.Process(pid)
        self._interval, self._limit = interval, limit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)
        self.rss: list[tuple[float, int]] = []
        self.fds: list[tuple[float, int]] = []
        self.latest_rss: int = self._process.memory_info().rss

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        end = time.monotonic() + self._limit
        tick = 0
        while not self._stop.is_set() and time.monotonic() < end:
            try:
                now = time.monotonic()
                self.latest_rss = self._process.memory_info().rss
                self.rss.append((now, self.latest_rss))
                if tick % 5 == 0:
                    self.fds.append((now, self._process.num_fds()))
            except psutil.Error:
                return  # the server is gone; the bench reports that
            tick += 1
            self._stop.wait(self._interval)

    def sample_now(self) -> tuple[int, int]:
        """The server's RSS and fd count read at this moment (0, 0 if it is gone)."""
        try:
            return self._process.memory_info().rss, self._process.num_fds()
        except psutil.Error:
            return 0, 0


def peak(series: Sequence[tuple[float, int]], start: float, end: float) -> int:
    return max((v for t, v in series if start <= t <= end), default=0)


@dataclass(frozen=True)
class Window:
    """The probe's samples that started between `start` and `end` (monotonic seconds)."""

    start: float
    end: float

    def summary(self, samples: Sequence[Sample]) -> Row:
        inside = [s for s in samples if self.start <= s[0] <= self.end]
        row: Row = {"seconds": round(self.end - self.start, 2)}
        for kind in ("health", "step"):
            ms = np.array([s[2] * 1000 for s in inside if s[1] == kind])
            codes = Counter(s[3] for s in inside if s[1] == kind)
            # A call stuck across the whole window shows as a gap between starts, not as a sample.
            starts = sorted(s[0] for s in inside if s[1] == kind)
            gaps = np.diff([self.start, *starts, self.end])
            row[kind] = {
                "n": int(ms.size),
                "p50_ms": round(float(np.median(ms)), 2) if ms.size else None,
                "p99_ms": round(float(np.percentile(ms, 99)), 2) if ms.size else None,
                "max_ms": round(float(ms.max()), 2) if ms.size else None,
                "longest_gap_ms": round(float(gaps.max()) * 1000, 2),
                "errors": {code: n for code, n in codes.items() if code != "OK"},
            }
        maxima = [row[k]["max_ms"] for k in ("health", "step") if row[k]["max_ms"] is not None]
        row["stall_ms"] = max(maxima, default=None)
        return row


def served(address: str, input_size: int) -> Row:
    """Whether a new client, on a connection of its own, gets health and a Step answered; how fast."""
    started = time.perf_counter()
    code = "OK"
    try:
        with Client(address, timeout=10.0, options=FRESH) as client:
            if not client.health():
                code = "NOT_SERVING"
            client.step("soak-new-client", np.zeros(input_size, np.float32), model=MODEL, omit_state=True)
    except grpc.RpcError as exc:
        code = exc.code().name
    return {"code": code, "ms": round((time.perf_counter() - started) * 1000, 1)}


def fetch_metrics(metrics_address: str) -> Row:
    if not metrics_address:
        return {"status": None, "ms": None, "bytes": 0}
    started = time.perf_counter()
    status: int | str
    size = 0
    try:
        with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10.0) as reply:
            size, status = len(reply.read()), reply.status
    except (urllib.error.URLError, OSError) as exc:
        status = type(exc).__name__
    return {"status": status, "ms": round((time.perf_counter() - started) * 1000, 1), "bytes": size}
