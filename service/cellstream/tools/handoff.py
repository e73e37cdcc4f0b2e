"""Moving shards between replicas without losing a reading (`cellstream cluster rebalance`).

For each group of shards going from one replica to another: the source stops taking work for
them (UNAVAILABLE, which clients retry with `seq`) and finishes what it had queued; its streams of
those shards (state, step, last reply, tenant) are exported and imported by the target; then the
new map (epoch + 1) goes to every replica, targets first, and to the map file; a source that adopts
it drops its copies. The planned map is kept next to the map file (`MAP.next`) before anything
moves, so a rebalance stopped half-way is finished by running it again.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
from cellstream._proto.cellstream.v1 import cellstream_pb2_grpc as pb_grpc
from cellstream.cluster.cluster_map import ClusterMap
from cellstream.cluster.haproxy import apply_commands, haproxy_set_map_commands, write_map_file
from cellstream.tools.client_options import tls_from, token_from

TIMEOUT = 600.0  # seconds for one export or import of a shard group
CHUNK = 1 << 20  # bytes per SnapshotChunk


class Replicas:
    """One channel and stub per replica address, with the caller's TLS and token."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._tls, token = tls_from(args), token_from(args)
        self._metadata = () if token is None else (("authorization", f"Bearer {token}"),)
        self._stubs: dict[str, tuple[grpc.Channel, Any]] = {}

    def stub(self, address: str) -> Any:
        if address not in self._stubs:
            if self._tls is None:
                channel = grpc.insecure_channel(address)
            else:
                channel = grpc.secure_channel(address, self._tls.credentials(), options=self._tls.options())
            self._stubs[address] = channel, pb_grpc.CellStreamStub(channel)  # type: ignore[no-untyped-call]
        return self._stubs[address][1]

    def call(self, address: str, method: str, request: Any, timeout: float = 30.0) -> Any:
        return getattr(self.stub(address), method)(request, metadata=self._metadata, timeout=timeout)

    def stream(self, address: str, method: str, request: Any) -> Iterator[Any]:
        return getattr(self.stub(address), method)(request, metadata=self._metadata, timeout=TIMEOUT)  # type: ignore[no-any-return]

    def close(self) -> None:
        for channel, _ in self._stubs.values():
            channel.close()


def epochs(replicas: Replicas, cluster_map: ClusterMap) -> dict[str, int]:
    """Each replica's map epoch, as it says (-1 for one that does not answer)."""
    found = {}
    for name, address in cluster_map.replicas.items():
        try:
            found[name] = int(replicas.call(address, "GetClusterMap", pb.GetClusterMapRequest()).epoch)
        except grpc.RpcError:
            found[name] = -1
    return found


def planned(path: Path, add: Mapping[str, str], remove: Sequence[str]) -> tuple[ClusterMap, ClusterMap]:
    """(the map in force, the map to move to): a plan left by a stopped run wins over a new one."""
    current = ClusterMap.read(path)
    pending = path.with_name(path.name + ".next")
    if pending.exists():
        target = ClusterMap.read(pending)
        if target.epoch == current.epoch + 1:
            return current, target
    target, _ = current.rebalanced(add=dict(add), remove=list(remove))
    target.write(pending)
    return current, target


def moves_between(old: ClusterMap, new: ClusterMap) -> dict[tuple[str, str], list[int]]:
    """Shards that change owner, grouped by (source, target)."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for shard in range(old.shards):
        source, target = old.owner_of(shard), new.owner_of(shard)
        if source != target:
            groups[(source, target)].append(shard)
    return dict(groups)


def hand_off(
    replicas: Replicas, old: ClusterMap, new: ClusterMap, move: tuple[str, str], shards: list[int]
) -> int:
    """Move one group of shards; returns the streams moved (0 when the source gave them up already)."""
    source, target = old.address_of(move[0]), new.address_of(move[1])
    try:
        replicas.call(source, "BeginHandoff", pb.HandoffRequest(shards=shards), timeout=TIMEOUT)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:  # (it adopted the new map: moved already)
            return 0
        raise
    data = b"".join(
        c.data for c in replicas.stream(source, "ExportStates", pb.ExportStatesRequest(shards=shards))
    )
    chunks = (pb.SnapshotChunk(data=data[i : i + CHUNK]) for i in range(0, max(len(data), 1), CHUNK))
    reply = replicas.call(target, "ImportStates", chunks, timeout=TIMEOUT)
    return int(reply.restored)


def push(replicas: Replicas, new: ClusterMap, addresses: Mapping[str, str]) -> None:
    """Give every replica the new map (those that hold it already are left as they are)."""
    request = pb.SetClusterMapRequest(map_json=new.to_json())
    for address in addresses.values():
        try:
            replicas.call(address, "SetClusterMap", request, timeout=TIMEOUT)
        except grpc.RpcError as exc:
            held = replicas.call(address, "GetClusterMap", pb.GetClusterMapRequest()).epoch
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION or held < new.epoch:
                raise


def rebalance(args: argparse.Namespace, replicas: Replicas) -> dict[str, Any]:
    old, new = planned(args.map, dict(args.add), args.remove)
    groups = moves_between(old, new)
    moved = {f"{s}->{t}": hand_off(replicas, old, new, (s, t), shards) for (s, t), shards in groups.items()}
    targets = {name: new.address_of(name) for name in new.names if any(t == name for _, t in groups)}
    others = {name: new.address_of(name) for name in new.names if name not in targets}
    removed = {name: old.address_of(name) for name in old.names if name not in new.replicas}
    push(replicas, new, {**targets, **others, **removed})
    proxied = 0
    if args.haproxy_socket is not None:  # (its map file first: a reload of HAProxy keeps the new routes)
        write_map_file(new, args.haproxy_map)
        proxied = apply_commands(
            args.haproxy_socket, haproxy_set_map_commands(old, new, map_path=args.haproxy_map)
        )
    new.write(args.map)
    args.map.with_name(args.map.name + ".next").unlink(missing_ok=True)
    shards_moved = sum(map(len, groups.values()))
    return {
        "epoch": new.epoch,
        "shards_moved": shards_moved,
        "streams_moved": moved,
        "proxy_routes_set": proxied,
    }
