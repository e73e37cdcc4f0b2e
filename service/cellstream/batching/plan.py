"""The ordering rule and what one run applies. Pure: no event loop, no model, no store writes.

The rule: a stream is in a run at most once, and no work of a stream overtakes earlier work of
that stream; streams never wait for each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from cellstream.batching.work import BatchProgress, StepWork
from cellstream.streams.busy import BusyRows


class Ordering:
    """The rule applied to the queue of one plan, in queue order.

    `busy`: rows already in this plan; new streams (no row yet) are tracked by id. A stream whose
    work is kept back holds all its later work back too.
    """

    __slots__ = ("busy", "fresh", "waiting")

    def __init__(self, busy: BusyRows | None = None) -> None:
        self.busy = BusyRows() if busy is None else busy
        self.waiting: set[str] = set()  # streams with earlier work kept for a later plan
        self.fresh: set[str] = set()  # new streams planned here (created once the plan is made)

    def admits(self, stream_id: str, row: int | None) -> bool:
        """Whether the next work of this stream may join the plan now."""
        if stream_id in self.waiting:
            return False
        return stream_id not in self.fresh if row is None else row not in self.busy

    def admits_batch(self, stream_ids: Iterable[str]) -> bool:
        """Whether a StepBatch may add a wave: none of its streams has earlier work kept back or
        a new stream in this plan (the rows of its other streams are checked wave by wave)."""
        if not self.waiting and not self.fresh:
            return True
        ids = set(stream_ids)
        return self.waiting.isdisjoint(ids) and self.fresh.isdisjoint(ids)

    def keep(self, stream_id: str) -> None:
        """This stream's work waits for a later plan, and so does all of its later work."""
        self.waiting.add(stream_id)

    def keep_all(self, stream_ids: Iterable[str]) -> None:
        self.waiting.update(stream_ids)

    def take(self, stream_id: str, row: int | None) -> None:
        if row is None:
            self.fresh.add(stream_id)
        else:
            self.busy.add(row)


class Seq(Enum):
    """What a reading's `seq` asks for, given its stream's step."""

    RUN = "run"  # unchecked (0) or the next step
    REPLAY = "replay"  # the last step again: answer its reply, apply nothing
    STALE = "stale"  # anything else: refuse, naming the stream's step


def check_seq(seq: int, step: int, *, reset: bool, replayable: bool) -> Seq:
    """`replayable`: the stream exists and its last reply is kept (no state was set since)."""
    if not seq:
        return Seq.RUN
    if seq == step and replayable:
        return Seq.REPLAY
    return Seq.RUN if seq == (1 if reset else step + 1) else Seq.STALE


class Waves:
    """A StepBatch's positions in wave order: wave k holds the k-th reading of every stream that
    has one. Kept as one permutation and the waves' bounds (no array per wave), so a batch of one
    id repeated N times costs O(N), not N arrays."""

    __slots__ = ("_bounds", "_head", "_next", "_order")

    def __init__(self, order: np.ndarray, bounds: np.ndarray) -> None:
        self._order = order
        self._bounds = bounds  # end offset of each wave in `order`
        self._next = 0  # the current wave
        self._head: np.ndarray | None = None  # what is left of the current wave, once cut

    def __len__(self) -> int:
        return len(self._bounds) - self._next

    def __iter__(self) -> Iterator[np.ndarray]:
        for k in range(self._next, len(self._bounds)):
            yield self.first if k == self._next else self._wave(k)

    def _wave(self, k: int) -> np.ndarray:
        start = int(self._bounds[k - 1]) if k else 0
        return self._order[start : int(self._bounds[k])]

    @property
    def first(self) -> np.ndarray:
        return self._wave(self._next) if self._head is None else self._head

    def cut_first(self, rest: np.ndarray) -> None:
        """The current wave, less what was taken of it; the next wave once nothing is left."""
        if len(rest):
            self._head = rest
        else:
            self._head = None
            self._next += 1

    def clear(self) -> None:
        self._head = None
        self._next = len(self._bounds)


def plan_waves(stream_ids: Sequence[str], rows: np.ndarray | None = None) -> Waves:
    """Split positions so each wave holds a stream at most once, keeping every stream's order.

    `rows`: the streams' rows when all are known (distinct streams have distinct rows, so they
    serve as stream codes); otherwise each id's code is its last position. All of it is O(N) in C.
    """
    n = len(stream_ids)
    if rows is not None and n and int(rows.min()) >= 0:
        marked = np.zeros(int(rows.max()) + 1, bool)
        marked[rows] = True
        return one_wave(n) if np.count_nonzero(marked) == n else waves_of(rows)
    last = dict(zip(stream_ids, range(n), strict=True))
    if len(last) == n:
        return one_wave(n)
    return waves_of(np.fromiter(map(last.__getitem__, stream_ids), np.int64, n))


