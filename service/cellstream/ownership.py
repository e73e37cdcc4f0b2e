"""Which streams this replica serves: the shards the cluster map gives it.

Every replica checks every stream id it is asked about, whatever routed the call (a proxy, a
cluster-aware client, or a mistake): a stream of a shard owned elsewhere is refused with the
owner's name and address and the map's epoch, so the caller can go there; a shard being moved
away is refused as UNAVAILABLE, safe to retry with `seq` once the move is over. The shard is of
the id as its client sent it (what a proxy sees in `x-stream-id`), so every tenant's `s1` lives on
the same replica. Without a cluster map the server is a cluster of one and checks nothing.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence

import numpy as np

from cellstream import metrics
from cellstream.cluster.cluster_map import ClusterMap
from cellstream.cluster.shards import shard_of, shards_of
from cellstream.config import SettingError, Settings, names_of
from cellstream.errors import NotOwner, ShardMoving, quoted
from cellstream.ids import local_id

log = logging.getLogger(__name__)


class Ownership:
    """The cluster map in force on this replica, and the shards it is moving away."""

    def __init__(self, cluster_map: ClusterMap, replica: str) -> None:
        """A replica the map does not name serves no shard (a new one, joining: a rebalance gives
        it a map that does)."""
        self.replica = replica
        self.map = cluster_map
        self.moving: frozenset[int] = frozenset()
        self._mine = self._owned(cluster_map)
        self._gauges()

    def _gauges(self) -> None:
        metrics.CLUSTER_MAP_EPOCH.set(self.map.epoch)
        metrics.SHARDS_OWNED.set(int(self._mine.sum()))
        metrics.SHARDS_MOVING.set(len(self.moving))

    def _owned(self, cluster_map: ClusterMap) -> np.ndarray:
        return np.array([cluster_map.owner_of(s) == self.replica for s in range(cluster_map.shards)], bool)

    def begin_handoff(self, shards: Sequence[int]) -> None:
        """Refuse new work for these shards (UNAVAILABLE) until a map gives them away."""
        bad = [shard for shard in shards if not 0 <= shard < self.map.shards or not self._mine[shard]]
        if bad:
            raise ValueError(
                f"shard {bad[0]} is not one of this replica's (cluster map epoch {self.map.epoch})"
            )
        self.moving = self.moving | frozenset(shards)
        self._gauges()

    def cancel_handoff(self, shards: Sequence[int]) -> None:
        self.moving = self.moving - frozenset(shards)
        self._gauges()

    def given_away(self, cluster_map: ClusterMap) -> list[int]:
        """The shards this replica serves now that `cluster_map` gives to another."""
        return [
            s for s in range(self.map.shards) if self._mine[s] and cluster_map.owner_of(s) != self.replica
        ]

    def adopt(self, cluster_map: ClusterMap) -> None:
        """Take a newer map; an older (or the same) epoch is refused, so maps only move forwards.
        Hand-offs of shards it gives away are over; those it keeps go on."""
        if cluster_map.epoch <= self.map.epoch:
            raise ValueError(
                f"the cluster map of epoch {cluster_map.epoch} is not newer than this replica's "
                f"(epoch {self.map.epoch})"
            )
        if cluster_map.shards != self.map.shards:
            raise ValueError(
                f"a cluster keeps its {self.map.shards} shards; the new map has {cluster_map.shards}"
            )
        self._mine = self._owned(cluster_map)
        self.map = cluster_map
        self.moving = frozenset(shard for shard in self.moving if self._mine[shard])
        self._gauges()

    def _refusal(self, shard: int, stream_id: str, where: str) -> NotOwner | ShardMoving:
        if shard in self.moving:
            metrics.MISROUTED.labels(reason="moving").inc()
            return ShardMoving(
                f"{where}shard {shard} is moving to another replica: retry with seq shortly", shard=shard
            )
        owner = self.map.owner_of(shard)
        metrics.MISROUTED.labels(reason="not_owner").inc()
        return NotOwner(
            f"{where}stream {quoted(stream_id)} is in shard {shard}, served by replica {owner!r}, "
            f"not {self.replica!r} (cluster map epoch {self.map.epoch})",
            owner=owner,
            address=self.map.address_of(owner),
            epoch=self.map.epoch,
        )

    def shards_of_keys(self, keys: Sequence[str]) -> np.ndarray:
        """The shards of stream keys (of the ids their tenants know them by)."""
        return shards_of([local_id(key) for key in keys], self.map.shards)

    def check(self, stream_id: str) -> None:
        """Refuse a stream this replica does not serve now."""
        shard = shard_of(stream_id, self.map.shards)
        if not self._mine[shard] or shard in self.moving:
            raise self._refusal(shard, stream_id, "")

    def first_refused(
        self, stream_ids: Sequence[str], offset: int = 0
    ) -> tuple[int, NotOwner | ShardMoving] | None:
        """The first of a batch's ids this replica does not serve (its request index), if any."""
        shards = shards_of(stream_ids, self.map.shards)
        refused = ~self._mine[shards]
        if self.moving:
            refused |= np.isin(shards, list(self.moving))
        bad = np.flatnonzero(refused)
        if not len(bad):
            return None
        i = int(bad[0])
        return offset + i, self._refusal(int(shards[i]), stream_ids[i], f"stream_ids[{offset + i}]: ")


def ownership_from(settings: Settings) -> Ownership | None:
    """The shards this replica serves, from --cluster-map and --replica-name."""
    if settings.cluster_map is None:
        return None
    name = settings.replica_name or socket.gethostname()
    try:
        cluster_map = ClusterMap.read(settings.cluster_map)
    except ValueError as exc:  # (it changed since the settings were checked)
        raise SettingError(f"{names_of('cluster_map')}: {exc}") from None
    if name not in cluster_map.replicas:
        log.warning(
            "replica %r is not in the cluster map (epoch %d; replicas %s): it serves no stream until a "
            "rebalance gives it shards (or set %s)",
            name,
            cluster_map.epoch,
            ", ".join(sorted(cluster_map.replicas)),
            names_of("replica_name"),
        )
    return Ownership(cluster_map, name)
