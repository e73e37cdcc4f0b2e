"""One batcher per model version: a queue, admission, and the loop that turns it into runs.

Rules: no added delay (work that arrives during a run forms the next batch), at most
`max_batch` readings per run, never one stream twice in a run, each stream's readings in
arrival order (plan.Ordering). The batcher is the only writer of its StateStore: it touches the
slabs between runs on the event loop, and the runner touches them only during a run.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sized
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from cellstream import metrics
from cellstream.batching.assembly import Assembler
from cellstream.batching.plan import Plan
from cellstream.batching.policy import BatchPolicy, ready_callbacks
from cellstream.batching.runner import Ran, Runner
from cellstream.batching.work import BatchWork, ControlWork, RunOutput, StepResult, StepWork, Work
from cellstream.errors import BadInput, CellStreamError, ModelFailure, Overloaded, quoted
from cellstream.ids import local_id
from cellstream.model import CellModel
from cellstream.streams.store import StateStore

log = logging.getLogger(__name__)
T = TypeVar("T")


class Batcher:
    """Runs one model over the waiting readings of many streams, one plan at a time."""

    def __init__(self, model: CellModel, store: StateStore, policy: BatchPolicy) -> None:
        self.model = model
        self.store = store
        self.policy = policy = policy.for_model(model)
        self.max_batch = policy.max_batch
        self.runner = Runner(model, store, policy)
        self._assembler = Assembler(model, store, policy)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: Sized | None = None  # the loop's ready callbacks, where it shows them
        self._queue: deque[Work] = deque()
        self._queued = 0  # readings waiting, for --max-queue: changed by submit and _plan only
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._idle_since = 0.0  # policy.clock() when the task last parked
        # Actions that need the store to themselves (snapshot copies, expiry): run between runs.
        self._between: list[tuple[Callable[[StateStore], Any], asyncio.Future[Any]]] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"cellstream-{model.name}")
        self._task: asyncio.Task[None] | None = None
        self._in_hand = Plan()  # the plan being run, failed as a whole if the batcher itself breaks
        self._runs = 0  # plans run: a run's id in traces
        # While set and not done, no work runs (a new version waiting for its streams to arrive).
        self.hold: asyncio.Future[None] | None = None
        name = model.name
        self._m_steps = metrics.STEPS.labels(model=name)
        self._m_depth = metrics.QUEUE_DEPTH.labels(model=name)
        self._m_full = metrics.REJECTIONS.labels(model=name, reason="queue_full")

    @property
    def key(self) -> tuple[str, str]:
        return self.store.key

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def idle(self) -> bool:
        """Whether the batcher's task is parked with nothing to do."""
        return self._idle.is_set()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._ready = ready_callbacks(self._loop)
        self._task = self._loop.create_task(self._run_forever(), name=f"batcher-{self.model.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._executor.shutdown(wait=True)
        self.runner.close()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    # -- admission

    def check_room(self, n: int) -> None:
        """Raise Overloaded unless n more readings fit the queue (--max-queue); changes nothing
        else, so callers check before they admit streams."""
        max_queue = self.policy.max_queue
        if max_queue and self._queued + n > max_queue:
            self._m_full.inc()
            if n > max_queue:
                raise Overloaded(
                    f"{n} readings in one request can never fit --max-queue {max_queue}: "
                    f"split the batch or raise the limit"
                )
            raise Overloaded(
                f"model {self.model.name!r} has {self._queued} readings waiting (--max-queue "
                f"{max_queue}): retry after a short back-off"
            )

    def submit(self, work: Work) -> None:
        """Queue work in arrival order (readings are refused when the queue is full)."""
        n = work.readings if isinstance(work, BatchWork) else 1
        if not isinstance(work, ControlWork):
            self.check_room(n)
        self._queue.append(work)
        self._queued += n
        if self._idle.is_set():
            if self._can_run_now(work):
                self._run_now()
                return
            self._idle.clear()
            self._wake.set()

    async def settle(self, poll: float = 0.005) -> None:
        """Wait until the work queued now, and the run in flight, are done (not work queued
        later): what a shard hand-off waits for once its streams take no new work. A StepStream
        slot is no awaitable, so the queued items are polled."""
        queued = [work.future for work in self._queue]
        await self.between_runs(lambda store: None)
        while not all(future.done() for future in queued):
            await asyncio.sleep(poll)

    def between_runs(self, action: Callable[[StateStore], T]) -> asyncio.Future[T]:
        """Run `action(store)` on the event loop while no model run is in flight."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._between.append((action, future))
        self._idle.clear()
        self._wake.set()
        return future

    # -- scheduling

    def _can_run_now(self, work: Work) -> bool:
        """Whether a reading reaching an idle batcher may run at once, in its caller's callback.

        Only when nothing else waits anywhere: the task is parked with just this reading queued,
        no other callback is ready on the loop (where the loop lets us see that), and the batcher
        has been idle for the quiet period (between the requests of a steady load the loop is
        empty too, and one more iteration lets the next arrivals share the run). Waking the task
        would then only add a loop iteration and two task switches to a lone request.
        """
        policy = self.policy
        return (
            not self._ready
            and policy.inline_batch > 0
            and self._task is not None
            and isinstance(work, StepWork)
            and len(self._queue) == 1
            and not self._between
            and (self.hold is None or self.hold.done())
            and (work.after is None or work.after.done())
            and policy.clock() - self._idle_since > policy.quiet_seconds
        )

    async def _settle(self) -> bool:
        """Let the loop deliver the requests it already has in hand before a plan is made.

        Under load gRPC hands requests to the loop one callback at a time: planning at the first
        makes runs of about one reading. Yielding while callbacks are ready (or, where the loop
        does not show them, while each round brings new work) gathers them into one run; an idle
        loop plans at once. Bounded by the policy's rounds and seconds. Returns whether it yielded.
        """
        loop, policy = self._loop, self.policy
        enough = min(self.max_batch, policy.settle_enough)
        if loop is None or self._queued >= enough:
            return False
        ready = self._ready
        if ready is not None and not ready:
            return False
        until = policy.clock() + policy.settle_seconds
        for _ in range(policy.settle_rounds):
            before = self._queued
            await asyncio.sleep(0)
            if self._queued >= enough or policy.clock() > until:
                return True
            if (not ready) if ready is not None else self._queued == before:
                return True
        return True

    # -- the loop: one plan -> run -> finish path for the task and for a lone reading

    async def _run_forever(self) -> None:
        while True:
            self._in_hand = Plan()
            try:
                await self._cycle()
            except asyncio.CancelledError:
                raise
            except Exception:
                self._fail_everything()

    async def _cycle(self) -> None:
        """Wait for work, then plan, run and finish one plan."""
        if self._between:
            self._run_between()
        if not self._queue:
            if not self._between:
                self._idle.set()
                self._idle_since = self.policy.clock()
                self._wake.clear()
                await self._wake.wait()
            return
        if self.hold is not None and not self.hold.done():
            await asyncio.wait([self.hold])
            return
        yielded = await self._settle()
        plan = self._plan()
        if not plan.size:  # all of it waits (a large batch creating its streams, a moving stream)
            if not yielded:
                await asyncio.sleep(0)
            return
        loop = asyncio.get_running_loop()
        if plan.size <= self.policy.inline_batch:
            self._finish(plan, self._attempt(plan))
            if not yielded:  # back-to-back inline plans (a long StepBatch wave by wave) share the loop
                await asyncio.sleep(0)
        else:
            self._finish(plan, await loop.run_in_executor(self._executor, self._attempt, plan))
        store = self.store
        if store.spare < store.capacity * self.policy.grow_when_spare:
            await loop.run_in_executor(self._executor, store.reserve, 2 * store.capacity)

    def _run_now(self) -> None:
        """One plan, synchronously, on an idle batcher (see _can_run_now); its task stays parked.
        It counts as activity: readings that follow within the quiet period go to the task."""
        try:
            plan = self._plan()
            if plan.size:
                self._finish(plan, self._attempt(plan))
        except Exception:
            self._fail_everything()
        finally:
            self._in_hand = Plan()
            self._idle_since = self.policy.clock()
        if self._queue:  # (a reading kept back, e.g. its stream waits on an earlier one)
            self._idle.clear()
            self._wake.set()

    def _plan(self) -> Plan:
        self._in_hand = Plan()
        self._queue, plan = self._assembler.assemble(self._queue, self._in_hand)
        self._queued -= plan.consumed
        self._m_depth.set(self._queued)
        return plan

    def _attempt(self, plan: Plan) -> Ran | ModelFailure:
        """Run a plan (on the worker thread or the loop); a failure comes back as the error."""
        try:
            return self.runner.run(plan)
        except Exception as exc:
            log.exception("model %s failed on a batch of %d", self.model.name, plan.size)
            return ModelFailure(f"model {self.model.name!r} failed: {exc}")

    def _finish(self, plan: Plan, outcome: Ran | ModelFailure) -> None:
        if isinstance(outcome, ModelFailure):
            self._fail(plan, outcome)
        else:
            self._complete(plan, outcome)

    def _run_between(self) -> None:
        actions, self._between = self._between, []
        for action, future in actions:
            if future.done():
                continue
            try:
                future.set_result(action(self.store))
            except Exception as exc:
                future.set_exception(exc)

    # -- completion

    def _complete(self, plan: Plan, ran: Ran) -> None:
        refused = ran.refused
        if refused is not None:
            self._refuse_nonfinite(plan, refused)
        self._m_steps.inc(plan.size if refused is None else plan.size - int(refused.sum()))
        ended: list[str] = []
        names = self.store.names
        singles = len(plan.singles)
        self._runs += 1
        if singles:
            layout = self.model.layout
            run = RunOutput(
                ran.outputs, ran.states, names, layout, self._runs, ran.started, ran.started_ns, ran.ended_ns
            )
            steps = ran.steps[:singles].tolist()
            for position, work in enumerate(plan.singles):
                if refused is not None and refused[position]:  # (answered: nothing of it applied)
                    continue
                if work.end:
                    ended.append(work.stream_id)
                if not work.future.done():
                    work.future.set_result(
                        StepResult(
                            work.stream_id,
                            run,
                            position,
                            steps[position],
                            work.want_state,
                            False,
                            work.enqueued,
                        )
                    )
        for progress, take, offset in plan.pieces:
            start, end = singles + offset, singles + offset + len(take)
            if refused is not None and refused[start]:  # (a piece is refused whole)
                continue
            states = [value[start:end] for value in ran.states]
            if progress.record(take, ran.outputs[start:end], states, ran.steps[start:end]):
                future = progress.work.future
                if not future.done():
                    future.set_result(progress.result(names))
        if ended:
            self.store.delete(ended)

    def _refuse_nonfinite(self, plan: Plan, refused: np.ndarray) -> None:
        """Answer the readings whose result was not finite (their rows were left as they were);
        streams created for them are deleted again, so the refusal changes nothing."""
        message = (
            "the model's result for this reading is not finite (NaN or infinity, from a finite input "
            "and state): nothing was applied; the stream's state is as before"
        )
        gone = []
        created = set(plan.created)
        for position, work in enumerate(plan.singles):
            if refused[position]:
                if work.stream_id in created:
                    gone.append(work.stream_id)
                if not work.future.done():
                    work.future.set_exception(
                        BadInput(f"stream {quoted(local_id(work.stream_id))}: {message}")
                    )
        singles = len(plan.singles)
        for progress, take, offset in plan.pieces:
            if refused[singles + offset]:
                progress.stop()
                ids = progress.work.stream_ids
                gone += [ids[i] for i in take.tolist() if ids[i] in created]
                if not progress.work.future.done():
                    first = int(take[0])
                    progress.work.future.set_exception(BadInput(f"stream_ids[{first}]: {message}"))
        if gone:
            self.store.delete(gone)

    def _fail(self, plan: Plan, error: CellStreamError) -> None:
        """Fail a plan's work. Streams it created are deleted again: a refused request changes nothing."""
        if plan.created:
            self.store.delete(plan.created)
        for work in plan.singles:
            if not work.future.done():
                work.future.set_exception(error)
        for progress, _, _ in plan.pieces:
            progress.stop()
            if not progress.work.future.done():
                progress.work.future.set_exception(error)

    def _fail_everything(self) -> None:
        """A bug must not leave callers waiting forever: fail what is in hand and queued, go on."""
        log.exception("the batcher of model %s failed; failing its queued work", self.model.name)
        error = ModelFailure("internal error in the server; see its log")
        self._fail(self._in_hand, error)
        taking = self._assembler.taking
        for work in [*self._queue, *([taking] if taking else [])]:
            if not work.future.done():
                work.future.set_exception(error)
        self._queue.clear()
        self._queued = 0
        self._assembler.taking = None
