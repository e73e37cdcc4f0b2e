"""`ClusterClient`: a `Client` for a cluster of replicas, sending each stream's work to its owner.

As a Redis Cluster client does: it asks a seed for the cluster map (GetClusterMap), keeps one
`Client` per replica, and sends each call about a stream to the replica that owns the stream's
shard. A replica that does not serve a stream says who does (FAILED_PRECONDITION and the
`cellstream-owner*` trailers, or in-band on StepStream); the client then fetches the map again
and sends the refused work once more, to the owner by the newest map it found. Nothing refused
that way was applied, so the retry applies it once.

A StepBatch is split by owner, the parts are sent at once (one call per replica, in flight
together) and the replies are merged back in request order. The parts are separate calls: one
can fail while the others are applied, and the error then says so (`CellStreamError.partial`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

import grpc
import numpy as np

from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
from cellstream.client.auth import bearer
from cellstream.client.client import Client
from cellstream.client.cluster_stream import RoutedStream
from cellstream.client.errors import Cancelled, CellStreamError, InvalidArgument, NotFound, Unavailable
from cellstream.client.messages import ArrayLike, BatchReply, StepItem, StepReply, StreamState, as_floats
from cellstream.client.routing import Routes, SplitBatch, misroute_of
from cellstream.client.shapes import InputSizes
from cellstream.client.tls import TLS
from cellstream.cluster.cluster_map import ClusterMap

T = TypeVar("T")


class ClusterClient:
    """`ClusterClient(["cellstream-0.cellstream:50051"])`: the methods of `Client`, for a cluster.

    `seeds` are addresses of some of the replicas (one is enough); the map is asked of the first
    that answers, and a server without `--cluster-map` is a cluster of one. `tls`, `token`,
    `timeout`, `options` and the `resume*` settings are those of every replica's `Client`.

    A reading that fails UNAVAILABLE is sent again only when it has a `seq` (it is then applied
    once; the reply may be a replay): with `resume=True` this client numbers each stream's
    readings and each replica's client retries for up to `retry_seconds`; without it, a `seq` you
    give is retried the same way here, and a replica that then names a new owner (a shard moved
    meanwhile) is followed.
    """

    def __init__(
        self,
        seeds: Sequence[str],
        *,
        timeout: float | None = 30.0,
        options: Sequence[tuple[str, Any]] = (),
        tls: TLS | None = None,
        resume: bool = False,
        resume_window: int = 100_000,
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
        self.resume = resume
        self.retry_seconds = retry_seconds
        self._settings: dict[str, Any] = {
            "timeout": timeout,
            "options": options,
            "tls": tls,
            "resume": resume,
            "resume_window": resume_window,
            "retry_seconds": retry_seconds,
            "token": token,
        }
        self._has_token = token is not None
        self._clients: dict[str, Client] = {}
        self._lock = threading.Lock()  # guards _clients and map swaps; calls run outside it
        self._sizes = InputSizes()
        self._next_seq: dict[str, int] = {}
        self._closed = False
        found, failures = self._newest(self.seeds, wanted=0)
        if found is None:
            self.close()
            raise Unavailable(f"no seed answered GetClusterMap: {'; '.join(failures)}")
        self._routes = found

    def __repr__(self) -> str:
        token = "'<hidden>'" if self._has_token else "None"
        epoch = self._routes.epoch if hasattr(self, "_routes") else None
        return f"{type(self).__name__}({list(self.seeds)!r}, epoch={epoch}, token={token})"

    def __enter__(self) -> ClusterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    @property
    def cluster_map(self) -> ClusterMap | None:
        """The map in use (None: the seed has none, and serves every stream itself)."""
        return self._routes.map

    def replica(self, address: str) -> Client:
        """The `Client` of the replica at `address`, for what is one server's (`export_states`,
        `import_states`, `set_cluster_map`). It is this client's, made once and closed with it:
        do not close it yourself."""
        with self._lock:
            if self._closed:
                raise Cancelled("the cluster client is closed")
            client = self._clients.get(address)
            if client is None:
                client = self._clients[address] = Client(address, **self._settings)
            return client

    def refresh(self) -> ClusterMap | None:
        """Ask the replicas (then the seeds) for a newer map and use it if there is one."""
        self._refresh(self._routes.epoch + 1, first=())
        return self.cluster_map

    def _newest(self, addresses: Iterable[str], wanted: int) -> tuple[Routes | None, list[str]]:
        """The first map of epoch >= `wanted` these servers hold, else the newest one they hold."""
        best: Routes | None = None
        failures: list[str] = []
        for address in dict.fromkeys(addresses):
            try:
                routes = Routes.from_info(self.replica(address).get_cluster_map(), address)
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

    def _refresh(self, wanted: int, first: Sequence[str]) -> None:
        """Fetch a map of epoch >= `wanted` (asking `first` first); keep the newest found."""
        if self._routes.epoch >= wanted:
            return  # another thread found it meanwhile
        routes = self._routes
        found, _ = self._newest([*first, *routes.addresses, *self.seeds], wanted)
        with self._lock:
            if found is not None and found.epoch > self._routes.epoch:
                self._routes = found

    def _follow(self, error: CellStreamError, routes: Routes) -> bool:
        """For a refusal naming the stream's owner: fetch the newer map, say the call may go again."""
        misroute = misroute_of(error)
        if misroute is None:
            return False
        self._refresh(max(misroute.epoch, routes.epoch + 1), first=(misroute.address,))
        return True

    def _routed(self, stream_id: str, call: Callable[[Client], T], *, retry_unavailable: bool) -> T:
        """`call` on the stream's owner, following one misroute, and retrying UNAVAILABLE (with a
        capped back-off, for up to `retry_seconds`) where that is safe."""
        followed = False
        deadline, delay = time.monotonic() + self.retry_seconds, 0.05
        while True:
            routes = self._routes
            try:
                return call(self.replica(routes.address_of(stream_id)))
            except CellStreamError as error:
                if not followed and self._follow(error, routes):
                    followed = True
                    continue
                if error.code() != grpc.StatusCode.UNAVAILABLE or not retry_unavailable:
                    raise
                if time.monotonic() + delay > deadline:
                    raise
                followed = False  # (a shard that was moving answers with its new owner: follow it)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def step(self, stream_id: str, reading: ArrayLike, **options: Any) -> StepReply:
        """As `Client.step`, on the stream's owner."""
        if self.resume and not options.get("seq"):
            options["seq"] = self._next(stream_id)
        # A resuming replica client retries on its own; a seq given makes a retry here safe.
        retry = not self.resume and bool(options.get("seq"))
        reply = self._routed(
            stream_id, lambda client: client.step(stream_id, reading, **options), retry_unavailable=retry
        )
        if self.resume:
            if options.get("end"):
                self._next_seq.pop(stream_id, None)
            else:
                self._next_seq[stream_id] = reply.step + 1
        return reply

    def _next(self, stream_id: str) -> int:
        """The resuming client's next seq for a stream: asked of its owner once, then counted."""
        seq = self._next_seq.get(stream_id)
        if seq is None:
            try:
                seq = self.get_state(stream_id).step + 1
            except NotFound:
                seq = 1
            self._next_seq[stream_id] = seq
        return seq

    def get_state(self, stream_id: str) -> StreamState:
        return self._routed(stream_id, lambda client: client.get_state(stream_id), retry_unavailable=True)

    def set_state(
        self, stream_id: str, state: Mapping[str, ArrayLike], *, model: str = "", step: int = 0
    ) -> StreamState:
        self._next_seq.pop(stream_id, None)  # (the stream's step is what this sets)
        return self._routed(
            stream_id,
            lambda client: client.set_state(stream_id, state, model=model, step=step),
            retry_unavailable=True,  # it sets, it does not add: twice is once
        )

    def delete(self, stream_id: str) -> bool:
        self._next_seq.pop(stream_id, None)
        return self._routed(stream_id, lambda client: client.delete(stream_id), retry_unavailable=True)

    def list_models(self) -> list[pb.ModelInfo]:
        """The models, as the first replica that answers serves them (a cluster's replicas serve the
        same models; `streams` is that replica's)."""
        failure: CellStreamError | None = None
        for address in self._routes.addresses:
            try:
                models = self.replica(address).list_models()
            except CellStreamError as error:
                failure = failure or error
                continue
            self._sizes.learn(models)
            return models
        assert failure is not None
        raise failure

    def health(self, service: str = "") -> bool:
        """Whether every replica of the map is SERVING (an unreachable one raises, as for `Client`)."""
        return all([self.replica(address).health(service) for address in self._routes.addresses])

    def step_batch(
        self, stream_ids: Sequence[str], inputs: ArrayLike, *, model: str = "", omit_state: bool = False
    ) -> BatchReply:
        """As `Client.step_batch`: one part per owner, sent at once, merged back in request order."""
        x = self._batch_inputs(len(stream_ids), inputs, model)
        batch = SplitBatch(stream_ids, x, self._routes)
        while True:
            routes = self._routes
            *others, (address, ids, rows) = batch.requests()
            waits = [
                self.replica(a)._start_batch(i, r, model=model, omit_state=omit_state) for a, i, r in others
            ]  # (the last part is sent blocking, the cheaper call, while the others are in flight)
            send = self.replica(address)._send_batch
            last = _outcome(partial(send, ids, rows, model=model, omit_state=omit_state))
            outcomes = [*(_outcome(wait) for wait in waits), last]
            refusals = batch.answered(outcomes)
            if not refusals:
                return batch.reply()
            for refusal in refusals:
                if not self._follow(refusal, routes):
                    self._refresh(routes.epoch + 1, first=())  # a moving shard: its move may be over
            batch.resplit(self._routes)

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

    def step_stream(self, requests: Iterable[StepItem]) -> Iterator[StepReply]:
        """As `Client.step_stream`: one StepStream per owner, the replies in request order. A
        reading refused in-band because it is not the replica's (or its shard is moving) is sent
        once more, to its owner by the map fetched again."""
        return RoutedStream(self, requests).replies()


def _outcome(wait: Callable[[], BatchReply]) -> BatchReply | CellStreamError:
    try:
        return wait()
    except CellStreamError as error:
        return error
