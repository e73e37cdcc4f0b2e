"""One batcher per model: gathers waiting readings into one onnxruntime run.

Rules: no added delay (work that arrives during a run forms the next batch), at most
`max_batch` readings per run, never one stream twice in a run, each stream's readings in
arrival order. The batcher task is the only writer of its StateStore: it touches the slabs
between runs on the event loop, and the executor thread touches them only during a run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from cellstream import metrics
from cellstream.errors import (
    CellStreamError,
    DeadlineExpired,
    ModelFailure,
    Overloaded,
    StaleSequence,
)
from cellstream.model import CellModel
from cellstream.state import BusyRows, StateStore

log = logging.getLogger(__name__)
# Runs smaller than this stay on one thread: a hand-off costs more than they take.
PARALLEL_RUN_MIN = 256
# A reading may run at once, in its caller's callback, only once the batcher has been idle this
# long: under steady load requests arrive every 0.1-0.3 ms and should share runs instead; at one
# call in flight the next arrives ~0.8 ms after the last run (the client's round trip).
QUIET_SECONDS = 0.0005
# Most loop iterations a batcher lets pass (gathering arriving requests) before it plans a run.
# Measured on `unary` (64 streams): 0 rounds: 1.1 readings per run; 8: 1.7; 64: ~10 and +30 %
# steps/s; more rounds gained nothing.
SETTLE_ROUNDS = 64
# ... and at most this long, however much work the other callbacks of those iterations do.
SETTLE_SECONDS = 0.001
# ... and not at all once this many readings wait: their run is amortized already (a StepBatch).
SETTLE_ENOUGH = 256
T = TypeVar("T")
R_contra = TypeVar("R_contra", contravariant=True)


class Sink(Protocol[R_contra]):
    """Where a reading's outcome goes: an asyncio.Future, or anything that behaves like one for
    these three calls (a StepStream call collects its replies in order without a future each)."""

    def done(self) -> bool: ...

    def set_result(self, result: R_contra, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: a cheap cache key per model
class Layout:
    """A model's reply shape: what a reply encoder needs to know, made once per batcher."""

    output_size: int
    states: tuple[tuple[str, tuple[int, ...]], ...]


@dataclass(slots=True)
class RunOutput:
    """What one run produced; each reading's reply is one row of it (views, not copies)."""

    outputs: np.ndarray  # (n, output_size) float32
    states: list[np.ndarray]  # per state: (n, *shape) float32
    names: tuple[str, ...]
    layout: Layout
    _encoded: tuple[bytes, list[bytes]] | None = None

    def as_bytes(self) -> tuple[bytes, list[bytes]]:
        """The whole run's outputs and states as little-endian float32 bytes, made once per run:
        slicing a reply's row out of them is far cheaper than converting each row on its own."""
        if self._encoded is None:
            self._encoded = (
                self.outputs.astype("<f4", copy=False).tobytes(),
                [value.astype("<f4", copy=False).tobytes() for value in self.states],
            )
        return self._encoded


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ is ~2x slower, per reading
class StepResult:
    """The reply to one reading: row `index` of its run."""

    stream_id: str
    run: RunOutput
    index: int
    step: int
    want_state: bool = True
    replayed: bool = False

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
    """N readings of N streams (ids may repeat); applied in waves so a stream is once per run."""

    stream_ids: list[str]
    x: np.ndarray
    future: asyncio.Future[BatchResult]
    want_state: bool = True
    deadline: float | None = None
    enqueued: float = field(default_factory=time.perf_counter)
    rows: np.ndarray | None = None
    # Worked out when the request came in, so that the batcher (between runs) has less to do:
    looked_up: tuple[np.ndarray, int] | None = None  # StateStore.lookup rows and its generation
    waves: deque[np.ndarray] = field(default_factory=deque)
    outputs: np.ndarray | None = None
    states: list[np.ndarray] | None = None
    steps: np.ndarray | None = None
    left: int = 0


@dataclass(eq=False)
class ControlWork(Generic[T]):
    """A read or write of one stream outside a model run, ordered with that stream's readings."""

    stream_id: str
    action: Callable[[StateStore, int | None], T]
    future: asyncio.Future[T]


Work = StepWork | BatchWork | ControlWork[Any]


