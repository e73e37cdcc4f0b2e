"""The loaded model versions: which one takes new streams, where each stream lives, hot reload.

Each (model, version) has its own StateStore and Batcher. New streams start on a model's current
version, the newest one on disk that loads; a stream stays on the version it started with until
it ends or is reset (then it moves to the current version), unless `--migrate-streams` moves live
streams, with their state, to a new version that declares the same states. Deleting the current
version's directory rolls back: new streams go to the highest version left, and the deleted one
serves its streams from memory until they end. A version with no streams left is unloaded.
"""

from __future__ import annotations

import asyncio
import hashlib
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
from cellstream.ids import local_id
from cellstream.model import CONFIG_FILE, CellModel, ModelFile, ModelRepository
from cellstream.model_config import one_line
from cellstream.streams.directory import ModelKey, StreamDirectory
from cellstream.streams.store import StateStore

log = logging.getLogger(__name__)

_Key = tuple[str, str | None]
"""Whose files were refused: (model, version directory), None for `<name>/model.onnx` or the
model directory itself."""
_REPOSITORY: _Key = ("/", None)  # the repository itself: no model is named '/'


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
        self._refused: dict[_Key, _Seen] = {}
        self._gone: set[ModelKey] = set()  # current versions deleted from disk, none left to take over
        self._started = False
        for model in repository.models.values():
            self.current[model.name] = self._add(model)
        for refusal in repository.refused:  # passed over at start: counted, and not retried unchanged
            self._refuse(refusal.name, self._seen(refusal.version, refusal.path), refusal.error)

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
        # The batcher caps a config's max_batch at the server's: say so, or it looks like a slow model.
        capped = model.config_max_batch is not None and model.config_max_batch > batcher.max_batch
        log.log(
            logging.WARNING if capped else logging.INFO,
            "loaded model %s version %s from %s%s",
            model.name,
            model.version,
            model.path,
            f" ({CONFIG_FILE} max_batch {model.config_max_batch} is capped at the server's --max-batch "
            f"{batcher.max_batch})"
            if capped
            else "",
        )
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
                f"stream {quoted(local_id(stream_id))} is bound to model {batcher.model.name!r}, "
                f"not {name!r}: delete it or use another stream id"
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
        self, stream_ids: Sequence[str], keys: Sequence[str], missing: np.ndarray, current: Batcher
    ) -> list[tuple[int, BadInput]]:
        """What stops a StepBatch's streams from running on `current`: the first bad id among those
        not in its store (`missing`: their indexes), the first stream bound elsewhere; each named
        by its index (`stream_ids` as the tenant sent them, `keys` as the server keeps them).
        Whole-list work is done in C: a batch of 100,000 must not hold the loop."""
        problems = []
        positions = missing.tolist()
        bad_id = validate.first_bad_id([stream_ids[i] for i in positions], positions)
        if bad_id is not None:
            problems.append(bad_id)
        versions = self.directory.keys_of([keys[i] for i in positions])
        elsewhere = set(versions) - {None, current.key}
        if elsewhere & set(self.batchers):
            for i, key in zip(positions, versions, strict=True):
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
        """Bring each model to the newest version on disk that loads: a new one, or the highest one
        left once the current one is deleted (a roll-back). Each model is tried on its own: a
        version that fails, whatever it raises, is logged and counted once per state of its files,
        and neither its model's current version nor any other model is touched."""
        root = self.repository.root
        try:
            found = self.repository.scan_versions()
        except ModelLoadError as exc:  # the repository itself cannot be listed: nothing can load
            seen = self._file_state(None, root)
            if self._refused.get(_REPOSITORY) != seen:
                self._refused[_REPOSITORY] = seen
                log.error("cannot look for new model versions: %s (the served models stay)", exc)
            return
        self._refused.pop(_REPOSITORY, None)
        for name in sorted(found.keys() | self.current.keys()):  # a served model may be gone from disk
            entry = found.get(name, [])
            if isinstance(entry, ModelLoadError):
                self._refuse(name, self._file_state(None, root / name), entry)
                continue
            on_disk = {version for _, version in entry}
            for key in [k for k in self._refused if k[0] == name and k[1] not in on_disk]:
                del self._refused[key]  # its files are gone, or the directory's problem is fixed
            await self._update(name, entry)
        await self.prune()

    async def _update(self, name: str, files: list[ModelFile]) -> None:
        """Make the newest of `files` (newest first) that loads take new streams; while the current
        version's files are there, only the versions above it are tried."""
        current = self.current.get(name)
        for path, version in files:
            if current is not None and _serves(current.model, path, version):
                self._gone.discard(current.key)
                return
            seen = self._seen(version, path)
            if self._refused.get((name, version)) == seen:
                continue
            try:
                await self._take(name, path, version, current)
            except Exception as exc:  # one model's failure must not keep the others from loading
                self._refuse(name, seen, exc)
                continue
            self._refused.pop((name, version), None)
            return
        if current is not None and current.key not in self._gone:
            self._gone.add(current.key)
            log.warning(
                "model %s version %s is gone from disk and no version left there loads: it keeps "
                "serving from memory",
                name,
                current.model.version,
            )

    async def _take(self, name: str, path: Path, version: str | None, current: Batcher | None) -> None:
        """Send new streams to the version in `path`: loaded from disk, or taken back from memory
        when it is still loaded (streams left on it) and its model.onnx is unchanged."""
        loaded = self.batchers.get((name, version)) if version is not None else None
        if loaded is None:
            model = await asyncio.to_thread(self.repository.load, name, path, version)
            if current is not None and (model.version, model.sha256) == (
                current.model.version,
                current.model.sha256,
            ):
                return  # the current version's files, moved: nothing changes
            loaded = self.batchers.get((name, model.version))
            if loaded is None:
                if current is not None and _older(model.version, current.model.version):
                    self._switch(self._add(model), current)  # a roll-back moves no stream
                else:
                    await self.activate(model)
                return
        if await asyncio.to_thread(_sha256, path) != loaded.model.sha256:
            raise ModelLoadError(
                f"{path}: version {loaded.model.version} is still loaded from other files "
                f"({len(loaded.store)} streams on it): publish these files as a new version"
            )
        self._switch(loaded, current)

    def _switch(self, batcher: Batcher, old: Batcher | None) -> None:
        """Send new streams to a loaded version; those on the old one stay there until they end."""
        if batcher is old:
            return
        self.current[batcher.model.name] = batcher
        if old is None or not _older(batcher.model.version, old.model.version):
            log.info("model %s version %s now takes new streams", batcher.model.name, batcher.model.version)
            return
        log.warning(
            "model %s version %s is gone from disk: rolled back, version %s takes new streams; the %d "
            "streams on version %s stay there until they end",
            batcher.model.name,
            old.model.version,
            batcher.model.version,
            len(old.store),
            old.model.version,
        )

    def _refuse(self, name: str, seen: _Seen, problem: Exception) -> None:
        """Log and count a model's refused files, once per state of those files."""
        key = (name, seen.version)
        if self._refused.get(key) == seen:
            return
        self._refused[key] = seen
        metrics.MODEL_LOAD_FAILURES.labels(model=name).inc()
        current = self.current.get(name)
        stays = f"version {current.model.version} serves" if current is not None else "it is not served"
        # A ModelLoadError says what to fix; anything else is a bug here, so keep its traceback.
        trace = None if isinstance(problem, ModelLoadError) else problem
        which = f" version {seen.version}" if seen.version is not None else ""
        log.error("refused model %s%s: %s (%s)", name, which, problem, stays, exc_info=trace)

    def _seen(self, version: str | None, path: Path) -> _Seen:
        return self._file_state(version, path, path.parent / CONFIG_FILE)

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
        self._gone.discard(batcher.key)
        await batcher.wait_idle()
        await batcher.stop()
        metrics.STREAMS.remove(*batcher.key)
        name = batcher.model.name
        metrics.MODELS_LOADED.labels(model=name).set(sum(1 for k in self.batchers if k[0] == name))
        log.info("unloaded model %s version %s", name, batcher.model.version)


def _serves(model: CellModel, path: Path, version: str | None) -> bool:
    """Whether the file found on disk is the one `model` was loaded from (a version directory is
    named by its number; an unversioned file by its path)."""
    return model.version == (version or model.version) and (version is not None or model.path == path)


def _older(version: str, than: str) -> bool:
    numbers = all(v.isascii() and v.isdigit() for v in (version, than))
    return numbers and int(version) < int(than)


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read it ({one_line(exc)}): make it a readable file") from exc
