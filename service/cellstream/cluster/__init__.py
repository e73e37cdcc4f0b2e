"""Scale-out foundations: the shard of a stream, the cluster map, the HAProxy routing config.

Pure code below the protocols (no grpc, no protobuf), importable by the server, the SDK and the
tools alike:

- `shards`: `shard_of(id, shards)` = crc32(utf-8 id) mod shards, what HAProxy computes too, and
  the `x-stream-id` header value a call carries for a proxy.
- `cluster_map`: `ClusterMap`, which replica owns each shard at which epoch; `initial` and
  `rebalanced`.
- `haproxy`: the HAProxy config and map file that route each call to its shard's owner, and the
  runtime-API commands that re-point moved shards without a reload.
"""

from __future__ import annotations

from cellstream.cluster.cluster_map import ClusterMap, ShardMove
from cellstream.cluster.shards import (
    DEFAULT_SHARDS,
    ROUTING_HEADER,
    routing_value,
    shard_of,
    shards_of,
    stream_id_of,
)

__all__ = [
    "DEFAULT_SHARDS",
    "ROUTING_HEADER",
    "ClusterMap",
    "ShardMove",
    "routing_value",
    "shard_of",
    "shards_of",
    "stream_id_of",
]
