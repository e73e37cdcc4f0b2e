"""The engine: validates, routes each stream's work to its model version's batcher, and answers
in plain values (numpy results, views of streams) or domain errors.

Everything that can be checked before work is queued is checked first (ids, sizes, finite values,
model names, shapes, queue room), so that a refused request changes nothing; what depends on the
order of a stream's work (seq, state) is left to the batcher. Protocols import from here only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypedDict, TypeVar, Unpack

import numpy as np

from cellstream import intake, metrics, validate
from cellstream.batching.batcher import Batcher
from cellstream.batching.plan import plan_waves
from cellstream.batching.policy import BatchPolicy
from cellstream.batching.work import BatchResult, BatchWork, ControlWork, Sink, StepResult, StepWork
from cellstream.config import Settings
from cellstream.errors import BadInput, Draining, UnknownStream, quoted
from cellstream.ids import local_id
from cellstream.model import CellModel, ModelRepository, ReplyLayout
from cellstream.ownership import Ownership
from cellstream.streams.store import StateStore
from cellstream.tenants import ANONYMOUS, Tenant, Tenants
from cellstream.validate import TensorValue
from cellstream.versions import Deployment

__all__ = [
    "BatchResult",
    "Engine",
    "ModelView",
    "ReplyLayout",
    "Sink",
    "StepOptions",
    "StepResult",
    "StreamView",
    "TensorValue",
]
T = TypeVar("T")
ControlAction = Callable[[StateStore, int | None], T]


class StepOptions(TypedDict, total=False):
    """The per-reading options of Step and StepStream (see `Engine.queue_step`)."""

    state: Mapping[str, TensorValue] | None
    reset: bool
    end: bool
    seq: int
    want_state: bool
    deadline: float | None
    tenant: Tenant


@dataclass(frozen=True)
class StreamView:
    """A stream's state as GetState/SetState return it."""

    stream_id: str
    model: str
    state: dict[str, np.ndarray]
    step: int


@dataclass(frozen=True)
class ModelView:
    """What ListModels says of one model version."""

    model: CellModel
    is_default: bool
    streams: int
    max_batch: int
    current: bool


