"""Python client for cellstream: numpy in, numpy out, over the real gRPC API.

`Client` is blocking; `AsyncClient` (in `aio.py`) is the asyncio twin. A failed call raises a
`CellStreamError` (see `errors`); on StepStream one refused message gets a reply with
`StepReply.error` set instead, and the call goes on. Shapes are checked here before sending.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
from cellstream._proto.cellstream.v1 import cellstream_pb2_grpc as pb_grpc
from cellstream.client.auth import TokenChannel, bearer
from cellstream.client.errors import (
    Cancelled,
    CellStreamError,
    InvalidArgument,
    NotFound,
    ResumeError,
    from_rpc,
    translated,
)
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
from cellstream.client.routing import Metadata, routing_metadata
from cellstream.client.shapes import InputSizes, reading_problem
from cellstream.client.tls import TLS
from cellstream.cluster.cluster_map import ClusterMap

MAX_MESSAGE = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]
# What a resuming client retries: with `seq` every reading is idempotent, so any failure that may
# come from the transport (a server killed mid-call shows up as UNAVAILABLE, INTERNAL or UNKNOWN
# depending on timing) is safe to send again.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
T = TypeVar("T")


def stale_step(error: grpc.RpcError) -> int | None:
    """The stream's current step carried by a stale-seq FAILED_PRECONDITION, else None."""
    error = from_rpc(error)
    return error.step if error.code() == grpc.StatusCode.FAILED_PRECONDITION else None


