"""The batcher's knobs: limits from Settings, and the scheduling heuristics with their defaults.

Why each heuristic exists and what it was measured to gain is in docs/performance.md; tests and
benchmarks build their own policy (`dataclasses.replace`) instead of patching module state.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sized
from dataclasses import dataclass, field, replace

from cellstream.config import Settings
from cellstream.model import CellModel


@dataclass(frozen=True)
class BatchPolicy:
    """How one model's batcher admits, schedules and splits work."""

    max_batch: int = 2048  # most readings in one session.run
    max_queue: int = 0  # readings waiting before RESOURCE_EXHAUSTED (0 = no limit)
    inline_batch: int = 256  # plans this small run on the event loop: cheaper than a thread hand-off
    compute_threads: int = 1  # threads sharing the session.run calls of one large plan
    runs_per_trip: int = 8  # runs of max_batch per trip to the worker thread
    parallel_run_min: int = 256  # runs smaller than this stay on one thread
    # A reading may run at once, in its caller's callback, only after the batcher was idle this long
    # (under steady load the next request is about to arrive and should share the run).
    quiet_seconds: float = 0.0005
    # Before planning, let this many loop iterations (and at most this long) deliver arriving
    # requests into the same run; not at all once `settle_enough` readings wait.
    settle_rounds: int = 64
    settle_seconds: float = 0.001
    settle_enough: int = 256
    # Ids a large StepBatch's checks, admission and stream creation handle per turn of the event
    # loop: the loop is never held for a whole batch of 100,000 new streams (dict inserts).
    check_chunk: int = 2048
    # Grow a store's slabs (a copy of all of them) on the worker thread, ahead of need, once
    # fewer than this share of its rows are free, rather than on the loop when a create runs out.
    grow_when_spare: float = 0.25
    clock: Callable[[], float] = field(default=time.perf_counter, compare=False)  # seconds

    @classmethod
    def from_settings(cls, settings: Settings) -> BatchPolicy:
        return cls(
            max_batch=settings.max_batch,
            max_queue=settings.max_queue,
            inline_batch=settings.inline_batch,
            compute_threads=settings.compute_threads,
        )

    def for_model(self, model: CellModel) -> BatchPolicy:
        """The policy of one model: its config's max_batch caps the server's."""
        return replace(self, max_batch=max(1, min(self.max_batch, model.config_max_batch or self.max_batch)))

    @property
    def plan_limit(self) -> int:
        """Most readings in one trip to the worker: several runs, fewer hand-offs."""
        return self.max_batch * max(1, self.runs_per_trip)

    def chunks(self, n: int) -> list[tuple[int, int]]:
        """A plan of n readings as equal runs, as many as the compute threads take evenly: 10,000
        readings at max_batch 2048 on 2 threads run as 6 x 1,667 rather than 4 x 2,048 + 1,808."""
        runs = -(-n // self.max_batch)
        if self.compute_threads > 1 and self.max_batch >= self.parallel_run_min:
            runs = -(-runs // self.compute_threads) * self.compute_threads
        size = -(-n // runs)
        return [(start, min(start + size, n)) for start in range(0, n, size)]

    def parallel(self, n: int) -> bool:
        """Whether a plan of n readings is split over the compute threads."""
        return self.compute_threads > 1 and n > self.max_batch and self.max_batch >= self.parallel_run_min


def ready_callbacks(loop: asyncio.AbstractEventLoop) -> Sized | None:
    """The loop's queue of callbacks ready to run, where the loop exposes one (asyncio's does;
    uvloop's does not, and then the batcher falls back on what it can see: arrivals and time)."""
    ready = getattr(loop, "_ready", None)
    return ready if isinstance(ready, Sized) else None
