"""Assembly: the waiting work of one batcher, in queue order, into one plan.

Work that cannot run yet stays queued (plan.Ordering); work that is answered without a run (a seq
replay, a stale seq, a passed deadline, a caller gone) is answered here; new streams are created
here, together, once the plan is made. Runs on the event loop, between runs.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import numpy as np

from cellstream import metrics
from cellstream.batching.plan import Ordering, Plan, Seq, check_seq, take_wave
from cellstream.batching.policy import BatchPolicy
from cellstream.batching.work import (
    BatchProgress,
    BatchWork,
    ControlWork,
    RunOutput,
    StepResult,
    StepWork,
    Work,
)
from cellstream.errors import CellStreamError, DeadlineExpired, StaleSequence, StepLimit, quoted
from cellstream.ids import local_id
from cellstream.model import CellModel
from cellstream.streams.store import StateStore

HIGHEST_STEP = 2**64 - 1  # steps are u64: a reading past this would wrap to 0


def _at_highest_step(which: str) -> StepLimit:
    return StepLimit(
        f"a stream {which} would go past step {HIGHEST_STEP}, the highest there is: nothing was "
        f"applied; reset it or set its step"
    )


class Assembler:
    """Builds plans for one model version's batcher (which owns the queue)."""

    def __init__(self, model: CellModel, store: StateStore, policy: BatchPolicy) -> None:
        self.model = model
        self.store = store
        self.policy = policy
        self.taking: Work | None = None  # the work being looked at, failed too if assembly breaks
        name = model.name
        self._m_queue = metrics.QUEUE_DURATION.labels(model=name)
        self._m_deadline = metrics.REJECTIONS.labels(model=name, reason="deadline")
        self._m_cancelled = metrics.REJECTIONS.labels(model=name, reason="cancelled")

    def assemble(self, queue: deque[Work], plan: Plan) -> tuple[deque[Work], Plan]:
        """Take waiting work in order into `plan`; work of a stream already in it (and all after
        it) waits. Returns the queue of what waits, and the plan."""
        store = self.store
        order = Ordering()
        store.protected = order.busy
        budget = self.policy.plan_limit
        now, deadline_now = time.perf_counter(), time.monotonic()
        kept: deque[Work] = deque()
        try:
            while queue and budget:
                work = self.taking = queue.popleft()
                if isinstance(work, BatchWork):
                    taken, keep = self._take_batch(work, order, budget, plan, (now, deadline_now))
                    budget -= taken
                    if keep:
                        kept.append(work)
                    continue
                if work.future.done():  # the caller gave up (cancelled, deadline) before the work ran
                    plan.consumed += 1
                    self._m_cancelled.inc()
                    store.forget_unstarted([work.stream_id])
                    continue
                row = store.row_of(work.stream_id)
                if not order.admits(work.stream_id, row) or (
                    isinstance(work, StepWork) and work.after is not None and not work.after.done()
                ):
                    order.keep(work.stream_id)
                    kept.append(work)
                    continue
                plan.consumed += 1
                if isinstance(work, ControlWork):
                    self._control(work, row)
                    if row is not None:
                        order.take(work.stream_id, row)
                elif work.deadline is not None and deadline_now > work.deadline:
                    self._m_deadline.inc()
                    work.future.set_exception(DeadlineExpired("the deadline passed while the reading waited"))
                    store.forget_unstarted([work.stream_id])
                elif self._take_single(work, row, plan, now):
                    order.take(work.stream_id, row)
                    budget -= 1
            self.taking = None
            if plan.new_singles:
                self._create_new_streams(plan)
        finally:  # whatever was taken off the queue and not planned goes back, even on an error
            kept.extend(queue)
            store.protected = None
        return kept, plan

    def _take_single(self, work: StepWork, row: int | None, plan: Plan, now: float) -> bool:
        """Plan one reading, or answer a retry (seq replay) or a stale seq at once; True if planned."""
        store = self.store
        step = 0 if row is None else int(store.steps[row])
        if work.seq:
            replayable = row is not None and bool(store.replayable[row])
            verdict = check_seq(work.seq, step, reset=work.reset, replayable=replayable)
            if verdict is Seq.REPLAY:
                assert row is not None
                run = RunOutput(
                    store.last_output[row : row + 1].copy(),
                    [v[None] for v in store.read(row)],
                    store.names,
                    self.model.layout,
                )
                work.future.set_result(
                    StepResult(work.stream_id, run, 0, step, work.want_state, replayed=True)
                )
                return False
            if verdict is Seq.STALE:
                work.future.set_exception(StaleSequence(work.stream_id, work.seq, step, reset=work.reset))
                store.forget_unstarted([work.stream_id])
                return False
        if step == HIGHEST_STEP and not work.reset:
            work.future.set_exception(_at_highest_step(quoted(local_id(work.stream_id))))
            return False
        plan.add_single(work, row, step)
        self._m_queue.observe(now - work.enqueued)
        return True

    def _take_batch(
        self, work: BatchWork, order: Ordering, budget: int, plan: Plan, times: tuple[float, float]
    ) -> tuple[int, bool]:
        """Add the free part of a StepBatch's current wave; returns (readings taken, keep queued)."""
        now, deadline_now = times  # (perf_counter for the queue metric, monotonic for deadlines)
        progress = work.progress
        if progress is not None and not progress.waves:  # failed part-way: drop what is left
            plan.consumed += progress.waiting
            progress.waiting = 0
            return 0, False
        if not order.admits_batch(work.stream_ids):
            order.keep_all(work.stream_ids)
            return 0, True
        if progress is None:
            if self._creating(work, plan, deadline_now):
                order.keep_all(work.stream_ids)
                return 0, True
            progress = self._begin_batch(work, plan, deadline_now)
            if progress is None:
                return 0, False
        take = take_wave(progress, order.busy.mask(self.store.capacity), budget)
        if len(take):
            rows = progress.rows[take]
            plan.add_piece(progress, take, rows, self.store.steps[rows])
            plan.consumed += len(take)
            self._m_queue.observe(now - work.enqueued)
        return len(take), bool(progress.waves)

    def _creating(self, work: BatchWork, plan: Plan, deadline_now: float) -> bool:
        """Create the next chunk of a large batch's new streams; True while some are still to make.
        A chunk per turn of the loop: 100,000 new streams are 100,000 dict inserts (in queue order,
        so nothing changes for other work; the batch's streams wait behind it meanwhile)."""
        missing, looked_up = work.missing, work.looked_up
        if (
            missing is None
            or looked_up is None
            or work.created_to >= len(missing)
            or work.future.done()
            or (work.deadline is not None and deadline_now > work.deadline)
        ):
            return False
        positions = missing[work.created_to : work.created_to + self.policy.check_chunk]
        work.created_to += len(positions)
        ids = [work.stream_ids[i] for i in positions.tolist()]
        rows = self.store.lookup(ids)
        new = list(dict.fromkeys(ids[i] for i in np.flatnonzero(rows < 0).tolist()))
        if new:
            try:
                self.store.create(new)
            except CellStreamError as exc:
                work.future.set_exception(exc)  # refused below, with what it created
                return False
            work.created += new
            plan.created += new
            rows = self.store.lookup(ids)
        looked_up[0][positions] = rows
        return work.created_to < len(missing)

    def _begin_batch(self, work: BatchWork, plan: Plan, deadline_now: float) -> BatchProgress | None:
        """First sight of a StepBatch: resolve (create) its streams, or refuse it whole."""
        if not work.future.done():
            if work.deadline is not None and deadline_now > work.deadline:
                self._m_deadline.inc()
                work.future.set_exception(DeadlineExpired("the deadline passed while the batch waited"))
            else:
                try:
                    rows, created = self.store.rows_for(work.stream_ids, work.looked_up)
                except CellStreamError as exc:
                    work.future.set_exception(exc)
                else:
                    top = int(self.store.steps[rows].max()) if len(rows) else 0
                    if top + len(work.waves) <= HIGHEST_STEP:
                        work.looked_up = None
                        plan.created += [*work.created, *created]  # (none has run: a failed run drops them)
                        work.progress = BatchProgress(work, rows)
                        return work.progress
                    work.future.set_exception(_at_highest_step("of this batch"))
                    self.store.delete(created)
        plan.consumed += work.readings
        if work.created:  # streams made for it, a chunk at a time, that never ran
            self.store.delete(work.created)
        self.store.forget_unstarted(work.stream_ids)
        return None

    def _create_new_streams(self, plan: Plan) -> None:
        """Create the plan's new streams with one store call; if they do not all fit (--max-streams),
        create them one by one and fail the readings of those that don't."""
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
                    self.store.forget_unstarted([stream_id])
                    rows.append(-1)
        plan.created += [stream_id for stream_id, row in zip(ids, rows, strict=True) if row >= 0]
        for position, row in zip(positions, rows, strict=True):
            plan.single_rows[position] = row
        plan.new_singles = []
        if -1 in rows:
            plan.drop_failed_singles()

    def _control(self, work: ControlWork[Any], row: int | None) -> None:
        try:
            work.future.set_result(work.action(self.store, row))
        except CellStreamError as exc:
            work.future.set_exception(exc)