class Client:
    """Blocking client. `Client("127.0.0.1:50051").step("sensor-1", reading)`.

    With `resume=True` the client numbers each stream's readings itself (`seq`), keeps the last
    `resume_window` readings per stream, retries while the server is unreachable (for up to
    `retry_seconds`), and when a restarted server says a stream is behind (it restored an older
    snapshot), resends the readings it lost, in order, before the current one. Each reading is
    then applied exactly once, as if the server had never stopped.

    With `tls` the channel is TLS (mTLS when it holds a client certificate); without, plaintext.
    With `token` every call carries `authorization: Bearer <token>` (a server with `--auth-file`
    wants one); a token that cannot be a header value is a ValueError here, before connecting.
    A call about one stream carries `x-stream-id`, so a proxy in front of a cluster routes it.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float | None = 30.0,
        options: Sequence[tuple[str, Any]] = (),
        tls: TLS | None = None,
        resume: bool = False,
        resume_window: int = 100_000,
        retry_seconds: float = 60.0,
        token: str | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.resume = resume
        self.retry_seconds = retry_seconds
        self._tls = tls
        pairs = None if token is None else bearer(token)  # refused before a channel is open
        channel = (
            grpc.insecure_channel(address, options=[*CHANNEL_OPTIONS, *options])
            if tls is None
            else grpc.secure_channel(
                address, tls.credentials(), options=[*CHANNEL_OPTIONS, *tls.options(), *options]
            )
        )
        # The channel adds the token, so every call has it: the retries, health, stubs made later.
        self._channel = channel if pairs is None else TokenChannel(channel, pairs)
        self._has_token = pairs is not None
        self._stub = pb_grpc.CellStreamStub(self._channel)
        self._sizes = InputSizes()
        self._closed = False
        self._window = resume_window
        self._sent: dict[str, deque[pb.StepRequest]] = {}
        self._next_seq: dict[str, int] = {}

    def __repr__(self) -> str:
        token = "'<hidden>'" if self._has_token else "None"
        return f"{type(self).__name__}({self.address!r}, tls={self._tls!r}, token={token})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        self._channel.close()

    def _rpc(self) -> AbstractContextManager[None]:
        """Where a call is made: its grpc error raised as a CellStreamError (Cancelled if closed)."""
        if self._closed:
            raise Cancelled(f"the client for {self.address} is closed")
        return translated()

    def step(self, stream_id: str, reading: ArrayLike, **options: Any) -> StepReply:
        """Apply one reading; options are those of `step_request` (model, state, reset, end, seq…)."""
        x = self._one_reading(reading, options.get("model", ""))
        if not self.resume:
            return step_reply(self._send_step(step_request(stream_id, x, **options)))
        if not options.get("seq"):
            options["seq"] = self._next(stream_id)
        request = step_request(stream_id, x, **options)
        sent = self._sent.setdefault(stream_id, deque(maxlen=self._window))
        sent.append(request)
        reply = self._send_resuming(request)
        self._next_seq[stream_id] = reply.step + 1
        if request.end:
            self._sent.pop(stream_id, None)
            self._next_seq.pop(stream_id, None)
        return reply

    def _one_reading(self, reading: ArrayLike, model: str) -> np.ndarray:
        x = as_floats(reading, "reading")
        if x.ndim > 1:
            try:
                sizes = self._input_sizes(model)
            except CellStreamError:
                sizes = None  # the shape is what is wrong; say so without the model's size
            raise InvalidArgument(reading_problem(x.shape, self._sizes.label(model), sizes))
        return x

    def _input_sizes(self, model: str) -> frozenset[int] | None:
        if not self._sizes.knows(model):
            self.list_models()
        return self._sizes.of(model)

    def _send_step(self, request: pb.StepRequest) -> pb.StepResponse:
        route = routing_metadata(request.stream_id)
        with self._rpc():
            reply: pb.StepResponse = self._stub.Step(request, timeout=self.timeout, metadata=route)
        return reply

    def _next(self, stream_id: str) -> int:
        if stream_id not in self._next_seq:
            try:
                self._next_seq[stream_id] = self._retrying(lambda: self.get_state(stream_id)).step + 1
            except NotFound:
                self._next_seq[stream_id] = 1
        return self._next_seq[stream_id]

    def _retrying(self, call: Callable[[], T]) -> T:
        """Retry while the server is unreachable (restarting), with capped back-off."""
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.05
        while True:
            try:
                return call()
            except CellStreamError as exc:
                if exc.code() not in RETRYABLE or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _send_resuming(self, request: pb.StepRequest) -> StepReply:
        def send(r: pb.StepRequest) -> StepReply:
            return step_reply(self._retrying(lambda: self._send_step(r)))

        try:
            return send(request)
        except CellStreamError as exc:
            at = stale_step(exc)
            if at is None or at >= request.seq:
                raise
        # The server is behind (it restarted from an older snapshot): resend what it lost, in order.
        history = [r for r in self._sent[request.stream_id] if at < r.seq < request.seq]
        if [r.seq for r in history] != list(range(at + 1, request.seq)):
            raise ResumeError(
                f"stream {request.stream_id!r}: the server is at step {at}, but readings "
                f"{at + 1}..{request.seq - 1} are no longer kept (resume_window={self._window})",
                step=at,
            )
        for lost in history:
            send(lost)
        return send(request)

    def step_stream(self, requests: Iterable[StepItem]) -> Iterator[StepReply]:
        """One StepStream call: send the items (requests as `step_request` makes them,
        (stream_id, reading) pairs, or dicts of its arguments with the reading under "input"),
        yield the replies in order. An item that is none of these ends the requests there: the
        replies to those before it come, then InvalidArgument names it."""
        feed = Feed(requests, as_step_request)
        with self._rpc():
            call = self._stub.StepStream(iter(feed), timeout=self.timeout)
            try:
                for reply in call:
                    yield step_reply(reply)
            finally:
                call.cancel()  # a caller that stops early ends the call (no-op once it is done)
        feed.raise_failure()

    def step_batch(
        self, stream_ids: Sequence[str], inputs: ArrayLike, *, model: str = "", omit_state: bool = False
    ) -> BatchReply:
        """N readings of N streams: `inputs` is (N, F), row i for `stream_ids[i]`."""
        x = self._batch_inputs(len(stream_ids), inputs, model)
        request = batch_request(stream_ids, x, model=model, omit_state=omit_state)
        with self._rpc():
            reply = self._stub.StepBatch(request, timeout=self.timeout)
        return batch_reply(reply, len(stream_ids))

    def _batch_inputs(self, n: int, inputs: ArrayLike, model: str) -> np.ndarray:
        """`inputs` as float32, or InvalidArgument when they are not n readings of `model`."""
        x = as_floats(inputs, "inputs")
        fresh = not self._sizes.knows(model)
        if fresh:
            self.list_models()
        problem = self._sizes.batch_problem(n, x.shape, model)
        if problem is not None and not fresh:
            self.list_models()  # the sizes may predate a model reload: ask again before refusing
            problem = self._sizes.batch_problem(n, x.shape, model)
        if problem is not None:
            raise InvalidArgument(problem)
        return x

    def _send_batch(
        self, stream_ids: Sequence[str], x: np.ndarray, *, model: str, omit_state: bool
    ) -> BatchReply:
        """A StepBatch of checked inputs (a ClusterClient's part for one replica). Its
        `x-stream-id` is the first id's: a proxy sends it to the replica that serves all its ids."""
        request = batch_request(stream_ids, x, model=model, omit_state=omit_state)
        route = routing_metadata(stream_ids[0]) if stream_ids else ()
        with self._rpc():
            reply = self._stub.StepBatch(request, timeout=self.timeout, metadata=route)
        return batch_reply(reply, len(stream_ids))

    def _start_batch(
        self, stream_ids: Sequence[str], x: np.ndarray, *, model: str, omit_state: bool
    ) -> Callable[[], BatchReply]:
        """As `_send_batch`, without waiting (a ClusterClient's parts are in flight together); the
        function returned waits for the reply. (A blocking call costs less: grpc answers a future
        on its own thread, so the caller is woken by another thread.)"""
        request = batch_request(stream_ids, x, model=model, omit_state=omit_state)
        route = routing_metadata(stream_ids[0]) if stream_ids else ()
        with self._rpc():
            future = self._stub.StepBatch.future(request, timeout=self.timeout, metadata=route)

        def reply() -> BatchReply:
            with translated():
                return batch_reply(future.result(), len(stream_ids))

        return reply

    def _open_stream(self, requests: Iterator[pb.StepRequest], route: Metadata) -> Any:
        """A raw StepStream call (its replies are protobuf, for a ClusterClient to read the owner
        fields of): an iterator of replies with `cancel()`."""
        with self._rpc():
            return self._stub.StepStream(requests, timeout=self.timeout, metadata=route)

    def get_state(self, stream_id: str) -> StreamState:
        request, route = pb.GetStateRequest(stream_id=stream_id), routing_metadata(stream_id)
        with self._rpc():
            reply = self._stub.GetState(request, timeout=self.timeout, metadata=route)
        return stream_state(reply)

    def set_state(
        self, stream_id: str, state: Mapping[str, ArrayLike], *, model: str = "", step: int = 0
    ) -> StreamState:
        request = pb.SetStateRequest(
            stream_id=stream_id, model=model, state={n: tensor(v) for n, v in state.items()}, step=step
        )
        route = routing_metadata(stream_id)
        with self._rpc():
            reply = stream_state(self._stub.SetState(request, timeout=self.timeout, metadata=route))
        self._forget(stream_id)  # the readings kept for resending predate the state set
        return reply

    def delete(self, stream_id: str) -> bool:
        request, route = pb.DeleteStreamRequest(stream_id=stream_id), routing_metadata(stream_id)
        with self._rpc():
            reply = self._stub.DeleteStream(request, timeout=self.timeout, metadata=route)
        self._forget(stream_id)
        return bool(reply.existed)

    def _forget(self, stream_id: str) -> None:
        """A resuming client's numbering and kept readings of a stream set or deleted: the next
        reading asks the server where the stream is, and nothing older is ever resent."""
        self._sent.pop(stream_id, None)
        self._next_seq.pop(stream_id, None)

    def get_cluster_map(self) -> pb.ClusterMapInfo:
        """This server's name in its cluster, and the map it serves by (epoch 0: no map)."""
        with self._rpc():
            reply: pb.ClusterMapInfo = self._stub.GetClusterMap(
                pb.GetClusterMapRequest(), timeout=self.timeout
            )
        return reply

    def set_cluster_map(self, cluster_map: ClusterMap) -> pb.ClusterMapInfo:
        """Give this server a newer cluster map (an admin's call; an older epoch is refused with
        FailedPrecondition). It moves no stream: `cellstream cluster rebalance` does that."""
        request = pb.SetClusterMapRequest(map_json=cluster_map.to_json())
        with self._rpc():
            reply: pb.ClusterMapInfo = self._stub.SetClusterMap(request, timeout=self.timeout)
        return reply

    def list_models(self) -> list[pb.ModelInfo]:
        """The served models and their contracts (also what the shape checks are made against)."""
        with self._rpc():
            models = list(self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout).models)
        self._sizes.learn(models)
        return models

    def export_states(self, path: Path, models: Sequence[str] = ()) -> int:
        """Write the server's streams (or those of some models) to a snapshot file; returns its size.

        Written beside `path` and renamed over it once whole: a refused or broken call (a
        missing token, the server gone) leaves no partial file, and whatever was at `path`."""
        path = Path(path)
        partial = path.with_name(f".{path.name}.partial")
        request = pb.ExportStatesRequest(models=models)
        size = 0
        try:
            with partial.open("wb") as out, self._rpc():
                for chunk in self._stub.ExportStates(request, timeout=self.timeout):
                    out.write(chunk.data)
                    size += len(chunk.data)
            partial.replace(path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return size

    def import_states(self, path: Path) -> tuple[int, int]:
        """Load a snapshot file into the server; returns (restored, dropped) stream counts."""
        with path.open("rb") as source:

            def chunks() -> Iterator[pb.SnapshotChunk]:
                while data := source.read(1 << 20):
                    yield pb.SnapshotChunk(data=data)

            feed = Feed(chunks(), lambda chunk, _: chunk)
            try:
                with self._rpc():
                    reply = self._stub.ImportStates(iter(feed), timeout=self.timeout)
            except CellStreamError:
                feed.raise_failure()  # a file that could not be read is why the import failed
                raise
        feed.raise_failure()
        return int(reply.restored), int(reply.dropped)

    def health(self, service: str = "") -> bool:
        stub = health_pb2_grpc.HealthStub(self._channel)
        with self._rpc():
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
