"""Streams in and out of a running server: snapshots, restore at start, export/import, expiry.

Copies are made a chunk of rows at a time between a model's runs, so traffic pauses only briefly;
files are encoded and decoded off the event loop. Streams of a model version that is not served
(or whose file changed) are dropped and counted, never loaded into another version.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from functools import partial

from cellstream import metrics
from cellstream.batching.batcher import Batcher
from cellstream.engine import Engine
from cellstream.errors import BadInput, Draining, UnknownModel
from cellstream.streams.snapshot import ModelSection, SnapshotError, decode, encode
from cellstream.streams.store import StateStore, StreamRows

log = logging.getLogger(__name__)


class Durability:
    """Snapshot, restore, export, import and expiry over the deployment's stores."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.deployment = engine.deployment
        self.chunk_rows = engine.settings.snapshot_chunk_rows  # rows copied per pause of traffic
        self.longest_pause = 0.0  # seconds, of the last snapshot

    def _timed_copy(self, store: StateStore, start: int, stop: int) -> StreamRows:
        """One chunk copy; its duration is how long that model's traffic waited for the snapshot."""
        started = time.perf_counter()
        rows = store.copy_rows(start, stop)
        self.longest_pause = max(self.longest_pause, time.perf_counter() - started)
        return rows

    async def snapshot(self, models: Sequence[str] = ()) -> list[ModelSection]:
        """Copy every stream (of the given models), a chunk of rows at a time between runs."""
        names = self.deployment.names()
        unknown = set(models) - set(names)
        if unknown:
            raise UnknownModel(f"no model {sorted(unknown)} here; models: {names}")
        sections = []
        self.longest_pause = 0.0
        for (name, _), batcher in sorted(self.deployment.batchers.items()):
            if models and name not in models:
                continue
            store = batcher.store
            high = await batcher.between_runs(lambda s: s.high_water)
            parts = [store.copy_rows(0, 0)]
            for start in range(0, high, self.chunk_rows):
                copy = partial(self._timed_copy, start=start, stop=start + self.chunk_rows)
                parts.append(await batcher.between_runs(copy))
            model = batcher.model
            sections.append(
                ModelSection(
                    name,
                    model.version,
                    model.sha256,
                    model.output_size,
                    list(store.names),
                    [spec.shape for spec in model.states],
                    StreamRows.concat(parts),
                )
            )
        return sections

    def restore(self, sections: Sequence[ModelSection]) -> int:
        """Load snapshot sections before serving; returns how many streams were restored."""
        restored = 0
        for section, batcher in self._servable(sections):
            batcher.store.restore(section.rows)
            restored += len(section.rows)
        return restored

    async def import_sections(self, sections: Sequence[ModelSection]) -> tuple[int, int]:
        """Load snapshot sections into a running server, each model between its runs."""
        restored = 0
        for section, batcher in self._servable(sections):
            await batcher.between_runs(partial(StateStore.restore, rows=section.rows))
            restored += len(section.rows)
        return restored, sum(len(s.rows) for s in sections) - restored

    async def export_file(self, models: Sequence[str] = ()) -> list[bytes]:
        """A snapshot file's bytes (as chunks) of the given models' streams."""
        sections = await self.snapshot(models)
        return await asyncio.to_thread(encode, sections)

    async def import_file(self, data: bytes) -> tuple[int, int]:
        """Load a snapshot file's streams; returns (restored, dropped)."""
        try:
            _, sections = await asyncio.to_thread(decode, data)
        except SnapshotError as exc:
            raise BadInput(f"not a usable snapshot file: {exc}") from exc
        if self.engine.draining:
            raise Draining("the server is shutting down")
        return await self.import_sections(sections)

    def _servable(self, sections: Sequence[ModelSection]) -> list[tuple[ModelSection, Batcher]]:
        """Sections whose model is served at the same version and file hash; the rest are counted."""
        servable = []
        for section in sections:
            batcher = self.deployment.batchers.get((section.name, section.version))
            model = batcher.model if batcher else None
            if batcher is None or model is None or model.sha256 != section.sha256:
                reason = "model_missing" if section.name not in self.deployment.current else "model_changed"
                log.warning(
                    "dropping %d streams of model %s version %s from the snapshot: %s",
                    len(section.rows),
                    section.name,
                    section.version,
                    "that model version is not served" if model is None else "the model file changed",
                )
                metrics.STREAMS_DROPPED.labels(reason=reason).inc(len(section.rows))
                continue
            servable.append((section, batcher))
        return servable

    async def expire(self, ttl: float) -> int:
        """Drop streams idle longer than ttl seconds."""
        cutoff = time.monotonic() - ttl
        batchers = list(self.deployment.batchers.values())
        return sum([await b.between_runs(lambda s: s.expire(cutoff)) for b in batchers])
