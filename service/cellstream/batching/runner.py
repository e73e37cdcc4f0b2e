"""One plan's model work: gather the rows, session.run in runs of max_batch, scatter back.

Runs on the batcher's worker thread (or on the loop, for small plans) while nothing else touches
the store. Nothing is written before every run of the plan succeeded, so a failed plan changes no
stream. Large plans share their runs among compute threads: onnxruntime and numpy release the GIL,
and the rows of one plan are distinct, so the threads never touch the same row.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cellstream import metrics
from cellstream.batching.plan import Plan
from cellstream.batching.policy import BatchPolicy
from cellstream.model import CellModel
from cellstream.streams.store import StateStore


@dataclass(slots=True)
class Ran:
    """A plan's results, row i for reading i of the plan (singles first, then pieces)."""

    outputs: np.ndarray
    states: list[np.ndarray]
    steps: np.ndarray
    started: float  # perf_counter
    started_ns: int  # wall clock, for traces
    ended_ns: int
    # Readings whose result was not finite (NaN or infinity from finite inputs and states): nothing
    # of theirs was written, and a StepBatch with one is refused whole. None: every result is finite.
    refused: np.ndarray | None = None


def nonfinite(outputs: np.ndarray, states: Sequence[np.ndarray], plan: Plan) -> np.ndarray | None:
    """The readings whose output or next state is not finite, widened to whole StepBatch pieces;
    None (the common case) after one float32 sum per array: a NaN or infinity makes the sum so
    (finite values that overflow it are told apart by the exact check that follows)."""
    arrays = [outputs, *states]
    if all(np.isfinite(a.sum()) for a in arrays):
        return None
    bad = np.zeros(len(outputs), bool)
    for a in arrays:
        bad |= ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)
    singles = len(plan.singles)
    for _, take, offset in plan.pieces:
        start, end = singles + offset, singles + offset + len(take)
        if bad[start:end].any():
            bad[start:end] = True
    return bad if bad.any() else None


class Runner:
    """Applies plans of one model version to its store."""

    def __init__(self, model: CellModel, store: StateStore, policy: BatchPolicy) -> None:
        self.model = model
        self.store = store
        self.policy = policy
        self._compute = (
            ThreadPoolExecutor(
                max_workers=policy.compute_threads, thread_name_prefix=f"cellstream-{model.name}-run"
            )
            if policy.compute_threads > 1
            else None
        )
        self._m_compute = metrics.COMPUTE_DURATION.labels(model=model.name)
        self._m_batch = metrics.BATCH_SIZE.labels(model=model.name)

    def close(self) -> None:
        if self._compute is not None:
            self._compute.shutdown(wait=True)

    def run(self, plan: Plan) -> Ran:
        """Gather, run, scatter; raises (having written nothing) if any run fails."""
        started, started_ns = time.perf_counter(), time.time_ns()
        store = self.store
        rows_parts, x_parts, step_parts = plan.piece_rows, plan.piece_x, plan.piece_steps
        if plan.singles:
            rows_parts = [np.array(plan.single_rows, np.int64), *rows_parts]
            x_parts = [np.array([work.x for work in plan.singles]), *x_parts]  # (cheaper than np.stack)
            step_parts = [np.array(plan.single_steps, np.uint64), *step_parts]
        rows = np.concatenate(rows_parts) if len(rows_parts) > 1 else rows_parts[0]
        x = np.concatenate(x_parts) if len(x_parts) > 1 else x_parts[0]
        n = len(rows)
        refused = None
        if self.policy.parallel(n) and not plan.resets and not plan.replacements:
            outputs, next_states = self._run_parallel(rows, x)
            refused = nonfinite(outputs, next_states, plan)
            if refused is None:
                self._scatter_parallel(rows, next_states)
            else:
                self._scatter(rows, next_states, refused)
        else:
            states = [np.take(slab, rows, axis=0) for slab in store.slabs]  # (faster than slab[rows])
            for position in plan.resets:
                for value, spec in zip(states, store.specs, strict=True):
                    value[position] = spec.initial
            for position, replacement in plan.replacements:
                for value, new in zip(states, replacement, strict=True):
                    if new is not None:
                        value[position] = new
            if n <= self.policy.max_batch:
                outputs, next_states = self.model.run(x, states)
                self._m_batch.observe(n)
            else:  # resets or replaced states: gathered already, one run at a time
                outputs, next_states = self._run_chunks(
                    x, lambda start, end: [value[start:end] for value in states], parallel=False
                )
            refused = nonfinite(outputs, next_states, plan)
            self._scatter(rows, next_states, refused)
        steps = (np.concatenate(step_parts) if len(step_parts) > 1 else step_parts[0]) + np.uint64(1)
        kept = rows if refused is None else rows[~refused]
        store.steps[kept] = steps if refused is None else steps[~refused]
        store.last_output[kept] = outputs if refused is None else outputs[~refused]
        store.replayable[kept] = True
        store.last_seen[kept] = time.monotonic()
        self._m_compute.observe(time.perf_counter() - started)
        return Ran(outputs, next_states, steps, started, started_ns, time.time_ns(), refused)

    def _scatter(self, rows: np.ndarray, next_states: list[np.ndarray], refused: np.ndarray | None) -> None:
        for slab, value in zip(self.store.slabs, next_states, strict=True):
            if refused is None:
                slab[rows] = value
            else:
                slab[rows[~refused]] = value[~refused]

    def _run_chunks(
        self, x: np.ndarray, gather: Callable[[int, int], list[np.ndarray]], *, parallel: bool
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """A plan over max_batch as equal runs; `gather(start, end)` gives a run's states."""
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

        chunks = self.policy.chunks(n)
        if parallel:
            assert self._compute is not None
            list(self._compute.map(run, chunks))
        else:
            for chunk in chunks:
                run(chunk)
        return outputs, next_states

    def _run_parallel(self, rows: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Gather and run, split over the compute threads."""
        assert self._compute is not None
        slabs = self.store.slabs
        return self._run_chunks(
            x, lambda start, end: [np.take(slab, rows[start:end], axis=0) for slab in slabs], parallel=True
        )

    def _scatter_parallel(self, rows: np.ndarray, next_states: list[np.ndarray]) -> None:
        """The scatter of a run whose every result is finite, split over the compute threads."""
        assert self._compute is not None
        slabs = self.store.slabs

        def scatter(chunk: tuple[int, int]) -> None:
            start, end = chunk
            for slab, value in zip(slabs, next_states, strict=True):
                slab[rows[start:end]] = value[start:end]

        n, parts = len(rows), self.policy.compute_threads
        list(self._compute.map(scatter, [(n * i // parts, n * (i + 1) // parts) for i in range(parts)]))