class Engine:
    """Every RPC of a protocol is one method here."""

    def __init__(
        self,
        repository: ModelRepository,
        settings: Settings,
        policy: BatchPolicy | None = None,
        *,
        ownership: Ownership | None = None,
    ) -> None:
        self.repository = repository
        self.settings = settings
        self.ownership = ownership  # None: a cluster of one, every stream is served here
        self.deployment = Deployment(repository, settings, policy or BatchPolicy.from_settings(settings))
        self.draining = False
        metrics.MAX_QUEUE.set(settings.max_queue)
        metrics.MAX_STREAMS.set(settings.max_streams)

    @property
    def default_model(self) -> str | None:
        return self.repository.default

    def serves(self, name: str) -> bool:
        """Whether `name` is a model served now (metric labels only ever carry such names)."""
        return name in self.deployment.current

    def current_model(self, name: str) -> CellModel:
        """The version of a model new streams get (UnknownModel if it is not served)."""
        return self.deployment.current_for(name).model

    def start(self) -> None:
        self.deployment.start()

    async def drain(self) -> None:
        """Refuse new work and wait for everything queued to finish."""
        self.draining = True
        for batcher in list(self.deployment.batchers.values()):
            await batcher.wait_idle()

    async def stop(self) -> None:
        await self.deployment.stop()

    async def reload_models(self) -> None:
        if not self.draining:
            await self.deployment.reload()

    def _check_open(self) -> None:
        if self.draining:
            raise Draining("the server is shutting down: send this to another replica or retry later")

    def use_tenants(self, tenants: Tenants) -> None:
        """Take an auth file's tenants: their max_streams apply to streams admitted from now on."""
        self.deployment.directory.tenant_limits = tenants.stream_limits()

    def _model_name(self, model: str, tenant: Tenant) -> str:
        self._check_open()
        name = model or self.repository.default
        if name is None:
            raise BadInput(
                f"no model named and this server has no default model: pick one of {self.deployment.names()}"
            )
        self.deployment.current_for(name)  # raises UnknownModel
        tenant.check_model(name)
        return name

    def submit_step(
        self, stream_id: str, model: str, x: np.ndarray, **options: Unpack[StepOptions]
    ) -> asyncio.Future[StepResult]:
        """Validate and queue one reading; the future resolves when it has run."""
        future: asyncio.Future[StepResult] = asyncio.get_running_loop().create_future()
        self.queue_step(future, stream_id, model, x, **options)
        return future

    def queue_step(
        self,
        sink: Sink[StepResult],
        stream_id: str,
        model: str,
        x: np.ndarray,
        *,
        state: Mapping[str, TensorValue] | None = None,
        reset: bool = False,
        end: bool = False,
        seq: int = 0,
        want_state: bool = True,
        deadline: float | None = None,
        tenant: Tenant = ANONYMOUS,
    ) -> None:
        """Validate and queue one reading (raising if it is refused); `sink` gets its outcome.
        No model named: the stream's own model, or the default one for a new stream."""
        key = tenant.key(stream_id)
        name = self._model_name(model or self.deployment.directory.model_of(key) or "", tenant)
        validate.stream_id(stream_id)
        if self.ownership is not None:
            self.ownership.check(stream_id)
        # Checked against the stream's version (its shapes may differ from the current one's).
        cell = self.deployment.batcher_for(key, name, reset=reset).model
        validate.reading(x, cell)
        replace = validate.states(state, cell) if state else None
        tenant.charge(1)
        try:
            batcher, after = self.deployment.route(key, name, reset=reset)
        except BaseException:
            tenant.refund(1)
            raise
        batcher.submit(
            StepWork(
                key,
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
        tenant: Tenant = ANONYMOUS,
    ) -> BatchResult:
        """Validate the whole batch, then apply it; any bad item fails it before anything runs.

        A batch larger than the policy's check chunk is checked and admitted a chunk per turn of
        the event loop (other callers go on meanwhile); its new streams are admitted all or none.
        """
        name = self._model_name(model, tenant)
        current = self.deployment.current_for(name)
        ids = list(stream_ids)  # as the tenant knows them; `keys` as the server does
        n = len(ids)
        x = validate.batch_inputs(n, inputs, current.model, self.settings.max_batch_request)
        bad_row = validate.first_bad_row(x)
        store = current.store
        chunk = self.deployment.policy.check_chunk
        large = n > chunk
        keys = tenant.keys(ids) if not large or not tenant.prefix else await intake.keys(tenant, ids, chunk)
        generation = store.generation
        looked_up = store.lookup(keys) if not large else await intake.lookup(store, keys, chunk)
        present = looked_up[looked_up >= 0]
        known = len(present) == n  # every stream is in this version's store already
        validate.batch_reply_fits(
            n,
            current.model,
            want_state=want_state,
            highest_step=int(store.steps[present].max()) if len(present) else 0,
            limit=self.settings.max_message_bytes,
        )
        missing = None if known else np.flatnonzero(looked_up < 0)
        errors = [] if bad_row is None else [bad_row]
        if self.ownership is not None:
            for start in range(0, n, chunk):  # (before anything else: the caller must go elsewhere)
                refused = self.ownership.first_refused(ids[start : start + chunk], start)
                if refused is not None:
                    raise refused[1]
                if large:
                    await asyncio.sleep(0)
        if missing is not None:
            for start in range(0, len(missing), chunk):  # (positions ascend: the first found is first)
                found = self.deployment.batch_problems(ids, keys, missing[start : start + chunk], current)
                if found:
                    errors += found
                    break
                if large:
                    await asyncio.sleep(0)
        if errors:
            raise min(errors, key=lambda error: error[0])[1]
        rows = looked_up if known else None
        # (a tenant's keys repeat where its ids do: the shorter ids are hashed faster)
        waves = plan_waves(ids, rows) if not large else await intake.waves(ids, rows, chunk)
        current.check_room(n)
        tenant.charge(n)
        try:
            if missing is not None and not large:
                store.admit(keys)
            elif missing is not None:
                await intake.admit(store, keys, chunk, lambda: self._still_admissible(current, n))
        except BaseException:
            tenant.refund(n)
            raise
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        current.submit(
            BatchWork(
                keys,
                x.astype(np.float32),
                future,
                waves,
                want_state=want_state,
                deadline=deadline,
                looked_up=(looked_up, generation),
                missing=missing if large else None,
            )
        )
        return await future

    def _still_admissible(self, batcher: Batcher, readings: int) -> None:
        """What a large batch rechecks after the loop turns its admission took."""
        self._check_open()
        if self.deployment.batchers.get(batcher.key) is not batcher:
            raise Draining(f"model {batcher.model.name!r} changed version meanwhile: send it again")
        batcher.check_room(readings)

    def _existing(self, key: str) -> Batcher:
        """The batcher holding an existing stream (NOT_FOUND if none)."""
        self._check_open()
        batcher = self.deployment.holding(key)
        if batcher is None:
            raise UnknownStream(f"stream {quoted(local_id(key))} does not exist")
        return batcher

    async def _control(self, batcher: Batcher, stream_id: str, action: ControlAction[T]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        work = ControlWork(stream_id, action, future)
        batcher.submit(work)
        return await work.future

    def _served(self, stream_id: str) -> None:
        validate.stream_id(stream_id)
        if self.ownership is not None:
            self.ownership.check(stream_id)

    async def get_state(self, stream_id: str, *, tenant: Tenant = ANONYMOUS) -> StreamView:
        self._served(stream_id)
        key = tenant.key(stream_id)
        batcher = self._existing(key)

        def read(store: StateStore, row: int | None) -> StreamView:
            if row is None:
                raise UnknownStream(f"stream {quoted(stream_id)} does not exist")
            return _view(store, stream_id, row)

        return await self._control(batcher, key, read)

    async def set_state(
        self,
        stream_id: str,
        model: str,
        state: Mapping[str, TensorValue],
        step: int,
        *,
        tenant: Tenant = ANONYMOUS,
    ) -> StreamView:
        self._served(stream_id)
        validate.step(step)
        key = tenant.key(stream_id)
        name = self._model_name(model or self.deployment.directory.model_of(key) or "", tenant)
        values = validate.states(state, self.deployment.batcher_for(key, name).model)
        batcher, _ = self.deployment.route(key, name, readings=0)

        def write(store: StateStore, row: int | None) -> StreamView:
            if row is None:
                row = int(store.create([key])[0])
            store.write(row, values, step)
            return _view(store, stream_id, row)

        return await self._control(batcher, key, write)

    async def delete(self, stream_id: str, *, tenant: Tenant = ANONYMOUS) -> bool:
        self._served(stream_id)
        key = tenant.key(stream_id)
        try:
            batcher = self._existing(key)
        except UnknownStream:
            return False

        def drop(store: StateStore, row: int | None) -> bool:
            return store.delete([key]) > 0

        return await self._control(batcher, key, drop)

    def list_models(self, *, tenant: Tenant = ANONYMOUS) -> list[ModelView]:
        """The versions served, as a tenant may see them: the models it may use, its own streams
        (an admin sees every stream)."""
        current = self.deployment.current
        directory = self.deployment.directory
        return [
            ModelView(
                b.model,
                name == self.repository.default and current.get(name) is b,
                len(b.store) if tenant.admin else directory.count(tenant.name, b.key),
                b.max_batch,
                current.get(name) is b,
            )
            for (name, _), b in sorted(self.deployment.batchers.items())
            if tenant.models is None or name in tenant.models
        ]


def _view(store: StateStore, stream_id: str, row: int) -> StreamView:
    state = dict(zip(store.names, store.read(row), strict=True))
    return StreamView(stream_id, store.model, state, int(store.steps[row]))
