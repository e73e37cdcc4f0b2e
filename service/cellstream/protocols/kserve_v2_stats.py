"""Triton's per-model statistics (the ModelStatistics RPC) of the requests this protocol served.

Triton's figures are cumulative counts and nanoseconds per request: its whole time (success or
fail), its wait for a batch (queue), the decode before it was queued (compute_input), the batched
run that answered it (compute_infer: every request of a run counts the whole run, as in Triton)
and the encode after (compute_output). The server-wide view of every protocol's traffic is the
cellstream_* Prometheus metrics; these are what a Triton tool such as perf_analyzer reads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from cellstream._proto.inference import grpc_service_pb2 as pb
from cellstream.engine import StepResult


@dataclass(slots=True)
class Duration:
    count: int = 0
    seconds: float = 0.0  # (turned into Triton's integer nanoseconds only when asked)

    def add(self, seconds: float) -> None:
        self.count += 1
        self.seconds += seconds

    def message(self) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=self.count, ns=max(0, round(self.seconds * 1e9)))


@dataclass(slots=True)
class VersionStatistics:
    """One model version's cumulative figures."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    execution_count: int = 0
    last_inference_ns: int = 0  # wall clock
    last_run: int = -1

    def message(self, name: str, version: str) -> pb.ModelStatistics:
        return pb.ModelStatistics(
            name=name,
            version=version,
            last_inference=self.last_inference_ns // 1_000_000,
            inference_count=self.success.count,
            execution_count=self.execution_count,
            inference_stats=pb.InferStatistics(
                success=self.success.message(),
                fail=self.fail.message(),
                queue=self.queue.message(),
                compute_input=self.compute_input.message(),
                compute_infer=self.compute_infer.message(),
                compute_output=self.compute_output.message(),
            ),
        )


class Statistics:
    """The figures of every model version that served a request of this protocol."""

    def __init__(self) -> None:
        self._versions: dict[tuple[str, str], VersionStatistics] = {}

    def of(self, name: str, version: str) -> VersionStatistics:
        found = self._versions.get((name, version))
        if found is None:
            found = self._versions[(name, version)] = VersionStatistics()
        return found

    def succeeded(
        self, name: str, version: str, result: StepResult, *, arrived: float, queued: float
    ) -> None:
        """Count a request answered by `result`; times on time.perf_counter(), taken now as its end."""
        ended = time.perf_counter()
        stats = self.of(name, version)
        stats.success.add(ended - arrived)
        stats.compute_input.add(queued - arrived)
        run = result.run
        if run.started:  # (0 for a reply replayed without a run)
            ran = (run.ended_ns - run.started_ns) / 1e9
            stats.queue.add(result.queue_ms / 1000)
            stats.compute_infer.add(ran)
            stats.compute_output.add(ended - (run.started + ran))
            if run.run_id != stats.last_run:  # the replies of one run are resolved together
                stats.last_run = run.run_id
                stats.execution_count += 1
            stats.last_inference_ns = run.ended_ns
        else:
            stats.last_inference_ns = time.time_ns()

    def failed(self, name: str, version: str, *, arrived: float) -> None:
        self.of(name, version).fail.add(time.perf_counter() - arrived)
