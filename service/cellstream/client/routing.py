"""Where a cluster client sends each stream's work, and how it reads a replica's "not mine".

Pure: no call is made here. `Routes` is a cluster map as the client uses it (the address that
serves each shard); `Misroute` is what a replica says when it does not serve a stream (the
`cellstream-owner*` trailers of a unary call, the `owner*` fields of a StepStream reply).
`SplitBatch` takes a StepBatch apart by owner and puts the replies back in request order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
from cellstream.client.errors import CellStreamError, PartialBatch, trailers_of
from cellstream.client.messages import BatchReply
from cellstream.cluster.cluster_map import ClusterMap
from cellstream.cluster.shards import ROUTING_HEADER, routing_value, shard_of, shards_of

OWNER, OWNER_ADDRESS, MAP_EPOCH = "cellstream-owner", "cellstream-owner-address", "cellstream-map-epoch"
# Ids of only these characters are their own header value: skipping `quote` saves ~2 us a call.
_PLAIN_ID = re.compile(r"[A-Za-z0-9._~-]+")
_ITEM = re.compile(r"^stream_ids\[(\d+)\]")
Metadata = tuple[tuple[str, str], ...]


def routing_metadata(stream_id: str) -> Metadata:
    """The `x-stream-id` header that lets a proxy in between route the call to the stream's owner."""
    value = stream_id if _PLAIN_ID.fullmatch(stream_id) else routing_value(stream_id)
    return ((ROUTING_HEADER, value),)


@dataclass(frozen=True)
class Misroute:
    """A replica's answer for a stream it does not serve: who does, by the map of `epoch`."""

    owner: str
    address: str
    epoch: int


def misroute_of(error: CellStreamError) -> Misroute | None:
    """The owner a FAILED_PRECONDITION names in its trailers; None for any other failure."""
    if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
        return None
    trailers = trailers_of(error)
    owner, address = trailers.get(OWNER), trailers.get(OWNER_ADDRESS)
    if not isinstance(owner, str) or not isinstance(address, str):
        return None
    epoch = trailers.get(MAP_EPOCH)
    return Misroute(owner, address, int(epoch) if isinstance(epoch, str) and epoch.isdigit() else 0)


def misroute_in(reply: pb.StepResponse) -> Misroute | None:
    """The owner a StepStream reply's in-band error names; None for a reply without one."""
    if not reply.HasField("error") or not reply.error.owner:
        return None
    return Misroute(reply.error.owner, reply.error.owner_address, int(reply.error.map_epoch))


class Routes:
    """The address serving each shard, from a cluster map; without one (a server started without
    `--cluster-map`, epoch 0), the one address every stream goes to."""

    def __init__(self, cluster_map: ClusterMap | None, solo: str) -> None:
        self.map = cluster_map
        self.addresses: tuple[str, ...]
        if cluster_map is None:
            self.epoch, self.shards, self.addresses = 0, 1, (solo,)
            index = np.zeros(1, np.intp)
        else:
            self.epoch, self.shards = cluster_map.epoch, cluster_map.shards
            self.addresses = tuple(cluster_map.replicas[name] for name in cluster_map.names)
            index = cluster_map.owner_indexes(np.arange(cluster_map.shards)).astype(np.intp)
        self._index = index
        self._by_shard = tuple(self.addresses[i] for i in index.tolist())

    @classmethod
    def from_info(cls, info: pb.ClusterMapInfo, address: str) -> Routes:
        """The routes of a GetClusterMap answer from `address`; ValueError for a map that is not valid."""
        if not info.epoch:
            return cls(None, address)
        return cls(ClusterMap.from_json(info.map_json), address)

    def address_of(self, stream_id: str) -> str:
        return self._by_shard[shard_of(stream_id, self.shards)]

    def split(self, stream_ids: Sequence[str]) -> list[tuple[str, np.ndarray | None]]:
        """Per owner, the positions of its ids in request order; `None` when one owner has them all
        (the batch goes as it is, nothing copied)."""
        owners = self._index[shards_of(stream_ids, self.shards)]
        if not owners.size or (owners == owners[0]).all():
            return [(self.addresses[int(owners[0]) if owners.size else 0], None)]
        order = np.argsort(owners, kind="stable")  # stable: each owner's ids keep their order
        bounds = np.flatnonzero(np.diff(owners[order])) + 1
        return [(self.addresses[int(owners[part[0]])], part) for part in np.split(order, bounds)]


Part = tuple[str, np.ndarray | None]  # an owner's address, and its positions in the request
# A server's own refusal of a StepBatch names the item it refused: nothing of it was applied,
# unlike an UNAVAILABLE of the transport, after which a batch (it has no `seq`) may have been.
_NAMED_ITEM = "stream_ids["


