"""The loaded model versions: which one takes new streams, where each stream lives, hot reload.

Each (model, version) has its own StateStore and Batcher. New streams start on a model's current
version; a stream stays on the version it started with until it ends or is reset (then it moves
to the current version), unless `--migrate-streams` moves live streams, with their state, to a
new version that declares the same states. A version with no streams left is unloaded.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from cellstream import metrics
from cellstream.batcher import Batcher, ControlWork
from cellstream.config import Settings
from cellstream.errors import ModelLoadError, UnknownModel, WrongModel
from cellstream.model import CellModel, ModelRepository
from cellstream.state import ModelKey, StateStore, StreamDirectory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Seen:
    """What a refused file looked like, so it is not reloaded (and re-logged) every poll."""

    version: str | None
    mtime_ns: int
    size: int


class Deployment:
    """Every loaded model version, the current one per name, and the stream directory."""

    def __init__(self, repository: ModelRepository, settings: Settings) -> None:
        self.repository = repository
        self.settings = settings
        self.directory = StreamDirectory(settings.max_streams)
        self.batchers: dict[ModelKey, Batcher] = {}
        self.current: dict[str, Batcher] = {}
        self._refused: dict[str, _Seen] = {}
        self._started = False
        for model in repository.models.values():
            self.current[model.name] = self._add(model)

    def _add(self, model: CellModel) -> Batcher:
        key: ModelKey = (model.name, model.version)
        store = StateStore(
            key, model.states, model.output_size, self.directory, evict_lru=self.settings.evict == "lru"
        )
        batcher = Batcher(
            model,
            store,
            max_batch=self.settings.max_batch,
            max_queue=self.settings.max_queue,
            inline_batch=self.settings.inline_batch,
            compute_threads=self.settings.compute_threads,
        )
        self.batchers[key] = batcher
        metrics.MODELS_LOADED.labels(model=model.name).set(
            sum(1 for k in self.batchers if k[0] == model.name)
        )
        if self._started:
            batcher.start()
        return batcher

    def start(self) -> None:
        self._started = True
        for batcher in self.batchers.values():
            batcher.start()

    async def stop(self) -> None:
        for batcher in list(self.batchers.values()):
            await batcher.stop()

    def names(self) -> list[str]:
        return sorted(self.current)

    def current_for(self, name: str) -> Batcher:
        batcher = self.current.get(name)
        if batcher is None:
            raise UnknownModel(f"model {name!r} is not served here; models: {self.names()}")
        return batcher

    def route(
        self, stream_id: str, name: str, *, reset: bool = False
    ) -> tuple[Batcher, asyncio.Future[bool] | None]:
        """The batcher for a stream's next work, entering a new stream in the directory now.

        Returns a future as well when a reset moves the stream off an old version: the work must
        wait for it (the stream leaves the old version only after the work queued there).
        """
        key = self.directory.key_of(stream_id)
        batcher = self.batchers.get(key) if key is not None else None
        if batcher is None:
            current = self.current_for(name)
            self.directory.claim([stream_id], current.key, over_limit=current.store.evict_lru)
            return current, None
        if batcher.model.name != name:
            raise WrongModel(
                f"stream {stream_id!r} is bound to model {batcher.model.name!r}, not {name!r}: "
                f"delete it or use another stream id"
            )
        current = self.current[name]
        if not reset or batcher is current:
            return batcher, None
        left: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        batcher.submit(ControlWork(stream_id, lambda store, row: store.delete([stream_id]) > 0, left))
        self.directory.owner[stream_id] = current.key
        return current, left

    async def reload(self) -> None:
        """Load each model's new highest version found on disk; a broken one leaves the old serving."""
        for name, (path, version) in self.repository.scan().items():
            current = self.current.get(name)
            if (
                current is not None
                and current.model.version == (version or current.model.version)
                and (version is not None or current.model.path == path)
            ):
                continue
            stat = path.stat()
            seen = _Seen(version, stat.st_mtime_ns, stat.st_size)
            if self._refused.get(name) == seen:
                continue
            try:
                model = await asyncio.to_thread(self.repository.load, name, path, version)
            except (ModelLoadError, OSError) as exc:
                self._refused[name] = seen
                metrics.MODEL_LOAD_FAILURES.labels(model=name).inc()
                log.error("refused model %s version %s: %s (the served version stays)", name, version, exc)
                continue
            if current is not None and (model.version, model.sha256) == (
                current.model.version,
                current.model.sha256,
            ):
                continue
            self._refused.pop(name, None)
            await self.activate(model)
        await self.prune()

    async def activate(self, model: CellModel) -> None:
        """Make `model` the version new streams start on; migrate live streams if so configured."""
        old = self.current.get(model.name)
        if (model.name, model.version) in self.batchers:
            log.warning("model %s version %s is already loaded; keeping it", model.name, model.version)
            return
        new = self._add(model)
        migrate = (
            old is not None
            and self.settings.migrate_streams
            and [(s.name, s.shape) for s in old.model.states] == [(s.name, s.shape) for s in model.states]
        )
        if not migrate or old is None:
            self.current[model.name] = new
            log.info("model %s version %s now takes new streams", model.name, model.version)
            return
        # Hold the new version, send every stream's work there, let the old version finish what it
        # has, copy its streams over, then release: each stream's readings stay in order.
        new.hold = asyncio.get_running_loop().create_future()
        self.current[model.name] = new
        self.directory.successor[old.key] = new.key
        moved = self.directory.rebind(old.key, new.key)
        try:
            await old.wait_idle()
            rows = await old.between_runs(lambda store: store.copy_rows(0, store.high_water))
            new.store.restore(rows)
        finally:
            self.directory.successor.pop(old.key, None)
            new.hold.set_result(None)
        log.info(
            "model %s version %s now serves; %d streams moved from version %s",
            model.name,
            model.version,
            moved,
            old.model.version,
        )
        await self._unload(old)

    async def prune(self) -> None:
        """Unload old versions whose last stream is gone."""
        for batcher in list(self.batchers.values()):
            if (
                batcher is not self.current.get(batcher.model.name)
                and not len(batcher.store)
                and not batcher.queued
            ):
                await self._unload(batcher)

    async def _unload(self, batcher: Batcher) -> None:
        if self.batchers.pop(batcher.key, None) is None:
            return
        await batcher.wait_idle()
        await batcher.stop()
        metrics.STREAMS.remove(*batcher.key)
        name = batcher.model.name
        metrics.MODELS_LOADED.labels(model=name).set(sum(1 for k in self.batchers if k[0] == name))
        log.info("unloaded model %s version %s", name, batcher.model.version)
