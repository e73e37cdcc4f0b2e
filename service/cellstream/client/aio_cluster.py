"""`AsyncClusterClient`: the asyncio twin of `ClusterClient`, and what a `Stepper` of a cluster
sends its coalesced batches through (each split by owner, as `ClusterClient.step_batch` does)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np

from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
from cellstream.client.aio import AsyncClient
from cellstream.client.auth import bearer
from cellstream.client.errors import Cancelled, CellStreamError, InvalidArgument, Unavailable
from cellstream.client.messages import ArrayLike, BatchReply, StepReply, StreamState, as_floats
from cellstream.client.routing import Routes, SplitBatch, misroute_of
from cellstream.client.shapes import InputSizes
from cellstream.client.tls import TLS
from cellstream.cluster.cluster_map import ClusterMap

T = TypeVar("T")


class AsyncClusterClient:
    """`ClusterClient`'s methods, awaited, over one `AsyncClient` per replica; like `AsyncClient`
    it has no `resume`, and it has no `step_stream` (use `ClusterClient`, or a `Stepper`).

    The map is fetched by the first call (a constructor cannot await); `refresh()` fetches it
    at once, so `await client.refresh()` checks the seeds before the work starts.
    """

    def __init__(
        self,
        seeds: Sequence[str],
        *,
        timeout: float | None = 30.0,
        options: Sequence[tuple[str, Any]] = (),
        tls: TLS | None = None,
        retry_seconds: float = 60.0,
        token: str | None = None,
    ) -> None:
        if isinstance(seeds, str) or not seeds:
            raise ValueError(
                f"seeds must be a list of replica addresses (host:port), e.g. ['cellstream-0:50051']; "
                f"got {seeds!r}"
            )
        if token is not None:
            bearer(token)  # refused before any channel is open
        self.seeds = tuple(seeds)
        self.timeout = timeout
        self.retry_seconds = retry_seconds
        self._settings: dict[str, Any] = {"timeout": timeout, "options": options, "tls": tls, "token": token}
        self._has_token = token is not None
        self._clients: dict[str, AsyncClient] = {}
        self._routes: Routes | None = None
        self._fetching: asyncio.Lock | None = None
        self._sizes = InputSizes()
        self._closed = False

    def __repr__(self) -> str:
        token = "'<hidden>'" if self._has_token else "None"
        epoch = None if self._routes is None else self._routes.epoch
        return f"{type(self).__name__}({list(self.seeds)!r}, epoch={epoch}, token={token})"

    async def __aenter__(self) -> AsyncClusterClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()

    @property
    def cluster_map(self) -> ClusterMap | None:
        """The map in use (None: not fetched yet, or the seed has none and serves every stream)."""
        return None if self._routes is None else self._routes.map

    def replica(self, address: str) -> AsyncClient:
        """The `AsyncClient` of one replica (made once, closed with this client)."""
        if self._closed:
            raise Cancelled("the cluster client is closed")
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = AsyncClient(address, **self._settings)
        return client

    async def refresh(self) -> ClusterMap | None:
        """Ask the replicas (then the seeds) for a newer map and use it if there is one."""
        routes = await self._current()
        await self._refresh(routes.epoch + 1, first=())
        return self.cluster_map

    async def _current(self) -> Routes:
        if self._routes is not None:
            return self._routes
        if self._fetching is None:
            self._fetching = asyncio.Lock()
        async with self._fetching:  # one GetClusterMap for all the first callers
            if self._routes is None:
                found, failures = await self._newest(self.seeds, wanted=0)
                if found is None:
                    raise Unavailable(f"no seed answered GetClusterMap: {'; '.join(failures)}")
                self._routes = found
        return self._routes

    async def _newest(self, addresses: Iterable[str], wanted: int) -> tuple[Routes | None, list[str]]:
        """The first map of epoch >= `wanted` these servers hold, else the newest one they hold."""
        best: Routes | None = None
        failures: list[str] = []
        for address in dict.fromkeys(addresses):
            try:
                routes = Routes.from_info(await self.replica(address).get_cluster_map(), address)
            except CellStreamError as error:
                if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                    failures.append(f"{address}: {error.code().name}: {error.message}")
                    continue
                routes = Routes(None, address)  # a server from before clusters: a cluster of one
            except ValueError as error:
                failures.append(f"{address}: its cluster map is not valid: {error}")
                continue
            if best is None or routes.epoch > best.epoch:
                best = routes
            if best.epoch >= wanted:
                break
        return best, failures

    async def _refresh(self, wanted: int, first: Sequence[str]) -> None:
        routes = await self._current()
        if routes.epoch >= wanted:
            return
        found, _ = await self._newest([*first, *routes.addresses, *self.seeds], wanted)
        if found is not None and self._routes is not None and found.epoch > self._routes.epoch:
            self._routes = found

    async def _follow(self, error: CellStreamError, routes: Routes) -> bool:
        misroute = misroute_of(error)
        if misroute is None:
            return False
        await self._refresh(max(misroute.epoch, routes.epoch + 1), first=(misroute.address,))
        return True

    async def _routed(
        self, stream_id: str, call: Callable[[AsyncClient], Awaitable[T]], *, retry_unavailable: bool
    ) -> T:
        """As `ClusterClient._routed`: the owner, one misroute followed, UNAVAILABLE retried if safe."""
        followed = False
        deadline, delay = time.monotonic() + self.retry_seconds, 0.05
        while True:
            routes = await self._current()
            try:
                return await call(self.replica(routes.address_of(stream_id)))
            except CellStreamError as error:
                if not followed and await self._follow(error, routes):
                    followed = True
                    continue
                if error.code() != grpc.StatusCode.UNAVAILABLE or not retry_unavailable:
                    raise
                if time.monotonic() + delay > deadline:
                    raise
                followed = False  # (a shard that was moving answers with its new owner: follow it)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def step(self, stream_id: str, reading: ArrayLike, **options: Any) -> StepReply:
        """As `AsyncClient.step`, on the stream's owner; UNAVAILABLE is retried when `seq` is given."""
        return await self._routed(
            stream_id,
            lambda client: client.step(stream_id, reading, **options),
            retry_unavailable=bool(options.get("seq")),
        )

    async def get_state(self, stream_id: str) -> StreamState:
        return await self._routed(
            stream_id, lambda client: client.get_state(stream_id), retry_unavailable=True
        )

    async def set_state(
        self, stream_id: str, state: Mapping[str, ArrayLike], *, model: str = "", step: int = 0
    ) -> StreamState:
        return await self._routed(
            stream_id,
            lambda client: client.set_state(stream_id, state, model=model, step=step),
            retry_unavailable=True,
        )

    async def delete(self, stream_id: str) -> bool:
        return await self._routed(stream_id, lambda client: client.delete(stream_id), retry_unavailable=True)

    async def list_models(self) -> list[pb.ModelInfo]:
        """The models, as the first replica that answers serves them."""
        failure: CellStreamError | None = None
        for address in (await self._current()).addresses:
            try:
                models = await self.replica(address).list_models()
            except CellStreamError as error:
                failure = failure or error
                continue
            self._sizes.learn(models)
            return models
        assert failure is not None
        raise failure

    async def health(self, service: str = "") -> bool:
        """Whether every replica of the map is SERVING."""
        addresses = (await self._current()).addresses
        return all(await asyncio.gather(*(self.replica(a).health(service) for a in addresses)))

    async def step_batch(
        self, stream_ids: Sequence[str], inputs: ArrayLike, *, model: str = "", omit_state: bool = False
    ) -> BatchReply:
        """As `ClusterClient.step_batch`: one part per owner, sent at once, merged in request order."""
        x = await self._batch_inputs(len(stream_ids), inputs, model)
        routes = await self._current()
        batch = SplitBatch(stream_ids, x, routes)
        while True:
            sends = [
                self.replica(address)._send_batch(ids, rows, model=model, omit_state=omit_state)
                for address, ids, rows in batch.requests()
            ]
            refusals = batch.answered(await _outcomes(sends))
            if not refusals:
                return batch.reply()
            for refusal in refusals:
                if not await self._follow(refusal, routes):
                    await self._refresh(routes.epoch + 1, first=())
            routes = await self._current()
            batch.resplit(routes)

    async def _batch_inputs(self, n: int, inputs: ArrayLike, model: str) -> np.ndarray:
        """`inputs` as float32, or InvalidArgument when they are not n readings of `model`."""
        x = as_floats(inputs, "inputs")
        fresh = not self._sizes.knows(model)
        if fresh:
            await self.list_models()
        problem = self._sizes.batch_problem(n, x.shape, model)
        if problem is not None and not fresh:
            await self.list_models()  # the sizes may predate a model reload: ask again before refusing
            problem = self._sizes.batch_problem(n, x.shape, model)
        if problem is not None:
            raise InvalidArgument(problem)
        return x


async def _outcomes(sends: list[Coroutine[Any, Any, BatchReply]]) -> list[BatchReply | CellStreamError]:
    """The parts' replies or refusals, in order; a lone part is awaited as it is (gather would
    make it a task, one more turn of the loop for every batch)."""
    outcomes: list[BatchReply | CellStreamError] = []
    if len(sends) == 1:
        try:
            outcomes.append(await sends[0])
        except CellStreamError as error:
            outcomes.append(error)
        return outcomes
    for outcome in await asyncio.gather(*sends, return_exceptions=True):
        if isinstance(outcome, BaseException) and not isinstance(outcome, CellStreamError):
            raise outcome
        outcomes.append(outcome)
    return outcomes