@dataclass
class Plan:
    """What one trip to the worker applies: single readings first, then StepBatch pieces.

    Built with plain lists (one append per reading) and turned into arrays once, in the worker.
    """

    singles: list[StepWork] = field(default_factory=list)
    single_rows: list[int] = field(default_factory=list)
    single_steps: list[int] = field(default_factory=list)
    resets: list[int] = field(default_factory=list)  # indexes into singles
    replacements: list[tuple[int, list[np.ndarray | None]]] = field(default_factory=list)
    piece_rows: list[np.ndarray] = field(default_factory=list)
    piece_x: list[np.ndarray] = field(default_factory=list)
    piece_steps: list[np.ndarray] = field(default_factory=list)
    pieces: list[tuple[BatchWork, np.ndarray, int]] = field(default_factory=list)  # offset after singles
    piece_size: int = 0
    new_singles: list[int] = field(default_factory=list)  # indexes into singles of streams to create

    def drop_failed_singles(self) -> None:
        """Take out the singles whose stream could not be created (row -1), renumbering the rest."""
        keep = [i for i, row in enumerate(self.single_rows) if row >= 0]
        renumber = {old: new for new, old in enumerate(keep)}
        self.singles = [self.singles[i] for i in keep]
        self.single_rows = [self.single_rows[i] for i in keep]
        self.single_steps = [self.single_steps[i] for i in keep]
        self.resets = [renumber[i] for i in self.resets if i in renumber]
        self.replacements = [(renumber[i], r) for i, r in self.replacements if i in renumber]

    @property
    def size(self) -> int:
        return len(self.singles) + self.piece_size


def plan_waves(stream_ids: list[str], rows: np.ndarray | None = None) -> deque[np.ndarray]:
    """Split positions so each wave holds a stream at most once, keeping every stream's order.

    `rows`: the streams' rows when all are known; distinct streams have distinct rows, so a mask
    over them tells a batch without repeats ~10x faster than hashing the ids into a set.
    """
    n = len(stream_ids)
    if rows is not None and n and int(rows.min()) >= 0:
        marked = np.zeros(int(rows.max()) + 1, bool)
        marked[rows] = True
        if np.count_nonzero(marked) == n:
            return deque([np.arange(n)])
    elif len(set(stream_ids)) == n:
        return deque([np.arange(n)])
    seen: dict[str, int] = {}
    occurrence = np.empty(n, np.int64)
    for i, stream_id in enumerate(stream_ids):
        occurrence[i] = seen[stream_id] = seen.get(stream_id, -1) + 1
    order = np.argsort(occurrence, kind="stable")
    bounds = np.cumsum(np.bincount(occurrence))[:-1]
    return deque(np.split(order, bounds))


