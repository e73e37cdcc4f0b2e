"""Streams in and out of a running server: snapshots, restore at start, export/import, expiry,
and the hand-off of shards to another replica.

Copies are made a chunk of rows at a time between a model's runs, so traffic pauses only briefly;
files are encoded and decoded off the event loop. Streams of a model version that is not served
(or whose file changed) are dropped and counted, never loaded into another version.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np

from cellstream import metrics
from cellstream.batching.batcher import Batcher
from cellstream.cluster.cluster_map import ClusterMap
from cellstream.engine import Engine
from cellstream.errors import BadInput, ClusterMapRefused, Draining, TooManyStreams, UnknownModel, quoted
from cellstream.ids import SEP, local_id
from cellstream.streams.snapshot import ModelSection, SnapshotError, decode, encode
from cellstream.streams.store import StateStore, StreamRows
from cellstream.tenants import ANONYMOUS, Tenant
from cellstream.validate import MAX_STEP

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
            shown = ", ".join(quoted(name) for name in sorted(unknown)[:5])
            raise UnknownModel(f"no model [{shown}] here; models: {names}")
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
        """Load snapshot sections before serving; returns how many streams were restored.

        Everything the file holds is restored, past --max-streams if need be (the limit then
        applies to new streams); a section that does not fit its model is skipped and counted.
        """
        restored = 0
        claimed: set[str] = set()
        servable = self._servable(sections)
        self._count_dropped(sections, {id(section) for section, _ in servable})
        for section, batcher in servable:
            try:
                self._check(section, batcher, claimed)
            except BadInput as exc:
                log.error("dropping %d streams from the snapshot: %s", len(section.rows), exc)
                metrics.STREAMS_DROPPED.labels(reason="invalid").inc(len(section.rows))
                continue
            batcher.store.restore(section.rows, beyond_limit=True)
            restored += len(section.rows)
        excess = self.deployment.directory.excess()
        if excess:
            log.warning(
                "restored %d streams, %d more than --max-streams %d: new streams are refused until "
                "as many are deleted or expire",
                restored,
                excess,
                self.deployment.directory.max_streams,
            )
            metrics.RESTORED_OVER_LIMIT.inc(excess)
        return restored

    async def import_sections(self, sections: Sequence[ModelSection]) -> tuple[int, int]:
        """Load snapshot sections into a running server, all or nothing: every section is checked
        against its model and the stream limit before any is applied (each model between its runs)."""
        servable = self._servable(sections)
        claimed: set[str] = set()
        for section, batcher in servable:
            self._check(section, batcher, claimed)
        directory = self.deployment.directory
        new = [stream_id for stream_id in claimed if directory.key_of(stream_id) is None]
        directory.check_tenant_room(new)
        if self.engine.settings.evict != "lru" and directory.excess(len(new)):
            raise TooManyStreams(
                f"the import holds {len(new)} new streams; with the {len(directory)} here that is over "
                f"--max-streams {directory.max_streams}: nothing was imported"
            )
        restored = 0
        for section, batcher in servable:
            await batcher.between_runs(partial(StateStore.restore, rows=section.rows))
            restored += len(section.rows)
        self._count_dropped(sections, {id(section) for section, _ in servable})
        return restored, sum(len(s.rows) for s in sections) - restored

    async def export_file(
        self, models: Sequence[str] = (), *, tenant: Tenant = ANONYMOUS, shards: Sequence[int] = ()
    ) -> list[bytes]:
        """A snapshot file's bytes (as chunks) of the given models' streams: a tenant's own, under
        the ids it knows them by, or (for an admin) every stream, each keeping its tenant; with
        `shards`, only the streams of those shards (an admin's, for a hand-off)."""
        for name in models:
            tenant.check_model(name)
        if shards:
            tenant.check_admin("an export of shards")
            ownership = self.engine.ownership
            if ownership is None:
                raise ClusterMapRefused("this server was started without --cluster-map: it has no shards")
            wanted = set(shards)
            sections = await self.snapshot(models)
            return await asyncio.to_thread(
                lambda: encode(_of_shards(sections, wanted, ownership.shards_of_keys))
            )
        if not models and tenant.models is not None:  # every model it may use, not every model
            models = [name for name in self.deployment.names() if name in tenant.models]
            if not models:
                return await asyncio.to_thread(encode, [])
        sections = await self.snapshot(models)
        return await asyncio.to_thread(lambda: encode(sections if tenant.admin else _own(sections, tenant)))

    async def import_file(self, data: bytes | bytearray, *, tenant: Tenant = ANONYMOUS) -> tuple[int, int]:
        """Load a snapshot file's streams (into the tenant's own, unless an admin imports); returns
        (restored, dropped)."""
        try:
            _, sections = await asyncio.to_thread(decode, data)
        except SnapshotError as exc:
            raise BadInput(f"not a usable snapshot file: {exc}") from exc
        if not tenant.admin:
            sections = await asyncio.to_thread(_scoped, sections, tenant)
        for section in sections:
            if len(section.rows):  # (an empty section names a model, but brings nothing of it)
                tenant.check_model(section.name)
        if self.engine.draining:
            raise Draining("the server is shutting down")
        return await self.import_sections(sections)

    def _servable(self, sections: Sequence[ModelSection]) -> list[tuple[ModelSection, Batcher]]:
        """Sections whose model is served at the same version and file hash (looks only)."""
        servable = []
        for section in sections:
            batcher = self.deployment.batchers.get((section.name, section.version))
            if batcher is not None and batcher.model.sha256 == section.sha256:
                servable.append((section, batcher))
        return servable

    def _count_dropped(self, sections: Sequence[ModelSection], kept: set[int]) -> None:
        for section in sections:
            if id(section) in kept:
                continue
            served = self.deployment.batchers.get((section.name, section.version)) is not None
            reason = "model_changed" if section.name in self.deployment.current else "model_missing"
            log.warning(
                "dropping %d streams of model %s version %s from the snapshot: %s",
                len(section.rows),
                section.name,
                section.version,
                "the model file changed" if served else "that model version is not served",
            )
            metrics.STREAMS_DROPPED.labels(reason=reason).inc(len(section.rows))

    def _check(self, section: ModelSection, batcher: Batcher, claimed: set[str]) -> None:
        """A section fits its served model as the live API would require: the same states and
        shapes, steps in range, and streams that are on no other model (nor twice in the file)."""
        model = batcher.model
        where = f"section of model {model.name!r} version {model.version!r}"
        expected = [(spec.name, spec.shape) for spec in model.states]
        found = [
            (name, tuple(shape))
            for name, shape in zip(section.state_names, section.state_shapes, strict=False)
        ]
        if found != expected or len(section.state_names) != len(section.state_shapes):
            raise BadInput(f"{where} holds states {found}; the served model has {expected}")
        if section.output_size != model.output_size:
            raise BadInput(
                f"{where} has outputs of {section.output_size}; the model answers {model.output_size}"
            )
        rows = section.rows
        if len(rows) and int(rows.steps.max()) > MAX_STEP:
            raise BadInput(f"{where} holds a step above {MAX_STEP}")
        directory = self.deployment.directory
        for stream_id in rows.ids:
            key = directory.key_of(stream_id)
            if stream_id in claimed or (key is not None and key != batcher.key):
                raise BadInput(
                    f"{where}: stream {quoted(local_id(stream_id))} is on another model or twice in the file"
                )
        claimed.update(rows.ids)

    # -- hand-offs of shards between replicas (docs/scaling.md)

    async def adopt_cluster_map(self, cluster_map: ClusterMap, *, tenant: Tenant = ANONYMOUS) -> None:
        """Serve by a newer cluster map from now on, and keep it in the --cluster-map file (so a
        restart starts from it)."""
        tenant.check_admin("setting the cluster map")
        if self.engine.ownership is None or self.engine.settings.cluster_map is None:
            raise ClusterMapRefused("this server was started without --cluster-map: it is a cluster of one")
        ownership = self.engine.ownership
        if cluster_map.epoch <= ownership.map.epoch:
            raise ClusterMapRefused(
                f"the cluster map of epoch {cluster_map.epoch} is not newer than this replica's "
                f"(epoch {ownership.map.epoch})"
            )
        given = set(ownership.given_away(cluster_map))
        try:
            ownership.adopt(cluster_map)
        except ValueError as exc:
            raise ClusterMapRefused(str(exc)) from None
        await asyncio.to_thread(cluster_map.write, self.engine.settings.cluster_map)
        if given:  # (their streams were exported by the hand-off; this replica's copies go)
            await self._drop_shards(given)

    async def begin_handoff(
        self, shards: Sequence[int], *, cancel: bool = False, tenant: Tenant = ANONYMOUS
    ) -> list[int]:
        """Stop taking work for shards about to move, and wait until the work queued for them
        has run; returns the shards in a hand-off now."""
        tenant.check_admin("a shard hand-off")
        if self.engine.ownership is None:
            raise ClusterMapRefused(
                "this server was started without --cluster-map: it has no shards to hand off"
            )
        if cancel:
            self.engine.ownership.cancel_handoff(shards)
        else:
            try:
                self.engine.ownership.begin_handoff(shards)
            except ValueError as exc:
                raise ClusterMapRefused(str(exc)) from None
            for batcher in list(self.deployment.batchers.values()):
                await batcher.settle()
        return sorted(self.engine.ownership.moving)

    async def _drop_shards(self, shards: set[int]) -> None:
        """Delete the streams of shards this replica no longer serves, a chunk of rows per pause."""
        assert self.engine.ownership is not None
        ownership, chunk = self.engine.ownership, self.chunk_rows

        def high_water(store: StateStore) -> int:
            return store.high_water

        def drop(store: StateStore, start: int) -> int:
            keys = [key for key in store.ids[start : start + chunk] if key is not None]
            gone = [
                key
                for key, shard in zip(keys, ownership.shards_of_keys(keys).tolist(), strict=True)
                if shard in shards
            ]
            return store.delete(gone)

        for batcher in list(self.deployment.batchers.values()):
            high = await batcher.between_runs(high_water)
            for start in range(0, high, chunk):
                await batcher.between_runs(partial(drop, start=start))

    async def expire(self, ttl: float) -> int:
        """Drop streams idle longer than ttl seconds."""
        cutoff = time.monotonic() - ttl
        batchers = list(self.deployment.batchers.values())
        return sum([await b.between_runs(lambda s: s.expire(cutoff)) for b in batchers])


def _own(sections: Sequence[ModelSection], tenant: Tenant) -> list[ModelSection]:
    """The sections with only the tenant's streams, under the ids it knows them by."""
    owned = []
    for section in sections:
        rows = section.rows
        keep = [i for i, key in enumerate(rows.ids) if tenant.owns(key)]
        mine = rows.take(keep, [local_id(rows.ids[i]) for i in keep])
        owned.append(dataclasses.replace(section, rows=mine))
    return owned


def _scoped(sections: Sequence[ModelSection], tenant: Tenant) -> list[ModelSection]:
    """A tenant's import: every stream becomes its own; a file holding other tenants' streams is
    an admin's to import."""
    scoped = []
    for section in sections:
        ids = section.rows.ids
        if SEP in "".join(ids):
            tenant.check_admin("importing a file that holds the streams of tenants (an admin's export)")
        rows = dataclasses.replace(section.rows, ids=tenant.keys(ids))
        scoped.append(dataclasses.replace(section, rows=rows))
    return scoped


def _of_shards(
    sections: Sequence[ModelSection], shards: set[int], shards_of_keys: Callable[[Sequence[str]], np.ndarray]
) -> list[ModelSection]:
    """The sections with only the streams of some shards (every tenant's, keeping tenants)."""
    kept = []
    for section in sections:
        rows = section.rows
        keep = np.flatnonzero(np.isin(shards_of_keys(rows.ids), list(shards)))
        kept.append(dataclasses.replace(section, rows=rows.take(keep.tolist())))
    return kept