class SplitBatch:
    """One StepBatch taken apart by owner: the parts to send, what they answered, what to resend.

    A part refused before anything of it was applied (not the replica's, or a shard moving) is
    split again by the map fetched again and sent once more; any other failure is the batch's,
    with what the other parts applied (`CellStreamError.partial`).
    """

    def __init__(self, stream_ids: Sequence[str], x: np.ndarray, routes: Routes) -> None:
        self.n = len(stream_ids)
        self._ids, self._x = stream_ids, x
        self.parts: list[Part] = routes.split(stream_ids)
        self._done: list[tuple[np.ndarray | None, BatchReply]] = []
        self._refused: list[np.ndarray | None] = []
        self._resent = False

    def requests(self) -> list[tuple[str, Sequence[str], np.ndarray]]:
        """Each part's owner address, stream ids and rows of inputs."""
        return [
            (address, self._ids, self._x)
            if positions is None
            else (address, take(self._ids, positions), self._x[positions])
            for address, positions in self.parts
        ]

    def answered(self, outcomes: Sequence[BatchReply | CellStreamError]) -> list[CellStreamError]:
        """Take the parts' outcomes (in `parts` order); the refusals to follow before `resplit`
        (none: the batch is done). Raises the first failure that is not one of those."""
        refused: list[CellStreamError] = []
        failure: CellStreamError | None = None
        self._refused = []
        for (_, positions), outcome in zip(self.parts, outcomes, strict=True):
            if isinstance(outcome, BatchReply):
                self._done.append((positions, outcome))
            elif not self._resent and _may_resend(outcome):
                self._refused.append(positions)
                refused.append(outcome)
            elif failure is None:
                failure = reindexed(outcome, positions)
        if failure is not None:
            raise with_partial(failure, self.n, [(p, r) for p, r in self._done if p is not None])
        return refused

    def resplit(self, routes: Routes) -> None:
        """The refused parts, split by `routes`, are the parts to send (once more, and only once)."""
        self._resent = True
        self.parts = [
            (address, _within(positions, inner))
            for positions in self._refused
            for address, inner in routes.split(self._ids if positions is None else take(self._ids, positions))
        ]

    def reply(self) -> BatchReply:
        if len(self._done) == 1 and self._done[0][0] is None:
            return self._done[0][1]
        whole = np.arange(self.n)
        return merged(self.n, [(whole if p is None else p, r) for p, r in self._done])[0]


def _may_resend(error: CellStreamError) -> bool:
    if misroute_of(error) is not None:
        return True
    return error.code() == grpc.StatusCode.UNAVAILABLE and error.message.startswith(_NAMED_ITEM)


def _within(outer: np.ndarray | None, inner: np.ndarray | None) -> np.ndarray | None:
    """Positions in the request of a part of a part."""
    if inner is None:
        return outer
    return inner if outer is None else outer[inner]


def take(stream_ids: Sequence[str], positions: np.ndarray) -> list[str]:
    return [stream_ids[i] for i in positions.tolist()]


def reindexed(error: CellStreamError, positions: np.ndarray | None) -> CellStreamError:
    """`error` of a part of a split StepBatch, its `stream_ids[k]` renamed to the request's index."""
    if positions is None:
        return error
    match = _ITEM.match(error.message)
    if match is None or int(match.group(1)) >= len(positions):
        return error
    message = f"stream_ids[{int(positions[int(match.group(1))])}]{error.message[match.end() :]}"
    renamed = type(error)(message, step=error.step, trailing_metadata=trailers_of(error))
    renamed.partial = error.partial
    return renamed


def merged(n: int, parts: Sequence[tuple[np.ndarray, BatchReply]]) -> tuple[BatchReply, np.ndarray]:
    """One reply of `n` rows from the parts' replies (each with the request positions it answers),
    and which rows were answered (the others are zeros)."""
    first = parts[0][1]
    outputs = np.zeros((n, first.outputs.shape[1]), np.float32)
    states = {name: np.zeros((n, value.shape[1]), np.float32) for name, value in first.states.items()}
    steps = np.zeros(n, np.uint64)
    answered = np.zeros(n, bool)
    for positions, reply in parts:
        outputs[positions] = reply.outputs
        for name, value in reply.states.items():
            states[name][positions] = value
        steps[positions] = reply.steps
        answered[positions] = True
    return BatchReply(outputs, states, steps), answered


def with_partial(
    error: CellStreamError, n: int, parts: Sequence[tuple[np.ndarray, BatchReply]]
) -> CellStreamError:
    """`error` carrying the rows that other replicas applied (a split StepBatch is not atomic)."""
    if parts:
        reply, applied = merged(n, parts)
        error.partial = PartialBatch(applied, reply)
        count = int(applied.sum())
        error.message += (
            f" (the StepBatch was split across replicas: {count} of its {n} readings were applied "
            "by the others; error.partial says which)"
        )
    return error
