"""`AsyncClient`: the asyncio twin of `Client`, with the same methods, awaited, and the same errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
from cellstream._proto.cellstream.v1 import cellstream_pb2_grpc as pb_grpc
from cellstream.client.auth import AioTokenChannel, bearer
from cellstream.client.client import CHANNEL_OPTIONS
from cellstream.client.errors import Cancelled, CellStreamError, InvalidArgument, translated
from cellstream.client.messages import (
    ArrayLike,
    BatchReply,
    Feed,
    StepItem,
    StepReply,
    StreamState,
    as_floats,
    as_step_request,
    batch_reply,
    batch_request,
    step_reply,
    step_request,
    stream_state,
    tensor,
)
from cellstream.client.routing import routing_metadata
from cellstream.client.shapes import InputSizes, reading_problem
from cellstream.client.tls import TLS


class AsyncClient:
    """asyncio client with the same methods as `Client` (no `resume`, export or import, nor the
    admin's `set_cluster_map`), awaited; `tls` and `token` as for `Client`."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float | None = 30.0,
        options: Sequence[tuple[str, Any]] = (),
        tls: TLS | None = None,
        token: str | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._tls = tls
        pairs = None if token is None else bearer(token)  # refused before a channel is open
        channel = (
            grpc.aio.insecure_channel(address, options=[*CHANNEL_OPTIONS, *options])
            if tls is None
            else grpc.aio.secure_channel(
                address, tls.credentials(), options=[*CHANNEL_OPTIONS, *tls.options(), *options]
            )
        )
        self._channel = channel if pairs is None else AioTokenChannel(channel, pairs)
        self._has_token = pairs is not None
        self._stub = pb_grpc.CellStreamStub(self._channel)
        self._sizes = InputSizes()
        self._closed = False
        self._listing: asyncio.Future[list[pb.ModelInfo]] | None = None

    def __repr__(self) -> str:
        token = "'<hidden>'" if self._has_token else "None"
        return f"{type(self).__name__}({self.address!r}, tls={self._tls!r}, token={token})"

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        await self._channel.close(None)

    def _rpc(self) -> AbstractContextManager[None]:
        """Where a call is made: its grpc error raised as a CellStreamError (Cancelled if closed)."""
        if self._closed:
            raise Cancelled(f"the client for {self.address} is closed")
        return translated()

    async def step(self, stream_id: str, reading: ArrayLike, **options: Any) -> StepReply:
        """Apply one reading; options are those of `step_request` (model, state, reset, end, seq…)."""
        x = as_floats(reading, "reading")
        if x.ndim > 1:
            model = options.get("model", "")
            try:
                sizes = await self._input_sizes(model)
            except CellStreamError:
                sizes = None  # the shape is what is wrong; say so without the model's size
            raise InvalidArgument(reading_problem(x.shape, self._sizes.label(model), sizes))
        request = step_request(stream_id, x, **options)
        route = routing_metadata(stream_id)
        with self._rpc():
            return step_reply(await self._stub.Step(request, timeout=self.timeout, metadata=route))

    async def step_stream(
        self, requests: Iterable[StepItem] | AsyncIterable[StepItem]
    ) -> AsyncIterator[StepReply]:
        """One StepStream call, as `Client.step_stream`; `requests` may be an async iterable."""
        feed = Feed(requests, as_step_request)
        with self._rpc():
            call = self._stub.StepStream(aiter(feed), timeout=self.timeout)
            try:
                async for reply in call:
                    yield step_reply(reply)
            finally:
                call.cancel()  # a caller that stops early ends the call (no-op once it is done)
        feed.raise_failure()

    async def step_batch(
        self, stream_ids: Sequence[str], inputs: ArrayLike, *, model: str = "", omit_state: bool = False
    ) -> BatchReply:
        """N readings of N streams: `inputs` is (N, F), row i for `stream_ids[i]`."""
        x = await self._batch_inputs(len(stream_ids), inputs, model)
        request = batch_request(stream_ids, x, model=model, omit_state=omit_state)
        with self._rpc():
            reply = await self._stub.StepBatch(request, timeout=self.timeout)
        return batch_reply(reply, len(stream_ids))

    async def _batch_inputs(self, n: int, inputs: ArrayLike, model: str) -> np.ndarray:
        """`inputs` as float32, or InvalidArgument when they are not n readings of `model`."""
        x = as_floats(inputs, "inputs")
        fresh = not self._sizes.knows(model)
        if fresh:
            await self._learn()
        problem = self._sizes.batch_problem(n, x.shape, model)
        if problem is not None and not fresh:
            await self._learn()  # the sizes may predate a model reload: ask again before refusing
            problem = self._sizes.batch_problem(n, x.shape, model)
        if problem is not None:
            raise InvalidArgument(problem)
        return x

    async def _send_batch(
        self, stream_ids: Sequence[str], x: np.ndarray, *, model: str, omit_state: bool
    ) -> BatchReply:
        """A StepBatch of checked inputs (an AsyncClusterClient's part for one replica), with the
        first id's `x-stream-id`: a proxy sends it to the replica that serves all of its ids."""
        request = batch_request(stream_ids, x, model=model, omit_state=omit_state)
        route = routing_metadata(stream_ids[0]) if stream_ids else ()
        with self._rpc():
            reply = await self._stub.StepBatch(request, timeout=self.timeout, metadata=route)
        return batch_reply(reply, len(stream_ids))

    async def _input_sizes(self, model: str) -> frozenset[int] | None:
        if not self._sizes.knows(model):
            await self._learn()
        return self._sizes.of(model)

    async def _learn(self) -> None:
        """One ListModels for all the callers that need the sizes at the same time."""
        if self._listing is None or self._listing.done():
            self._listing = asyncio.ensure_future(self.list_models())
            # Retrieved here too, so a failure that every waiter gave up on is not logged as lost.
            self._listing.add_done_callback(lambda f: f.cancelled() or f.exception())
        await asyncio.shield(self._listing)

    async def get_state(self, stream_id: str) -> StreamState:
        request, route = pb.GetStateRequest(stream_id=stream_id), routing_metadata(stream_id)
        with self._rpc():
            reply = await self._stub.GetState(request, timeout=self.timeout, metadata=route)
        return stream_state(reply)

    async def set_state(
        self, stream_id: str, state: Mapping[str, ArrayLike], *, model: str = "", step: int = 0
    ) -> StreamState:
        request = pb.SetStateRequest(
            stream_id=stream_id, model=model, state={n: tensor(v) for n, v in state.items()}, step=step
        )
        route = routing_metadata(stream_id)
        with self._rpc():
            return stream_state(await self._stub.SetState(request, timeout=self.timeout, metadata=route))

    async def delete(self, stream_id: str) -> bool:
        request, route = pb.DeleteStreamRequest(stream_id=stream_id), routing_metadata(stream_id)
        with self._rpc():
            reply = await self._stub.DeleteStream(request, timeout=self.timeout, metadata=route)
        return bool(reply.existed)

    async def get_cluster_map(self) -> pb.ClusterMapInfo:
        """This server's name in its cluster, and the map it serves by (epoch 0: no map)."""
        with self._rpc():
            reply: pb.ClusterMapInfo = await self._stub.GetClusterMap(
                pb.GetClusterMapRequest(), timeout=self.timeout
            )
        return reply

    async def list_models(self) -> list[pb.ModelInfo]:
        """The served models and their contracts (also what the shape checks are made against)."""
        with self._rpc():
            reply = await self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout)
        models = list(reply.models)
        self._sizes.learn(models)
        return models

    async def health(self, service: str = "") -> bool:
        stub = health_pb2_grpc.HealthStub(self._channel)
        with self._rpc():
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