class Batcher:
    """Runs one model over the waiting readings of many streams, one run at a time."""

    def __init__(
        self,
        model: CellModel,
        store: StateStore,
        *,
        max_batch: int,
        max_queue: int = 0,
        inline_batch: int = 0,
        runs_per_trip: int = 8,
        compute_threads: int = 1,
    ) -> None:
        self.model = model
        self.store = store
        self.layout = Layout(model.output_size, tuple((spec.name, tuple(spec.shape)) for spec in store.specs))
        self.max_batch = max(1, min(max_batch, model.config_max_batch or max_batch))
        # A trip to the worker thread runs up to this many readings as consecutive session.run
        # calls of max_batch each: fewer hand-offs, and the loop meanwhile decodes what comes next.
        self.plan_limit = self.max_batch * max(1, runs_per_trip)
        # Plans this small run on the event loop: their compute is shorter than a thread hand-off.
        self.inline_batch = inline_batch
        self.max_queue = max_queue
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: deque[Work] = deque()
        self._queued = 0  # readings waiting, for --max-queue
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        # Actions that need the store to themselves (snapshot copies, expiry): run between runs.
        self._between: list[tuple[Callable[[StateStore], Any], asyncio.Future[Any]]] = []
        # Extra threads for the runs of one big plan (onnxruntime releases the GIL while it runs).
        self._compute_threads = compute_threads
        self._compute = (
            ThreadPoolExecutor(max_workers=compute_threads, thread_name_prefix=f"cellstream-{model.name}-run")
            if compute_threads > 1
            else None
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"cellstream-{model.name}")
        self._task: asyncio.Task[None] | None = None
        self._taking: Work | None = None  # the work being looked at during assembly
        self._in_hand = Plan()  # the plan being run, failed as a whole if the batcher itself breaks
        # While set and not done, no work runs (a new version waiting for its streams to arrive).
        self.hold: asyncio.Future[None] | None = None
        self._idle_since = 0.0  # when the task last parked (perf_counter)
        name = model.name
        self._m_queue = metrics.QUEUE_DURATION.labels(model=name)
        self._m_compute = metrics.COMPUTE_DURATION.labels(model=name)
        self._m_batch = metrics.BATCH_SIZE.labels(model=name)
        self._m_steps = metrics.STEPS.labels(model=name)
        self._m_depth = metrics.QUEUE_DEPTH.labels(model=name)
        self._m_full = metrics.REJECTIONS.labels(model=name, reason="queue_full")
        self._m_deadline = metrics.REJECTIONS.labels(model=name, reason="deadline")
        self._m_cancelled = metrics.REJECTIONS.labels(model=name, reason="cancelled")

    @property
    def key(self) -> tuple[str, str]:
        return self.store.key

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run_forever(), name=f"batcher-{self.model.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._executor.shutdown(wait=True)
        if self._compute is not None:
            self._compute.shutdown(wait=True)

    async def wait_idle(self) -> None:
        await self._idle.wait()

    @property
    def queued(self) -> int:
        return self._queued

    def submit(self, work: Work) -> None:
        """Queue work in arrival order; refuse at once when the queue is full."""
        n = len(work.stream_ids) if isinstance(work, BatchWork) else 1
        if self.max_queue and self._queued + n > self.max_queue and not isinstance(work, ControlWork):
            self._m_full.inc()
            if n > self.max_queue:
                raise Overloaded(
                    f"{n} readings in one request can never fit --max-queue {self.max_queue}: "
                    f"split the batch or raise the limit"
                )
            raise Overloaded(
                f"model {self.model.name!r} has {self._queued} readings waiting (--max-queue "
                f"{self.max_queue}): retry after a short back-off"
            )
        self._queue.append(work)
        self._queued += n
        if self._idle.is_set():
            if self._can_run_now(work):
                self._run_now()
                return
            self._idle.clear()
            self._wake.set()

    def _can_run_now(self, work: Work) -> bool:
        """Whether a reading reaching an idle batcher may run at once, inside its caller's callback.

        Only when nothing else is waiting anywhere: the batcher's task is parked with an empty
        queue, and the loop has no other callback ready (no request on its way that could share
        the run, the same test settling makes), and the batcher has been idle for QUIET_SECONDS: an
        empty ready queue alone also happens between the requests of a steady load, where one more
        loop iteration lets the next arrivals join the run. Then waking the task would only add a
        loop iteration and two task switches (~40-70 µs of a lone request's CPU); the caller's
        future is done before it awaits it.
        """
        ready = getattr(self._loop, "_ready", None)
        return (
            ready is not None
            and not ready
            and self.inline_batch > 0
            and self._task is not None
            and isinstance(work, StepWork)
            and len(self._queue) == 1
            and not self._between
            and (self.hold is None or self.hold.done())
            and (work.after is None or work.after.done())
            and time.perf_counter() - self._idle_since > QUIET_SECONDS
        )

    def _run_now(self) -> None:
        """One plan, synchronously, on an idle batcher (see _can_run_now); its task stays parked.

        It counts as activity: readings that follow within QUIET_SECONDS (a burst from the same
        callback) go to the task as usual and share its next run.
        """
        try:
            plan = self._in_hand = self._assemble()
            self._m_depth.set(self._queued)
            if plan.size:
                try:
                    outputs, states, steps = self._execute(plan)
                except Exception as exc:
                    log.exception("model %s failed on a batch of %d", self.model.name, plan.size)
                    self._fail(plan, ModelFailure(f"model {self.model.name!r} failed: {exc}"))
                else:
                    self._complete(plan, outputs, states, steps)
        except Exception:
            self._fail_everything()
        finally:
            self._in_hand = Plan()
            self._idle_since = time.perf_counter()
        if self._queue:  # (a reading kept back, e.g. its stream waits on an earlier one)
            self._idle.clear()
            self._wake.set()

    def between_runs(self, action: Callable[[StateStore], T]) -> asyncio.Future[T]:
        """Run `action(store)` on the event loop while no model run is in flight."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._between.append((action, future))
        self._idle.clear()
        self._wake.set()
        return future

    def _run_between(self) -> None:
        actions, self._between = self._between, []
        for action, future in actions:
            if future.done():
                continue
            try:
                future.set_result(action(self.store))
            except Exception as exc:
                future.set_exception(exc)

    async def _run_forever(self) -> None:
        while True:
            self._in_hand = Plan()
            try:
                await self._run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                self._fail_everything()

    def _fail_everything(self) -> None:
        """A bug must not leave callers waiting forever: fail what is in hand and queued, go on."""
        log.exception("the batcher of model %s failed; failing its queued work", self.model.name)
        error = ModelFailure("internal error in the server; see its log")
        self._fail(self._in_hand, error)
        for work in [*self._queue, *([self._taking] if self._taking else [])]:
            if not work.future.done():
                work.future.set_exception(error)
        self._queue.clear()
        self._queued = 0
        self._taking = None

    async def _run_once(self) -> None:
        """Wait for work, then assemble, run and complete one plan."""
        if self._between:
            self._run_between()
        if not self._queue:
            if not self._between:
                self._idle.set()
                self._idle_since = time.perf_counter()
                self._wake.clear()
                await self._wake.wait()
            return
        if self.hold is not None and not self.hold.done():
            await asyncio.wait([self.hold])
            return
        await self._settle()
        plan = self._in_hand = self._assemble()
        self._m_depth.set(self._queued)
        if not plan.size:
            return
        try:
            if plan.size <= self.inline_batch:
                outputs, states, steps = self._execute(plan)
            else:
                loop = asyncio.get_running_loop()
                outputs, states, steps = await loop.run_in_executor(self._executor, self._execute, plan)
        except Exception as exc:
            log.exception("model %s failed on a batch of %d", self.model.name, plan.size)
            self._fail(plan, ModelFailure(f"model {self.model.name!r} failed: {exc}"))
            return
        self._complete(plan, outputs, states, steps)

    async def _settle(self) -> None:
        """Let the event loop finish what it already has in hand before a plan is made.

        Under load, gRPC hands requests to the loop one callback at a time: planning at the first
        one makes runs of ~1 reading and a full plan/run/complete cycle per request. Yielding while
        other callbacks are ready (received requests on their way to submit) gathers them into the
        same run. When the loop is otherwise idle nothing is ready and the plan is made at once, so
        this adds no delay to a lone request; under endless load the wait is bounded by
        SETTLE_ROUNDS iterations and SETTLE_SECONDS.
        """
        loop = self._loop
        ready = getattr(loop, "_ready", None)  # asyncio's ready queue (absent under uvloop)
        enough = min(self.max_batch, SETTLE_ENOUGH)
        if loop is None or ready is None or not ready or self._queued >= enough:
            return
        until = loop.time() + SETTLE_SECONDS
        for _ in range(SETTLE_ROUNDS):
            await asyncio.sleep(0)
            if not ready or self._queued >= enough or loop.time() > until:
                return

    def _assemble(self) -> Plan:
        """Take waiting work in order, skipping any stream already in this run (and all after it)."""
        store = self.store
        busy = store.protected = BusyRows()
        plan = self._in_hand = Plan()
        budget = self.plan_limit
        now = time.perf_counter()
        deadline_now = time.monotonic()
        kept: deque[Work] = deque()
        waiting: set[str] = set()  # streams whose earlier work is kept back (waits for a later plan)
        fresh: set[str] = set()  # new streams planned here, created together once the plan is made
        queue = self._queue
        try:
            while queue and budget:
                work = self._taking = queue.popleft()
                if isinstance(work, BatchWork):
                    if work.rows is not None and not work.waves:
                        continue  # failed part-way; nothing more of it runs
                    if (waiting and not waiting.isdisjoint(work.stream_ids)) or (
                        fresh and not fresh.isdisjoint(work.stream_ids)
                    ):
                        waiting.update(work.stream_ids)
                        kept.append(work)
                        continue
                    if work.rows is None and not self._begin_batch(work, deadline_now):
                        continue
                    budget -= self._take_wave(work, busy.mask(store.capacity), budget, plan, now)
                    if work.waves:
                        kept.append(work)
                    continue
                if work.future.done():  # the caller gave up (cancelled, deadline) before the work ran
                    self._queued -= 1
                    self._m_cancelled.inc()
                    self._forget_if_unstarted(work.stream_id)
                    continue
                if work.stream_id in waiting or (
                    isinstance(work, StepWork) and work.after is not None and not work.after.done()
                ):
                    waiting.add(work.stream_id)
                    kept.append(work)
                    continue
                row = store.row_of(work.stream_id)
                if row in busy if row is not None else work.stream_id in fresh:
                    kept.append(work)
                    continue
                self._queued -= 1
                if isinstance(work, ControlWork):
                    self._control(work, row)
                    if row is not None:
                        busy.add(row)
                    continue
                if work.deadline is not None and deadline_now > work.deadline:
                    self._m_deadline.inc()
                    work.future.set_exception(DeadlineExpired("the deadline passed while the reading waited"))
                    self._forget_if_unstarted(work.stream_id)
                    continue
                row = self._take_single(work, row, plan, now)
                if row is not None:
                    if row < 0:
                        fresh.add(work.stream_id)
                    else:
                        busy.add(row)
                    budget -= 1
            self._taking = None
            if plan.new_singles:
                self._create_new_streams(plan)
        finally:  # whatever was taken off the queue and not planned goes back, even on an error
            kept.extend(queue)
            self._queue = kept
            store.protected = None
        return plan

    def _create_new_streams(self, plan: Plan) -> None:
        """Create the plan's new streams with one store call (not one per reading); if they do not
        all fit (--max-streams), create them one by one and fail the readings of those that don't."""
        positions = plan.new_singles
        ids = [plan.singles[i].stream_id for i in positions]
        try:
            rows = self.store.create(ids).tolist()
        except CellStreamError:
            rows = []
            for position, stream_id in zip(positions, ids, strict=True):
                try:
                    rows.append(int(self.store.create([stream_id])[0]))
                except CellStreamError as exc:
                    plan.singles[position].future.set_exception(exc)
                    self._forget_if_unstarted(stream_id)
                    rows.append(-1)
        for position, row in zip(positions, rows, strict=True):
            plan.single_rows[position] = row
        plan.new_singles = []
        if -1 in rows:
            plan.drop_failed_singles()

    def _forget_if_unstarted(self, stream_id: str) -> None:
        """A stream is entered in the directory when its first work is accepted; if that work never
        created it, take the entry out again (so refused requests leave nothing behind)."""
        if self.store.row_of(stream_id) is None:
            self.store.directory.release([stream_id], self.store.key)

    def _forget_unstarted_batch(self, work: BatchWork) -> None:
        rows = self.store.rows
        self.store.directory.release([i for i in work.stream_ids if i not in rows], self.store.key)

    def _take_single(self, work: StepWork, row: int | None, plan: Plan, now: float) -> int | None:
        """Answer a retry or a stale seq at once (None: nothing to run), else plan the step; the row."""
        store = self.store
        step = 0 if row is None else int(store.steps[row])
        if work.seq:
            if row is not None and work.seq == step and store.replayable[row]:
                run = RunOutput(
                    store.last_output[row : row + 1].copy(),
                    [v[None] for v in store.read(row)],
                    store.names,
                    self.layout,
                )
                result = StepResult(work.stream_id, run, 0, step, work.want_state, replayed=True)
                work.future.set_result(result)
                return None
            expected = 1 if work.reset else step + 1
            if work.seq != expected:
                work.future.set_exception(StaleSequence(work.stream_id, work.seq, step))
                self._forget_if_unstarted(work.stream_id)
                return None
        position = len(plan.singles)
        if row is None:
            plan.new_singles.append(position)
            row = -1  # made by _create_new_streams, with the plan's other new streams
        if work.reset:
            plan.resets.append(position)
            step = 0
        if work.replace is not None:
            plan.replacements.append((position, work.replace))
        plan.singles.append(work)
        plan.single_rows.append(row)
        plan.single_steps.append(step)
        self._m_queue.observe(now - work.enqueued)
        return row

    def _begin_batch(self, work: BatchWork, deadline_now: float) -> bool:
        """First sight of a StepBatch: resolve (create) its streams and plan its waves."""
        n = len(work.stream_ids)
        if work.future.done() or (work.deadline is not None and deadline_now > work.deadline):
            if not work.future.done():
                self._m_deadline.inc()
                work.future.set_exception(DeadlineExpired("the deadline passed while the batch waited"))
            self._queued -= n
            self._forget_unstarted_batch(work)
            return False
        try:
            work.rows = self.store.rows_for(work.stream_ids, work.looked_up)
        except CellStreamError as exc:
            work.future.set_exception(exc)
            self._queued -= n
            self._forget_unstarted_batch(work)
            return False
        work.looked_up = None
        if not work.waves:
            work.waves = plan_waves(work.stream_ids)
        work.left = n
        return True

    def _take_wave(self, work: BatchWork, busy: np.ndarray, budget: int, plan: Plan, now: float) -> int:
        """Add the free part of the job's current wave (up to budget); block its other rows."""
        assert work.rows is not None
        wave = work.waves[0]
        rows = work.rows[wave]
        free = ~busy[rows]
        if free.all():
            take, rest = wave[:budget], wave[budget:]
        else:  # order within a wave does not matter: each stream is in it once
            free_part = wave[free]
            take, rest = free_part[:budget], np.concatenate([wave[~free], free_part[budget:]])
        if len(take):
            taken_rows = work.rows[take]
            plan.piece_rows.append(taken_rows)
            plan.piece_x.append(work.x[take])
            plan.piece_steps.append(self.store.steps[taken_rows])
            plan.pieces.append((work, take, plan.piece_size))
            plan.piece_size += len(take)
            self._queued -= len(take)
            self._m_queue.observe(now - work.enqueued)
            if len(rest):
                work.waves[0] = rest
            else:
                work.waves.popleft()
        # Whatever of this job is still waiting holds its streams against later work.
        for pending in work.waves:
            busy[work.rows[pending]] = True
        busy[work.rows[take]] = True
        return len(take)

    def _control(self, work: ControlWork[Any], row: int | None) -> None:
        try:
            work.future.set_result(work.action(self.store, row))
        except CellStreamError as exc:
            work.future.set_exception(exc)

    def _execute(self, plan: Plan) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """Gather, run (in runs of max_batch), scatter: nothing is written before every run succeeded."""
        started = time.perf_counter()
        store = self.store
        rows_parts, x_parts, step_parts = plan.piece_rows, plan.piece_x, plan.piece_steps
        if plan.singles:
            rows_parts = [np.array(plan.single_rows, np.int64), *rows_parts]
            x_parts = [np.array([work.x for work in plan.singles]), *x_parts]  # (np.stack: 4x slower)
            step_parts = [np.array(plan.single_steps, np.uint64), *step_parts]
        rows = np.concatenate(rows_parts) if len(rows_parts) > 1 else rows_parts[0]
        x = np.concatenate(x_parts) if len(x_parts) > 1 else x_parts[0]
        n, limit = len(rows), self.max_batch
        parallel = n > limit and self._compute is not None and limit >= PARALLEL_RUN_MIN
        if parallel and not plan.resets and not plan.replacements:
            outputs, next_states = self._run_parallel(rows, x)
        else:
            states = [np.take(slab, rows, axis=0) for slab in store.slabs]  # ~3x faster than slab[rows]
            for position in plan.resets:
                for value, spec in zip(states, store.specs, strict=True):
                    value[position] = spec.initial
            for position, replacement in plan.replacements:
                for value, new in zip(states, replacement, strict=True):
                    if new is not None:
                        value[position] = new
            if n <= limit:
                outputs, next_states = self.model.run(x, states)
                self._m_batch.observe(n)
            else:
                # (resets or replaced states: gathered already, one run at a time)
                outputs, next_states = self._run_pieces(
                    x, lambda start, end: [value[start:end] for value in states], parallel=False
                )
            for slab, value in zip(store.slabs, next_states, strict=True):
                slab[rows] = value
        steps = (np.concatenate(step_parts) if len(step_parts) > 1 else step_parts[0]) + np.uint64(1)
        store.steps[rows] = steps
        store.last_output[rows] = outputs
        store.replayable[rows] = True
        store.last_seen[rows] = time.monotonic()
        self._m_compute.observe(time.perf_counter() - started)
        return outputs, next_states, steps

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        """Equal runs, as many as the compute threads can take evenly: 10,000 readings at
        --max-batch 2048 on 2 threads run as 6 x 1,667 (3 rounds) rather than 4 x 2,048 + 1,808."""
        runs = -(-n // self.max_batch)
        threads = self._compute_threads
        if threads > 1 and self.max_batch >= PARALLEL_RUN_MIN:
            runs = -(-runs // threads) * threads
        size = -(-n // runs)
        return [(start, min(start + size, n)) for start in range(0, n, size)]

    def _run_pieces(
        self, x: np.ndarray, gather: Callable[[int, int], list[np.ndarray]], *, parallel: bool
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """A plan over max_batch as equal runs; `gather(start, end)` gives a run's states. In
        parallel, each compute thread gathers its own rows (numpy and onnxruntime release the GIL);
        the rows of one plan are distinct, so the threads never touch the same row."""
        n = len(x)
        outputs = np.empty((n, self.model.output_size), np.float32)
        next_states = [np.empty((n, *spec.shape), np.float32) for spec in self.store.specs]

        def run(chunk: tuple[int, int]) -> None:
            start, end = chunk
            out, next_part = self.model.run(x[start:end], gather(start, end))
            outputs[start:end] = out
            for target, value in zip(next_states, next_part, strict=True):
                target[start:end] = value
            self._m_batch.observe(end - start)

        chunks = self._chunks(n)
        if parallel:
            assert self._compute is not None
            list(self._compute.map(run, chunks))
        else:
            for chunk in chunks:
                run(chunk)
        return outputs, next_states

    def _run_parallel(self, rows: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Gather, run and (once every run succeeded) scatter, each split over the compute threads."""
        assert self._compute is not None
        slabs = self.store.slabs
        outputs, next_states = self._run_pieces(
            x, lambda start, end: [np.take(slab, rows[start:end], axis=0) for slab in slabs], parallel=True
        )

        def scatter(chunk: tuple[int, int]) -> None:
            start, end = chunk
            for slab, value in zip(slabs, next_states, strict=True):
                slab[rows[start:end]] = value[start:end]

        n, parts = len(rows), self._compute_threads
        list(self._compute.map(scatter, [(n * i // parts, n * (i + 1) // parts) for i in range(parts)]))
        return outputs, next_states

    def _complete(self, plan: Plan, outputs: np.ndarray, states: list[np.ndarray], steps: np.ndarray) -> None:
        self._m_steps.inc(plan.size)
        ended: list[str] = []
        names = self.store.names
        singles = len(plan.singles)
        if singles:
            run = RunOutput(outputs, states, names, self.layout)
            single_steps = steps[:singles].tolist()
            for position, work in enumerate(plan.singles):
                if work.end:
                    ended.append(work.stream_id)
                if not work.future.done():
                    work.future.set_result(
                        StepResult(work.stream_id, run, position, single_steps[position], work.want_state)
                    )
        for batch, take, offset in plan.pieces:
            start = singles + offset
            end = start + len(take)
            n = len(batch.stream_ids)
            in_order = bool(take[-1] - take[0] == len(take) - 1 and (take[1:] > take[:-1]).all())
            if len(take) == n and in_order:
                # The whole batch ran in this plan, in order: its results are views, no copies.
                batch.outputs, batch.steps = outputs[start:end], steps[start:end]
                if batch.want_state:
                    batch.states = [value[start:end] for value in states]
            else:
                if batch.outputs is None or batch.steps is None:
                    batch.outputs = np.empty((n, self.model.output_size), np.float32)
                    batch.steps = np.empty(n, np.uint64)
                    if batch.want_state:
                        batch.states = [np.empty((n, *spec.shape), np.float32) for spec in self.store.specs]
                where = slice(int(take[0]), int(take[-1]) + 1) if in_order else take
                batch.outputs[where] = outputs[start:end]
                batch.steps[where] = steps[start:end]
                if batch.states is not None:
                    for out, value in zip(batch.states, states, strict=True):
                        out[where] = value[start:end]
            batch.left -= len(take)
            if not batch.left and not batch.future.done():
                assert batch.outputs is not None and batch.steps is not None
                states_by_name = None if batch.states is None else dict(zip(names, batch.states, strict=True))
                batch.future.set_result(BatchResult(batch.outputs, states_by_name, batch.steps))
        if ended:
            self.store.delete(ended)

    def _fail(self, plan: Plan, error: CellStreamError) -> None:
        for work in plan.singles:
            if not work.future.done():
                work.future.set_exception(error)
        for batch, _, _ in plan.pieces:
            self._queued -= sum(len(wave) for wave in batch.waves)
            batch.waves.clear()
            batch.left = 0
            if not batch.future.done():
                batch.future.set_exception(error)
