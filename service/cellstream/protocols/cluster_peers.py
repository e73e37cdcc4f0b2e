"""At start, a replica asks its peers for their cluster maps and takes the newest one.

A replica that was away during a rebalance (or a new pod seeded from an old ConfigMap) would
otherwise serve by a map its peers no longer hold. Its own streams are kept as they are: a map
learned this way only changes what it serves from now on (a hand-off is the rebalance's to do).
Peers that do not answer within the timeout are skipped; `GetClusterMap` needs no token.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
from cellstream._proto.cellstream.v1 import cellstream_pb2_grpc as pb_grpc
from cellstream.cluster.cluster_map import ClusterMap
from cellstream.config import Settings
from cellstream.ownership import Ownership

log = logging.getLogger(__name__)


async def newest_from_peers(
    ownership: Ownership, credentials: grpc.ChannelCredentials | None, timeout: float
) -> ClusterMap | None:
    """The newest map any peer of this replica's map holds, if newer than its own."""
    newest: ClusterMap | None = None
    for name, address in ownership.map.replicas.items():
        if name == ownership.replica:
            continue
        channel = (
            grpc.aio.insecure_channel(address)
            if credentials is None
            else grpc.aio.secure_channel(address, credentials)
        )
        try:
            stub = pb_grpc.CellStreamStub(channel)
            info = await stub.GetClusterMap(pb.GetClusterMapRequest(), timeout=timeout)
            if info.epoch > (newest or ownership.map).epoch:
                newest = ClusterMap.from_json(info.map_json)
        except grpc.RpcError as exc:
            log.info("cluster map: peer %s (%s) did not answer: %s", name, address, exc.code().name)
        except ValueError as exc:
            log.warning("cluster map: peer %s (%s) holds a map that does not read: %s", name, address, exc)
        finally:
            await channel.close(grace=None)
    return newest


async def catch_up(ownership: Ownership, settings: Settings, *, tls: bool) -> None:
    """Serve by the newest map a peer holds, if newer than the one on disk (kept there too). Peers
    are dialled as this replica is served: over TLS trusting --tls-client-ca (or the system's roots)."""
    if settings.cluster_map is None or settings.cluster_peer_timeout <= 0:
        return
    ca = settings.tls_client_ca.read_bytes() if tls and settings.tls_client_ca is not None else None
    credentials = grpc.ssl_channel_credentials(root_certificates=ca) if tls else None
    newest = await newest_from_peers(ownership, credentials, settings.cluster_peer_timeout)
    if newest is not None:
        log.info("cluster map: epoch %d from a peer replaces epoch %d", newest.epoch, ownership.map.epoch)
        ownership.adopt(newest)
        await asyncio.to_thread(newest.write, settings.cluster_map)