def one_wave(n: int) -> Waves:
    """The waves of n distinct streams: one."""
    return Waves(np.arange(n), np.array([n]))


def waves_of(codes: np.ndarray) -> Waves:
    """The waves of positions whose streams have these codes (equal code, same stream)."""
    n = len(codes)
    by_code = np.argsort(codes, kind="stable")  # each stream's positions, in order, together
    sorted_codes = codes[by_code]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    occurrence = np.empty(n, np.int64)  # the k of "the k-th reading of its stream"
    occurrence[by_code] = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    return Waves(np.argsort(occurrence, kind="stable"), np.cumsum(np.bincount(occurrence)))


def take_wave(progress: BatchProgress, busy: np.ndarray, budget: int) -> np.ndarray:
    """The free part (up to `budget`) of a StepBatch's current wave; what is left of the wave stays
    first. Marks every row of the batch in `busy`: the rows taken are in this plan, and the others
    hold their streams against later work (one mark per distinct stream, not per wave)."""
    rows = progress.rows
    waves = progress.waves
    wave = waves.first
    free = ~busy[rows[wave]]
    if free.all():
        take, rest = wave[:budget], wave[budget:]
    else:  # order within a wave does not matter: each stream is in it once
        free_part = wave[free]
        take, rest = free_part[:budget], np.concatenate([wave[~free], free_part[budget:]])
    if len(take):
        waves.cut_first(rest)
        progress.waiting -= len(take)
    busy[progress.distinct_rows] = True
    return take


@dataclass
class Plan:
    """What one trip to the worker applies: single readings first, then StepBatch pieces.

    Built with plain lists (one append per reading) and turned into arrays once, in the worker.
    `consumed` counts the readings it took off the queue, planned or answered without a run.
    """

    singles: list[StepWork] = field(default_factory=list)
    single_rows: list[int] = field(default_factory=list)
    single_steps: list[int] = field(default_factory=list)
    resets: list[int] = field(default_factory=list)  # indexes into singles
    replacements: list[tuple[int, list[np.ndarray | None]]] = field(default_factory=list)
    piece_rows: list[np.ndarray] = field(default_factory=list)
    piece_x: list[np.ndarray] = field(default_factory=list)
    piece_steps: list[np.ndarray] = field(default_factory=list)
    pieces: list[tuple[BatchProgress, np.ndarray, int]] = field(default_factory=list)  # offset after singles
    piece_size: int = 0
    new_singles: list[int] = field(default_factory=list)  # indexes into singles of streams to create
    created: list[str] = field(default_factory=list)  # streams created for this plan (none ran yet)
    consumed: int = 0

    @property
    def size(self) -> int:
        return len(self.singles) + self.piece_size

    def add_single(self, work: StepWork, row: int | None, step: int) -> None:
        position = len(self.singles)
        if row is None:
            self.new_singles.append(position)
        if work.reset:
            self.resets.append(position)
            step = 0
        if work.replace is not None:
            self.replacements.append((position, work.replace))
        self.singles.append(work)
        self.single_rows.append(-1 if row is None else row)
        self.single_steps.append(step)

    def add_piece(
        self, progress: BatchProgress, take: np.ndarray, rows: np.ndarray, steps: np.ndarray
    ) -> None:
        """Positions `take` of a StepBatch, at store rows `rows`, whose streams are at `steps`."""
        self.piece_rows.append(rows)
        self.piece_x.append(progress.work.x[take])
        self.piece_steps.append(steps)
        self.pieces.append((progress, take, self.piece_size))
        self.piece_size += len(take)

    def drop_failed_singles(self) -> None:
        """Take out the singles whose stream could not be created (row -1), renumbering the rest."""
        keep = [i for i, row in enumerate(self.single_rows) if row >= 0]
        renumber = {old: new for new, old in enumerate(keep)}
        self.singles = [self.singles[i] for i in keep]
        self.single_rows = [self.single_rows[i] for i in keep]
        self.single_steps = [self.single_steps[i] for i in keep]
        self.resets = [renumber[i] for i in self.resets if i in renumber]
        self.replacements = [(renumber[i], r) for i, r in self.replacements if i in renumber]
