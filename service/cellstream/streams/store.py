"""Per-stream state kept in contiguous numpy slabs, one row per stream.

A StateStore is touched by one writer at a time (its model's batcher); it knows nothing of
gRPC or onnxruntime. Stream ids are global across models, so stores share a StreamDirectory.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat

import numpy as np

from cellstream import metrics
from cellstream.model import StateSpec
from cellstream.streams.busy import BusyRows
from cellstream.streams.directory import ModelKey, StreamDirectory

INITIAL_CAPACITY = 1024


class StateStore:
    """The slabs of one model: state rows, step counters, last replies for seq retries."""

    def __init__(
        self,
        key: ModelKey,
        specs: Sequence[StateSpec],
        output_size: int,
        directory: StreamDirectory,
        capacity: int = INITIAL_CAPACITY,
        *,
        evict_lru: bool = False,
    ) -> None:
        self.key = key
        self.model = key[0]
        self.evict_lru = evict_lru
        # Rows the batcher has planned into the next run; eviction must leave them alone.
        self.protected: BusyRows | None = None
        self._lru_candidates: list[int] = []
        self.specs = tuple(specs)
        self.names = tuple(spec.name for spec in self.specs)
        self.directory = directory
        self.rows: dict[str, int] = {}
        # Bumped whenever a row is freed: rows looked up before are still right while it is unchanged.
        self.generation = 0
        self.ids: list[str | None] = [None] * capacity
        self.slabs = [np.empty((capacity, *spec.shape), np.float32) for spec in self.specs]
        self.steps = np.zeros(capacity, np.uint64)
        self.last_output = np.zeros((capacity, output_size), np.float32)
        # A row's last_output is the reply to its latest step, valid until state is replaced.
        self.replayable = np.zeros(capacity, bool)
        self.last_seen = np.zeros(capacity, np.float64)
        self.alive = np.zeros(capacity, bool)
        self._free: list[int] = []
        self._high = 0
        self._gauge = metrics.STREAMS.labels(model=key[0], version=key[1])
        self._gauge.set(0)

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, stream_id: object) -> bool:
        return stream_id in self.rows

    @property
    def capacity(self) -> int:
        return len(self.steps)

    def row_of(self, stream_id: str) -> int | None:
        return self.rows.get(stream_id)

    def lookup(self, stream_ids: Sequence[str]) -> np.ndarray:
        """Rows of the given streams, -1 where a stream is not here."""
        return np.fromiter(map(self.rows.get, stream_ids, repeat(-1)), np.int64, len(stream_ids))

    def rows_for(
        self, stream_ids: Sequence[str], looked_up: tuple[np.ndarray, int] | None = None
    ) -> tuple[np.ndarray, list[str]]:
        """Rows of the given streams, creating the missing ones (all or none) at the initial state;
        and the ids it created.

        `looked_up`: (rows, generation) from an earlier `lookup`, reused if no row was freed since
        (streams missing then are looked up again: other work may have created them meanwhile).
        """
        if looked_up is not None and looked_up[1] == self.generation:
            rows = looked_up[0]
            missing = np.flatnonzero(rows < 0)
            if len(missing):
                rows[missing] = self.lookup([stream_ids[i] for i in missing.tolist()])
                missing = missing[rows[missing] < 0]
        else:
            rows = self.lookup(stream_ids)
            missing = np.flatnonzero(rows < 0)
        if len(missing):
            missing_ids = [stream_ids[i] for i in missing.tolist()]
            new_ids = list(dict.fromkeys(missing_ids))
            created = self.create(new_ids)
            lookup = dict(zip(new_ids, created.tolist(), strict=True))
            rows[missing] = [lookup[stream_id] for stream_id in missing_ids]
            return rows, new_ids
        return rows, []

    def create(self, stream_ids: Sequence[str], *, beyond_limit: bool = False) -> np.ndarray:
        """New rows at the model's initial state and step 0. `beyond_limit`: past --max-streams
        (a restore at start keeps every stream its snapshot holds), and nothing is evicted."""
        if self.evict_lru and not beyond_limit:
            unbound = sum(1 for stream_id in stream_ids if self.directory.key_of(stream_id) is None)
            excess = self.directory.excess(unbound)
            if excess:
                self._evict_least_recent(excess)
        self.directory.admit(stream_ids, self.key, restoring=beyond_limit)
        n = len(stream_ids)
        reuse = min(n, len(self._free))
        rows = np.empty(n, np.int64)
        if reuse:
            rows[:reuse] = self._free[-reuse:]
            del self._free[-reuse:]
            for stream_id, row in zip(stream_ids[:reuse], rows[:reuse].tolist(), strict=True):
                self.ids[row] = stream_id
        fresh = n - reuse
        if fresh:
            self.reserve(self._high + fresh)
            rows[reuse:] = np.arange(self._high, self._high + fresh)
            self.ids[self._high : self._high + fresh] = stream_ids[reuse:]  # (in C, not per id)
            self._high += fresh
        self.reset_rows(rows)
        self.rows.update(zip(stream_ids, rows.tolist(), strict=True))
        self.last_seen[rows] = time.monotonic()
        self.alive[rows] = True
        self._gauge.set(len(self.rows))
        return rows

    def reset_rows(self, rows: np.ndarray) -> None:
        for slab, spec in zip(self.slabs, self.specs, strict=True):
            slab[rows] = spec.initial
        self.steps[rows] = 0
        self.replayable[rows] = False

    def delete(self, stream_ids: Sequence[str]) -> int:
        """Drop streams and recycle their rows; returns how many existed."""
        gone = [self.rows.pop(stream_id) for stream_id in stream_ids if stream_id in self.rows]
        if gone:
            self.generation += 1
        for row in gone:
            self.ids[row] = None
        self._free.extend(gone)
        self.replayable[gone] = False
        self.alive[gone] = False
        self.directory.withdraw(stream_ids, self.key)
        self._gauge.set(len(self.rows))
        return len(gone)

    def admit(self, stream_ids: Sequence[str]) -> list[str]:
        """Bind new streams to this version when their first work is accepted, before their rows
        exist (raises when they cannot be taken); with --evict lru the limit is applied at creation.
        Returns the ids newly bound."""
        return self.directory.admit(stream_ids, self.key, defer_limit=self.evict_lru)

    def forget_unstarted(self, stream_ids: Sequence[str]) -> None:
        """Withdraw the admissions of streams whose work was refused before it created them, so a
        refused request leaves nothing behind."""
        rows = self.rows
        self.directory.withdraw([stream_id for stream_id in stream_ids if stream_id not in rows], self.key)

    def read(self, row: int) -> list[np.ndarray]:
        return [slab[row].copy() for slab in self.slabs]

    def write(self, row: int, states: Sequence[np.ndarray | None], step: int) -> None:
        """Replace a row's states (None keeps one) and step; the old reply can no longer be replayed."""
        for slab, value in zip(self.slabs, states, strict=True):
            if value is not None:
                slab[row] = value
        self.steps[row] = step
        self.replayable[row] = False
        self.last_seen[row] = time.monotonic()

    @property
    def spare(self) -> int:
        """Rows a create can take without growing the slabs."""
        return self.capacity - self._high + len(self._free)

    def reserve(self, needed: int) -> None:
        """Double the capacity until `needed` rows fit. A copy of every slab: the batcher calls it
        ahead of need on its worker thread (nothing else touches the slabs then); a create that
        outruns it grows in place."""
        capacity = self.capacity
        if needed <= capacity:
            return
        while capacity < needed:
            capacity *= 2

        def grown(old: np.ndarray) -> np.ndarray:
            new = np.zeros((capacity, *old.shape[1:]), old.dtype)
            new[: len(old)] = old
            return new

        self.slabs = [grown(slab) for slab in self.slabs]
        self.steps = grown(self.steps)
        self.last_output = grown(self.last_output)
        self.replayable = grown(self.replayable)
        self.last_seen = grown(self.last_seen)
        self.alive = grown(self.alive)
        self.ids.extend([None] * (capacity - len(self.ids)))

    def _protected(self, rows: np.ndarray) -> np.ndarray:
        """Which of these rows the batcher planned into the next run."""
        if self.protected is None:
            return np.zeros(len(rows), bool)
        return self.protected.of(rows)

    def _evict_least_recent(self, count: int) -> None:
        """Drop the `count` streams idle longest (never one planned into the next run).

        Candidates are found with one argpartition and kept for later calls, so a server at its
        limit pays O(capacity) once per many evictions rather than per new stream.
        """
        evicted: list[str] = []
        while len(evicted) < count:
            if not self._lru_candidates:
                live = np.flatnonzero(self.alive)
                live = live[~self._protected(live)]
                if not len(live):
                    break
                k = min(len(live), max(count - len(evicted), 256))
                oldest = live[np.argpartition(self.last_seen[live], k - 1)[:k]]
                self._lru_candidates = oldest[np.argsort(self.last_seen[oldest])[::-1]].tolist()
            row = self._lru_candidates.pop()
            stream_id = self.ids[row]
            if stream_id is None or self._protected(np.array([row]))[0]:
                continue
            evicted.append(stream_id)
            self.delete([stream_id])
        if evicted:
            metrics.STREAMS_DROPPED.labels(reason="lru").inc(len(evicted))

    def expire(self, older_than: float) -> int:
        """Drop streams whose last activity is before `older_than` (time.monotonic seconds)."""
        stale = np.flatnonzero(self.alive & (self.last_seen < older_than))
        stale = stale[~self._protected(stale)]
        if len(stale):
            self.delete([self.ids[row] for row in stale.tolist()])
            metrics.STREAMS_DROPPED.labels(reason="ttl").inc(len(stale))
        return len(stale)

    def copy_rows(self, start: int, stop: int) -> StreamRows:
        """A consistent copy of the live streams among rows [start, stop), for snapshots."""
        rows = np.flatnonzero(self.alive[start:stop]) + start
        return StreamRows(
            ids=[self.ids[row] for row in rows.tolist()],  # type: ignore[misc]
            steps=self.steps[rows],
            replayable=self.replayable[rows],
            last_output=self.last_output[rows],
            states=[slab[rows] for slab in self.slabs],
        )

    @property
    def high_water(self) -> int:
        return self._high

    def restore(self, rows: StreamRows, *, beyond_limit: bool = False) -> None:
        """Recreate streams from a copy (a snapshot); streams of the same ids are overwritten in place.

        In place, because queued work may already hold those rows: they must keep their identity.
        """
        existing = [self.rows.get(stream_id) for stream_id in rows.ids]
        fresh = [stream_id for stream_id, row in zip(rows.ids, existing, strict=True) if row is None]
        created = iter(self.create(fresh, beyond_limit=beyond_limit).tolist()) if fresh else iter(())
        new = np.array([next(created) if row is None else row for row in existing], np.int64)
        self.last_seen[new] = time.monotonic()
        for slab, values in zip(self.slabs, rows.states, strict=True):
            slab[new] = values
        self.steps[new] = rows.steps
        self.replayable[new] = rows.replayable
        self.last_output[new] = rows.last_output


@dataclass
class StreamRows:
    """Plain arrays of some streams of one model: what snapshots write and restores read."""

    ids: list[str]
    steps: np.ndarray
    replayable: np.ndarray
    last_output: np.ndarray
    states: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, keep: Sequence[int] | np.ndarray, ids: list[str] | None = None) -> StreamRows:
        """The streams at positions `keep` (under other ids, when given: one per kept stream)."""
        return StreamRows(
            ids=[self.ids[i] for i in keep] if ids is None else ids,
            steps=self.steps[keep],
            replayable=self.replayable[keep],
            last_output=self.last_output[keep],
            states=[state[keep] for state in self.states],
        )

    @staticmethod
    def concat(parts: Sequence[StreamRows]) -> StreamRows:
        """Join copies; pass at least one part (an empty copy gives the shapes)."""
        return StreamRows(
            ids=[stream_id for part in parts for stream_id in part.ids],
            steps=np.concatenate([p.steps for p in parts]),
            replayable=np.concatenate([p.replayable for p in parts]),
            last_output=np.concatenate([p.last_output for p in parts]),
            states=[np.concatenate([p.states[k] for p in parts]) for k in range(len(parts[0].states))],
        )
