"""What a batcher is given (work items) and what it gives back (numpy results, never bytes)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import numpy as np

from cellstream.model import ReplyLayout
from cellstream.streams.store import StateStore

if TYPE_CHECKING:
    from cellstream.batching.plan import Waves

T = TypeVar("T")
R_contra = TypeVar("R_contra", contravariant=True)


class Sink(Protocol[R_contra]):
    """Where a reading's outcome goes: an asyncio.Future, or anything that behaves like one for
    these three calls (a StepStream call collects its replies in order without a future each)."""

    def done(self) -> bool: ...

    def set_result(self, result: R_contra, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


@dataclass(slots=True)
class RunOutput:
    """What one run produced; each reading's reply is one row of it (views, not copies)."""

    outputs: np.ndarray  # (n, output_size) float32
    states: list[np.ndarray]  # per state: (n, *shape) float32
    names: tuple[str, ...]
    layout: ReplyLayout
    # When the run ran (wall clock, ns; 0 for a replayed reply), for traces; `started` is the
    # same instant on perf_counter, to tell a reading's queue wait.
    run_id: int = 0
    started: float = 0.0
    started_ns: int = 0
    ended_ns: int = 0
    # Kept for a protocol layer that derives something once per run (its encoded rows) rather
    # than once per reply; the batcher never reads it.
    memo: Any = None


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ is slower, and this is per reading
class StepResult:
    """The reply to one reading: row `index` of its run."""

    stream_id: str
    run: RunOutput
    index: int
    step: int
    want_state: bool = True
    replayed: bool = False
    enqueued: float = 0.0  # perf_counter when its work was queued

    @property
    def size(self) -> int:
        """Readings in the run that answered this one."""
        return len(self.run.outputs)

    @property
    def queue_ms(self) -> float:
        return max(0.0, (self.run.started - self.enqueued) * 1000) if self.run.started else 0.0

    @property
    def output(self) -> np.ndarray:
        output: np.ndarray = self.run.outputs[self.index]
        return output

    @property
    def state(self) -> dict[str, np.ndarray] | None:
        if not self.want_state:
            return None
        return {name: value[self.index] for name, value in zip(self.run.names, self.run.states, strict=True)}


@dataclass(frozen=True)
class BatchResult:
    """Row i answers reading i of a StepBatch."""

    outputs: np.ndarray
    states: dict[str, np.ndarray] | None
    steps: np.ndarray


@dataclass(eq=False, slots=True)
class StepWork:
    """One reading of one stream, with the per-step options of the Step RPC."""

    stream_id: str
    x: np.ndarray
    future: Sink[StepResult]
    seq: int = 0
    reset: bool = False
    replace: list[np.ndarray | None] | None = None
    end: bool = False
    want_state: bool = True
    deadline: float | None = None
    enqueued: float = field(default_factory=time.perf_counter)
    # Set when the stream moves here from another model version: run only once it left there.
    after: asyncio.Future[Any] | None = None


@dataclass(eq=False)
class BatchWork:
    """N readings of N streams (ids may repeat), as the engine validated them."""

    stream_ids: list[str]
    x: np.ndarray
    future: asyncio.Future[BatchResult]
    waves: Waves  # positions, each stream at most once per wave (plan.plan_waves)
    want_state: bool = True
    deadline: float | None = None
    enqueued: float = field(default_factory=time.perf_counter)
    # StateStore.lookup rows and the store's generation then, worked out in the handler so that
    # the batcher (between runs) has less to do.
    looked_up: tuple[np.ndarray, int] | None = None
    progress: BatchProgress | None = None  # set once the batcher has resolved its rows
    # A large batch's positions without a row when it was checked: the batcher creates their
    # streams a chunk per turn (`created_to` so far), remembering the streams it made for it.
    missing: np.ndarray | None = None
    created_to: int = 0
    created: list[str] = field(default_factory=list)

    @property
    def readings(self) -> int:
        return len(self.stream_ids)


class BatchProgress:
    """A StepBatch being applied wave by wave over one or more plans: its rows, what is still to
    run, and the results gathered so far."""

    def __init__(self, work: BatchWork, rows: np.ndarray) -> None:
        self.work = work
        self.rows = rows
        self.waves = work.waves
        # Every row of the batch once, to hold its streams against later work while it runs.
        self.distinct_rows = rows if len(self.waves) <= 1 else np.unique(rows)
        self.waiting = work.readings  # readings not yet planned
        self.left = work.readings  # readings not yet answered
        self.outputs: np.ndarray | None = None
        self.states: list[np.ndarray] | None = None
        self.steps: np.ndarray | None = None

    def stop(self) -> None:
        """Plan nothing more of it (it failed). Its unplanned readings stay counted in `waiting`
        until the batcher meets it in the queue again and drops it."""
        self.waves.clear()
        self.left = 0

    def record(
        self, take: np.ndarray, outputs: np.ndarray, states: list[np.ndarray], steps: np.ndarray
    ) -> bool:
        """Keep the results of positions `take` (rows of one run); True once every reading has one."""
        work = self.work
        n = work.readings
        in_order = bool(take[-1] - take[0] == len(take) - 1 and (take[1:] > take[:-1]).all())
        if len(take) == n and in_order:
            # The whole batch ran in one plan, in order: its results are views, no copies.
            self.outputs, self.steps = outputs, steps
            if work.want_state:
                self.states = states
        else:
            if self.outputs is None or self.steps is None:
                self.outputs = np.empty((n, outputs.shape[1]), np.float32)
                self.steps = np.empty(n, np.uint64)
                if work.want_state:
                    self.states = [np.empty((n, *value.shape[1:]), np.float32) for value in states]
            where = slice(int(take[0]), int(take[-1]) + 1) if in_order else take
            self.outputs[where] = outputs
            self.steps[where] = steps
            if self.states is not None:
                for out, value in zip(self.states, states, strict=True):
                    out[where] = value
        self.left -= len(take)
        return not self.left

    def result(self, names: tuple[str, ...]) -> BatchResult:
        assert self.outputs is not None and self.steps is not None
        states = None if self.states is None else dict(zip(names, self.states, strict=True))
        return BatchResult(self.outputs, states, self.steps)


@dataclass(eq=False)
class ControlWork(Generic[T]):
    """A read or write of one stream outside a model run, ordered with that stream's readings."""

    stream_id: str
    action: Callable[[StateStore, int | None], T]
    future: asyncio.Future[T]


Work = StepWork | BatchWork | ControlWork[Any]
