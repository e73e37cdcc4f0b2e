"""The loaded model versions: which one takes new streams, where each stream lives, hot reload.

Each (model, version) has its own StateStore and Batcher. New streams start on a model's current
version; a stream stays on the version it started with until it ends or is reset (then it moves
to the current version), unless `--migrate-streams` moves live streams, with their state, to a
new version that declares the same states. A version with no streams left is unloaded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellstream import metrics, validate
from cellstream.batching.batcher import Batcher
from cellstream.batching.policy import BatchPolicy
from cellstream.batching.work import ControlWork
from cellstream.config import Settings
from cellstream.errors import BadInput, ModelLoadError, UnknownModel, WrongModel, quoted
from cellstream.model import CONFIG_FILE, CellModel, ModelRepository
from cellstream.streams.directory import ModelKey, StreamDirectory
from cellstream.streams.store import StateStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Seen:
    """What a refused file looked like, so it is not reloaded (and re-logged) every poll."""

    version: str | None
    mtime_ns: int
    size: int


class Deployment:
    """Every loaded model version, the current one per name, and the stream directory."""

    def __init__(self, repository: ModelRepository, settings: Settings, policy: BatchPolicy) -> None:
        self.repository = repository
        self.settings = settings
        self.policy = policy
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
        batcher = Batcher(model, store, self.policy)
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
            raise UnknownModel(f"model {quoted(name)} is not served here; models: {self.names()}")
        return batcher

    def holding(self, stream_id: str) -> Batcher | None:
        """The batcher of the version a stream is bound to (None for a stream not here)."""
        key = self.directory.key_of(stream_id)
        return self.batchers.get(key) if key is not None else None

    def batcher_for(self, stream_id: str, name: str, *, reset: bool = False) -> Batcher:
        """Where a stream's next work of model `name` would go: its own version, or the current
        one for a new stream (or a reset). Looks only; WrongModel for a stream of another model."""
        batcher = self.holding(stream_id)
        if batcher is not None and batcher.model.name != name:
            raise WrongModel(
                f"stream {stream_id!r} is bound to model {batcher.model.name!r}, not {name!r}: "
                f"delete it or use another stream id"
            )
        return self.current_for(name) if batcher is None or reset else batcher

    def route(
        self, stream_id: str, name: str, *, reset: bool = False, readings: int = 1
    ) -> tuple[Batcher, asyncio.Future[bool] | None]:
        """The batcher for a stream's next work, admitting a new stream now (after checking that
        the queue has room for `readings`, so a refused reading admits nothing).

        Returns a future as well when a reset moves the stream off an old version: the work must
        wait for it (the stream leaves the old version only after the work queued there).
        """
        batcher = self.holding(stream_id)
        if batcher is not None and batcher.model.name != name:
            self.batcher_for(stream_id, name)  # raises WrongModel
        current = self.current_for(name)
        (current if reset or batcher is None else batcher).check_room(readings)
        if batcher is None:
            current.store.admit([stream_id])
            return current, None
        if not reset or batcher is current:
            return batcher, None
        left: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        batcher.submit(ControlWork(stream_id, lambda store, row: store.delete([stream_id]) > 0, left))
        self.directory.move(stream_id, current.key)
        return current, left

    def batch_problems(
        self, stream_ids: Sequence[str], missing: np.ndarray, current: Batcher
    ) -> list[tuple[int, BadInput]]:
        """What stops a StepBatch's streams from running on `current`: the first bad id among those
        not in its store (`missing`: their indexes), the first stream bound elsewhere; each named
        by its index. Whole-list work is done in C: a batch of 100,000 must not hold the loop."""
        problems = []
        positions = missing.tolist()
        ids = [stream_ids[i] for i in positions]
        bad_id = validate.first_bad_id(ids, positions)
        if bad_id is not None:
            problems.append(bad_id)
        keys = self.directory.keys_of(ids)
        elsewhere = set(keys) - {None, current.key}
        if elsewhere & set(self.batchers):
            for i, key in zip(positions, keys, strict=True):
                if key is not None and key != current.key and key in self.batchers:
                    where = "model" if key[0] != current.model.name else "an older version of model"
                    message = (
                        f"stream_ids[{i}]: stream {stream_ids[i]!r} is on {where} {key[0]!r} "
                        f"(version {key[1]}); send it on its own or reset it"
                    )
                    problems.append((i, BadInput(message)))
                    break
        return problems

    async def reload(self) -> None:
        """Load each model's new highest version found on disk. Each model is tried on its own: one
        that fails, whatever it raises, is logged and counted once per state of its files, and
        neither its served version nor any other model is touched."""

        def refuse(name: str, seen: _Seen, problem: Exception) -> None:
            if self._refused.get(name) == seen:
                return
            self._refused[name] = seen
            metrics.MODEL_LOAD_FAILURES.labels(model=name).inc()
            stays = "the served version stays" if name in self.current else "it is not served"
            # A ModelLoadError says what to fix; anything else is a bug here, so keep its traceback.
            trace = None if isinstance(problem, ModelLoadError) else problem
            log.error(
                "refused model %s version %s: %s (%s)", name, seen.version, problem, stays, exc_info=trace
            )

        root = self.repository.root
        try:
            found = self.repository.scan()
        except ModelLoadError as exc:  # the repository itself cannot be listed: nothing can load
            seen = self._file_state(None, root)
            if self._refused.get("/") != seen:  # "/": no model's name (a directory name has no '/')
                self._refused["/"] = seen
                log.error("cannot look for new model versions: %s (the served models stay)", exc)
            return
        self._refused.pop("/", None)
        for name, entry in found.items():
            if isinstance(entry, ModelLoadError):
                refuse(name, self._file_state(None, root / name), entry)
                continue
            path, version = entry
            current = self.current.get(name)
            if (
                current is not None
                and current.model.version == (version or current.model.version)
                and (version is not None or current.model.path == path)
            ):
                self._refused.pop(name, None)  # what is on disk is what is served: nothing refused
                continue
            seen = self._file_state(version, path, path.parent / CONFIG_FILE)
            if self._refused.get(name) == seen:
                continue
            try:
                model = await asyncio.to_thread(self.repository.load, name, path, version)
                if current is not None and (model.version, model.sha256) == (
                    current.model.version,
                    current.model.sha256,
                ):
                    continue
                await self.activate(model)
            except Exception as exc:  # one model's failure must not keep the others from loading
                refuse(name, seen, exc)
                continue
            self._refused.pop(name, None)
        await self.prune()

    @staticmethod
    def _file_state(version: str | None, *files: Path) -> _Seen:
        """What a model's files look like now (newest mtime, total size): a refused model is tried
        again once any of them changes, its config.json as well as its model.onnx."""
        try:
            stats = [f.stat() for f in files if f.exists()]
        except OSError:
            stats = []
        if not stats:
            return _Seen(version, -1, -1)
        return _Seen(version, max(s.st_mtime_ns for s in stats), sum(s.st_size for s in stats))

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
        moved = self.directory.begin_migration(old.key, new.key)
        try:
            await old.wait_idle()
            rows = await old.between_runs(lambda store: store.copy_rows(0, store.high_water))
            new.store.restore(rows)
        finally:
            self.directory.end_migration(old.key)
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
