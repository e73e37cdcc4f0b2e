"""Validation and orchestration: plain values in, plain results (or domain errors) out.

The engine checks everything that can be checked before work is queued (ids, sizes, finite
values, model names, shapes), so that a refused request changes nothing, and leaves anything
that depends on the order of a stream's work (seq, state) to the model's batcher.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypedDict, TypeVar, Unpack

import numpy as np

from cellstream import metrics
from cellstream.batcher import (
    Batcher,
    BatchResult,
    BatchWork,
    ControlWork,
    Sink,
    StepResult,
    StepWork,
    plan_waves,
)
from cellstream.config import Settings
from cellstream.errors import BadInput, Draining, UnknownModel, UnknownStream, WrongModel
from cellstream.model import CellModel, ModelRepository
from cellstream.snapshot import ModelSection, SnapshotError, decode, encode
from cellstream.state import ModelKey, StateStore, StreamRows
from cellstream.versions import Deployment

log = logging.getLogger(__name__)
T = TypeVar("T")
SNAPSHOT_CHUNK = 16_384  # rows copied per pause of a model's traffic (~4 MB for a 64-float state)

MAX_ID_BYTES = 256
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# A state given in a request: its declared shape (may be empty: then it is taken as flat) and values.
TensorValue = tuple[Sequence[int], np.ndarray]


class StepOptions(TypedDict, total=False):
    """The per-reading options of Step and StepStream (see `Engine.queue_step`)."""

    state: Mapping[str, TensorValue] | None
    reset: bool
    end: bool
    seq: int
    want_state: bool
    deadline: float | None


@dataclass(frozen=True)
class StreamView:
    """A stream's state as GetState/SetState return it."""

    stream_id: str
    model: str
    state: dict[str, np.ndarray]
    step: int


@dataclass(frozen=True)
class ModelView:
    """What ListModels says of one model."""

    model: CellModel
    is_default: bool
    streams: int
    max_batch: int
    current: bool


def check_stream_id(stream_id: str, where: str = "stream_id") -> None:
    if not stream_id:
        raise BadInput(f"{where} is empty: every reading needs a stream id")
    if len(stream_id) * 4 > MAX_ID_BYTES and len(stream_id.encode()) > MAX_ID_BYTES:
        raise BadInput(f"{where} is {len(stream_id.encode())} bytes long; the limit is {MAX_ID_BYTES}")
    if _CONTROL.search(stream_id):
        raise BadInput(f"{where} {stream_id!r} holds a control character")


def first_bad_stream_id(
    stream_ids: Sequence[str], positions: Sequence[int] | None = None
) -> tuple[int, BadInput] | None:
    """The error for the first bad id, or None. Whole-list checks run in C (join, max, one regex);
    the slow loop only runs to name the bad index. `positions`: the ids' indexes in the request."""
    if not stream_ids:
        return None
    longest = max(map(len, stream_ids))
    if min(map(len, stream_ids)) and longest * 4 <= MAX_ID_BYTES and not _CONTROL.search("".join(stream_ids)):
        return None
    for i, stream_id in enumerate(stream_ids):
        index = i if positions is None else positions[i]
        try:
            check_stream_id(stream_id, f"stream_ids[{index}]")
        except BadInput as exc:
            return index, exc
    return None


