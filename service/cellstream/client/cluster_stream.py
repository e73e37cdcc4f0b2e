"""A ClusterClient's StepStream: one call per owner, the replies merged back in request order.

A thread reads the caller's requests and sends each to its owner's call. The replies are read in
request order: each call answers its own requests in the order they were sent, so the next reply
of the call that the oldest unanswered request went to answers the oldest it has unanswered.

A reading refused in-band because its replica does not serve it (or its shard is moving) was not
applied: it is sent once more, to the owner by the map fetched again. Meanwhile the thread sends
nothing, and goes on by the new map only once every request it sent by the old one is answered,
so a stream's later readings never overtake its resent one at the new owner.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any

import grpc

from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
from cellstream.client.errors import Unavailable, translated
from cellstream.client.messages import Feed, StepItem, StepReply, as_step_request, step_reply
from cellstream.client.routing import Routes, misroute_in, routing_metadata

if TYPE_CHECKING:
    from cellstream.client.client import Client
    from cellstream.client.cluster import ClusterClient

# Readings sent and not yet handed to the caller, all owners together: bounds what waits in
# memory when one replica is slower than the others (each call also has the server's window).
WINDOW = 4096
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


class _Entry:
    """One request: the owner call it went to last, and its reply once read."""

    __slots__ = ("call", "reply", "request", "resent")

    def __init__(self, request: pb.StepRequest) -> None:
        self.request = request
        self.call: _OwnerCall | None = None
        self.reply: pb.StepResponse | None = None
        self.resent = False


class _OwnerCall:
    """One replica's StepStream call and its requests not yet answered, in sending order."""

    def __init__(self, client: Client, address: str, first: pb.StepRequest) -> None:
        self.address = address
        self._requests: SimpleQueue[pb.StepRequest | None] = SimpleQueue()
        self.waiting: deque[_Entry] = deque()
        # Its x-stream-id is the first reading's: a proxy in between routes the call to its owner.
        route = routing_metadata(first.stream_id)
        self._call: Any = client._open_stream(iter(self._requests.get, None), route)

    def send(self, entry: _Entry) -> None:
        entry.call, entry.reply = self, None
        self.waiting.append(entry)  # (before the request goes: its reply cannot come first)
        self._requests.put(entry.request)

    def receive(self) -> None:
        """Read one reply: it answers the oldest request this call has unanswered."""
        with translated():
            reply = next(self._call, None)
        if reply is None:
            raise Unavailable(
                f"the StepStream to {self.address} ended with {len(self.waiting)} readings unanswered"
            )
        self.waiting.popleft().reply = reply

    def finish(self) -> None:
        """Say there are no more requests: the call ends once it has answered them."""
        self._requests.put(None)

    def wait_end(self) -> None:
        """Read the end of a finished call: its status, an error raised as a CellStreamError."""
        with translated():
            for _ in self._call:
                pass  # (every request was answered: nothing is left to read)

    def cancel(self) -> None:
        self._call.cancel()
        self._requests.put(None)  # frees grpc's thread waiting for a request


class RoutedStream:
    """The state of one `ClusterClient.step_stream` call."""

    def __init__(self, cluster: ClusterClient, requests: Iterable[StepItem]) -> None:
        self._cluster = cluster
        self._feed = Feed(requests, as_step_request)
        self._routes: Routes = cluster._routes  # this call's own: it changes only at a resend
        self._calls: dict[str, _OwnerCall] = {}
        self._order: deque[_Entry] = deque()  # sent, not yet handed to the caller
        self._changed = threading.Condition()
        self._paused = False
        self._last_by_old_map: _Entry | None = None  # the pause lasts until it is answered
        self._fed = False
        self._stopped = False
        self._failure: BaseException | None = None
        self._sender = threading.Thread(target=self._send_all, name="cellstream-step-stream", daemon=True)

    def _call_to(self, address: str, request: pb.StepRequest) -> _OwnerCall:
        call = self._calls.get(address)
        if call is None:
            call = self._calls[address] = _OwnerCall(self._cluster.replica(address), address, request)
        return call

    def _send_all(self) -> None:
        """The sending thread: each request to its owner, in the caller's order."""
        try:
            for request in self._feed:
                with self._changed:
                    while (self._paused or len(self._order) >= WINDOW) and not self._stopped:
                        self._changed.wait()
                    if self._stopped:
                        return
                    entry = _Entry(request)
                    self._call_to(self._routes.address_of(request.stream_id), request).send(entry)
                    self._order.append(entry)
                    self._changed.notify_all()
        except BaseException as exc:  # (the caller hears of it, not grpc's or this thread's log)
            self._failure = exc
        finally:
            with self._changed:
                self._fed = True
                self._changed.notify_all()

    def replies(self) -> Iterator[StepReply]:
        self._sender.start()
        answered = False
        try:
            while True:
                with self._changed:
                    while not self._order and not self._fed:
                        self._changed.wait()
                    if not self._order:
                        break
                    entry = self._order[0]
                assert entry.call is not None
                while entry.reply is None:
                    entry.call.receive()
                if not entry.resent and self._refused_for_now(entry.reply):
                    self._resend(entry)
                    continue
                with self._changed:
                    self._order.popleft()
                    if entry is self._last_by_old_map:
                        self._paused, self._last_by_old_map = False, None
                    self._changed.notify_all()
                yield step_reply(entry.reply)
            if self._failure is not None:
                raise self._failure
            answered = True
        finally:
            self._stop(answered)
        self._feed.raise_failure()

    @staticmethod
    def _refused_for_now(reply: pb.StepResponse) -> bool:
        """Refused before it was applied, for a reason the map fetched again may fix."""
        moving = reply.HasField("error") and reply.error.code == _UNAVAILABLE
        return moving or misroute_in(reply) is not None

    def _resend(self, entry: _Entry) -> None:
        with self._changed:
            if self._last_by_old_map is None:
                self._paused, self._last_by_old_map = True, self._order[-1]
        assert entry.reply is not None
        misroute = misroute_in(entry.reply)
        routes = self._routes
        wanted = routes.epoch + 1 if misroute is None else max(misroute.epoch, routes.epoch + 1)
        self._cluster._refresh(wanted, first=() if misroute is None else (misroute.address,))
        with self._changed:
            self._routes = self._cluster._routes
            entry.resent = True
            self._call_to(self._routes.address_of(entry.request.stream_id), entry.request).send(entry)

    def _stop(self, answered: bool) -> None:
        """End the calls: when every request was answered, by saying there are no more and reading
        each call's status (a failure is raised); at once if the caller stopped early or one failed."""
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
            calls = list(self._calls.values())
        if not answered:
            for call in calls:
                call.cancel()
            return
        for call in calls:
            call.finish()
        try:
            for call in calls:
                call.wait_end()
        except BaseException:
            for call in calls:
                call.cancel()  # (a no-op for those that ended)
            raise