class Engine:
    """Owns the models' batchers and stores; every RPC of the api layer is one method here."""

    def __init__(self, repository: ModelRepository, settings: Settings) -> None:
        self.repository = repository
        self.settings = settings
        self.deployment = Deployment(repository, settings)
        self.directory = self.deployment.directory
        self.draining = False
        self.longest_snapshot_pause = 0.0  # seconds, of the last snapshot
        metrics.MAX_QUEUE.set(settings.max_queue)
        metrics.MAX_STREAMS.set(settings.max_streams)

    @property
    def batchers(self) -> dict[ModelKey, Batcher]:
        return self.deployment.batchers

    def start(self) -> None:
        self.deployment.start()

    async def drain(self) -> None:
        """Refuse new work and wait for everything queued to finish."""
        self.draining = True
        for batcher in list(self.batchers.values()):
            await batcher.wait_idle()

    async def stop(self) -> None:
        await self.deployment.stop()

    async def reload_models(self) -> None:
        if not self.draining:
            await self.deployment.reload()

    def _model_name(self, model: str) -> str:
        if self.draining:
            raise Draining("the server is shutting down: send this to another replica or retry later")
        name = model or self.repository.default
        if name is None:
            raise BadInput(
                f"no model named and this server has no default model: pick one of {self.model_names()}"
            )
        self.deployment.current_for(name)  # raises UnknownModel
        return name

    def model_names(self) -> list[str]:
        return self.deployment.names()

    def _bound(self, stream_id: str, name: str) -> Batcher | None:
        """The batcher of an existing stream, checked to be of model `name`; None for a new stream."""
        key = self.directory.key_of(stream_id)
        batcher = self.batchers.get(key) if key is not None else None
        if batcher is not None and batcher.model.name != name:
            raise WrongModel(
                f"stream {stream_id!r} is bound to model {batcher.model.name!r}, not {name!r}: "
                f"delete it or use another stream id"
            )
        return batcher

    def _existing(self, stream_id: str) -> Batcher:
        """The batcher holding an existing stream (NOT_FOUND if none)."""
        if self.draining:
            raise Draining("the server is shutting down: send this to another replica or retry later")
        key = self.directory.key_of(stream_id)
        batcher = self.batchers.get(key) if key is not None else None
        if batcher is None:
            raise UnknownStream(f"stream {stream_id!r} does not exist")
        return batcher

    def _reading(self, values: Sequence[float] | np.ndarray, model: CellModel) -> np.ndarray:
        if len(values) != model.input_size:
            raise BadInput(f"input has {len(values)} values, model {model.name!r} expects {model.input_size}")
        # fromiter reads a protobuf repeated field about 3x faster than asarray.
        x = np.fromiter(values, np.float32, model.input_size)
        if not np.isfinite(x).all():
            raise BadInput(f"input value {int(np.flatnonzero(~np.isfinite(x))[0])} is NaN or infinite")
        return x

    @staticmethod
    def _states(given: Mapping[str, TensorValue], model: CellModel) -> list[np.ndarray | None]:
        """Check given states by name and shape; None where a state is not given."""
        specs = {spec.name: spec for spec in model.states}
        unknown = set(given) - set(specs)
        if unknown:
            raise BadInput(
                f"model {model.name!r} has no state {sorted(unknown)}; its states are {sorted(specs)}"
            )
        result: list[np.ndarray | None] = []
        for spec in model.states:
            if spec.name not in given:
                result.append(None)
                continue
            shape, data = given[spec.name]
            shape = tuple(int(d) for d in shape) or (len(data),)
            if shape not in (spec.shape, (spec.size,)) or len(data) != math.prod(shape):
                raise BadInput(
                    f"state {spec.name!r} has shape {list(shape)} with {len(data)} values; model "
                    f"{model.name!r} expects shape {list(spec.shape)}"
                )
            value = np.asarray(data, np.float32).reshape(spec.shape)
            if not np.isfinite(value).all():
                raise BadInput(f"state {spec.name!r} holds NaN or infinite values")
            result.append(value)
        return result

    def submit_step(
        self, stream_id: str, model: str, values: Sequence[float] | np.ndarray, **options: Unpack[StepOptions]
    ) -> asyncio.Future[StepResult]:
        """Validate and queue one reading; the future resolves when it has run."""
        future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        self.queue_step(future, stream_id, model, values, **options)
        return future

    def queue_step(
        self,
        sink: Sink[StepResult],
        stream_id: str,
        model: str,
        values: Sequence[float] | np.ndarray,
        *,
        state: Mapping[str, TensorValue] | None = None,
        reset: bool = False,
        end: bool = False,
        seq: int = 0,
        want_state: bool = True,
        deadline: float | None = None,
    ) -> None:
        """Validate and queue one reading (raising if it is refused); `sink` gets its outcome."""
        name = self._model_name(model)
        check_stream_id(stream_id)
        model_now = self.deployment.current_for(name).model
        # Readings and states are checked against the current version; a stream on an older
        # version with other shapes is checked again below, once it is routed.
        bound = self._bound(stream_id, name)
        cell = bound.model if bound is not None and not reset else model_now
        x = self._reading(values, cell)
        replace = self._states(state, cell) if state else None
        batcher, after = self.deployment.route(stream_id, name, reset=reset)
        batcher.submit(
            StepWork(
                stream_id,
                x,
                sink,
                seq=seq,
                reset=reset,
                replace=replace,
                end=end,
                want_state=want_state,
                deadline=deadline,
                after=after,
            )
        )

    async def step_batch(
        self,
        model: str,
        stream_ids: Sequence[str],
        inputs: bytes,
        *,
        want_state: bool = True,
        deadline: float | None = None,
    ) -> BatchResult:
        """Validate the whole batch, then apply it; any bad item fails it before anything runs."""
        name = self._model_name(model)
        current = self.deployment.current_for(name)
        cell = current.model
        stream_ids = list(stream_ids)
        n = len(stream_ids)
        if n == 0:
            raise BadInput("stream_ids is empty")
        if n > self.settings.max_batch_request:
            raise BadInput(f"{n} readings in one StepBatch; the limit is {self.settings.max_batch_request}")
        expected = n * cell.input_size * 4
        if len(inputs) != expected:
            raise BadInput(
                f"inputs holds {len(inputs)} bytes; {n} readings of model {cell.name!r} need "
                f"{n} x {cell.input_size} float32 = {expected} bytes"
            )
        x = np.frombuffer(inputs, "<f4").reshape(n, cell.input_size)
        finite = np.isfinite(x).all(axis=1)
        errors: list[tuple[int, BadInput]] = []
        if not finite.all():
            index = int(np.flatnonzero(~finite)[0])
            errors.append((index, BadInput(f"stream_ids[{index}]: input holds NaN or infinity")))
        store = current.store
        looked_up = store.lookup(stream_ids)
        generation = store.generation
        known = not (looked_up < 0).any()
        if not known:  # (when every stream is in this version's store, all is known)
            keys = list(map(self.directory.owner.get, stream_ids))
            # Known streams were checked when they were created: only new ids are looked at.
            new = [i for i, key in enumerate(keys) if key is None]
            bad_id = first_bad_stream_id([stream_ids[i] for i in new], new)
            if bad_id is not None:
                errors.append(bad_id)
            elsewhere = set(keys) - {None, current.key}  # in C; the loop below only names the index
            for i, key in enumerate(keys if elsewhere & set(self.batchers) else ()):
                if key is not None and key != current.key and key in self.batchers:
                    where = "model" if key[0] != name else "an older version of model"
                    message = (
                        f"stream_ids[{i}]: stream {stream_ids[i]!r} is on {where} {key[0]!r} "
                        f"(version {key[1]}); send it on its own or reset it"
                    )
                    errors.append((i, BadInput(message)))
                    break
            if errors:
                raise min(errors, key=lambda error: error[0])[1]
            fresh = [stream_ids[i] for i, key in enumerate(keys) if key != current.key]
            if fresh:
                self.directory.claim(
                    list(dict.fromkeys(fresh)), current.key, over_limit=current.store.evict_lru
                )
        elif errors:
            raise errors[0][1]
        batcher = current
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        batcher.submit(
            BatchWork(
                stream_ids,
                x.astype(np.float32),
                future,
                want_state=want_state,
                deadline=deadline,
                looked_up=(looked_up, generation),
                waves=plan_waves(stream_ids, looked_up if known else None),
            )
        )
        return await future

    async def _control(self, batcher: Batcher, work: ControlWork[T]) -> T:
        batcher.submit(work)
        return await work.future

    async def get_state(self, stream_id: str) -> StreamView:
        check_stream_id(stream_id)
        batcher = self._existing(stream_id)

        def read(store: StateStore, row: int | None) -> StreamView:
            if row is None:
                raise UnknownStream(f"stream {stream_id!r} does not exist")
            return StreamView(
                stream_id,
                store.model,
                dict(zip(store.names, store.read(row), strict=True)),
                int(store.steps[row]),
            )

        loop = asyncio.get_running_loop()
        return await self._control(batcher, ControlWork(stream_id, read, loop.create_future()))

    async def set_state(
        self, stream_id: str, model: str, state: Mapping[str, TensorValue], step: int
    ) -> StreamView:
        check_stream_id(stream_id)
        name = self._model_name(model or self.directory.model_of(stream_id) or "")
        bound = self._bound(stream_id, name)
        values = self._states(state, (bound or self.deployment.current_for(name)).model)
        batcher, _ = self.deployment.route(stream_id, name)

        def write(store: StateStore, row: int | None) -> StreamView:
            if row is None:
                row = int(store.create([stream_id])[0])
            store.write(row, values, step)
            return StreamView(
                stream_id, store.model, dict(zip(store.names, store.read(row), strict=True)), step
            )

        loop = asyncio.get_running_loop()
        return await self._control(batcher, ControlWork(stream_id, write, loop.create_future()))

    async def delete(self, stream_id: str) -> bool:
        check_stream_id(stream_id)
        try:
            batcher = self._existing(stream_id)
        except UnknownStream:
            return False

        def drop(store: StateStore, row: int | None) -> bool:
            return store.delete([stream_id]) > 0

        loop = asyncio.get_running_loop()
        return await self._control(batcher, ControlWork(stream_id, drop, loop.create_future()))

    def _timed_copy(self, store: StateStore, start: int, stop: int) -> StreamRows:
        """One chunk copy; its duration is how long that model's traffic waited for the snapshot."""
        started = time.perf_counter()
        rows = store.copy_rows(start, stop)
        self.longest_snapshot_pause = max(self.longest_snapshot_pause, time.perf_counter() - started)
        return rows

    async def snapshot(self, models: Sequence[str] = ()) -> list[ModelSection]:
        """Copy every stream, a chunk of rows at a time between runs, so traffic pauses only briefly."""
        unknown = set(models) - set(self.model_names())
        if unknown:
            raise UnknownModel(f"no model {sorted(unknown)} here; models: {self.model_names()}")
        sections = []
        self.longest_snapshot_pause = 0.0
        for (name, _), batcher in sorted(self.batchers.items()):
            if models and name not in models:
                continue
            store = batcher.store
            high = await batcher.between_runs(lambda s: s.high_water)
            parts = [store.copy_rows(0, 0)]
            for start in range(0, high, SNAPSHOT_CHUNK):
                copy = partial(self._timed_copy, start=start, stop=start + SNAPSHOT_CHUNK)
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
        """Load snapshot sections before serving; streams of a changed or missing model are dropped."""
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
        if self.draining:
            raise Draining("the server is shutting down")
        return await self.import_sections(sections)

    def _servable(self, sections: Sequence[ModelSection]) -> list[tuple[ModelSection, Batcher]]:
        """Sections whose model is served at the same version and file hash; the rest are counted."""
        servable = []
        for section in sections:
            batcher = self.batchers.get((section.name, section.version))
            model = batcher.model if batcher else None
            if model is None or model.sha256 != section.sha256:
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
            assert batcher is not None
            servable.append((section, batcher))
        return servable

    async def expire(self, ttl: float) -> int:
        """Drop streams idle longer than ttl seconds."""
        cutoff = time.monotonic() - ttl
        counts = [await b.between_runs(lambda s: s.expire(cutoff)) for b in self.batchers.values()]
        return sum(counts)

    def list_models(self) -> list[ModelView]:
        current = self.deployment.current
        return [
            ModelView(
                b.model,
                name == self.repository.default and current.get(name) is b,
                len(b.store),
                b.max_batch,
                current.get(name) is b,
            )
            for (name, _), b in sorted(self.batchers.items())
        ]
