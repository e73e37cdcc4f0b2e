"""Every replica checks that it serves the streams it is asked about, whatever routed the call: a
stream of a shard owned elsewhere is refused FAILED_PRECONDITION with the owner in trailers (in-band
on StepStream), a StepBatch naming one is refused whole, and nothing is applied."""

from __future__ import annotations

import socket
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
from cellstream._proto.cellstream.v1.cellstream_pb2_grpc import CellStreamStub
from cellstream.cluster.cluster_map import ClusterMap
from support import RunningServer, start_server
from test_settings import serve

SHARDS = 16
REPLICAS = {"alpha": "alpha.test:50051", "beta": "beta.test:50051"}


def owner(stream_id: str, cluster: ClusterMap) -> str:
    """Independent of the server's code: zlib's CRC-32 of the UTF-8 id, mod the shard count."""
    shard = zlib.crc32(stream_id.encode()) % SHARDS
    (name,) = [n for n, ranges in cluster.ranges.items() if any(a <= shard < b for a, b in ranges)]
    return name


def ids_of(name: str, cluster: ClusterMap, count: int, prefix: str = "s") -> list[str]:
    found = [f"{prefix}{i}" for i in range(1000) if owner(f"{prefix}{i}", cluster) == name]
    return found[:count]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ClusterMap, RunningServer]]:
    tmp = tmp_path_factory.mktemp("ownership")
    cluster = ClusterMap.initial(REPLICAS, SHARDS)
    path = tmp / "map.json"
    cluster.write(path)
    running = start_server(tmp, "--cluster-map", str(path), "--replica-name", "alpha")
    yield cluster, running
    assert running.stop() == 0, running.log()


def test_a_stream_of_this_replica_is_served_and_one_of_another_is_refused_naming_its_owner(
    cluster: tuple[ClusterMap, RunningServer],
) -> None:
    cmap, server = cluster
    (mine,) = ids_of("alpha", cmap, 1)
    (theirs,) = ids_of("beta", cmap, 1)
    with grpc.insecure_channel(server.address) as channel:
        stub = CellStreamStub(channel)
        assert stub.Step(pb.StepRequest(stream_id=mine, model="gru", input=[0.1] * 8)).step == 1
        with pytest.raises(grpc.RpcError) as refused:
            stub.Step(pb.StepRequest(stream_id=theirs, model="gru", input=[0.1] * 8))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        trailers = dict(refused.value.trailing_metadata() or ())
        assert trailers["cellstream-owner"] == "beta"
        assert trailers["cellstream-owner-address"] == "beta.test:50051"
        assert trailers["cellstream-map-epoch"] == str(cmap.epoch)
        assert "served by replica 'beta', not 'alpha'" in (refused.value.details() or "")
        for call, request in [
            (stub.GetState, pb.GetStateRequest(stream_id=theirs)),
            (stub.DeleteStream, pb.DeleteStreamRequest(stream_id=theirs)),
            (stub.SetState, pb.SetStateRequest(stream_id=theirs, model="gru", state={}, step=0)),
        ]:
            with pytest.raises(grpc.RpcError) as other:
                call(request)
            assert other.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_step_batch_naming_another_replicas_stream_is_refused_whole(
    cluster: tuple[ClusterMap, RunningServer],
) -> None:
    cmap, server = cluster
    mine = ids_of("alpha", cmap, 3, prefix="b")
    (theirs,) = ids_of("beta", cmap, 1, prefix="b")
    ids = [mine[0], mine[1], theirs, mine[2]]
    with grpc.insecure_channel(server.address) as channel:
        stub = CellStreamStub(channel)
        request = pb.StepBatchRequest(model="gru", stream_ids=ids, inputs=np.ones(32, "<f4").tobytes())
        with pytest.raises(grpc.RpcError) as refused:
            stub.StepBatch(request)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert (refused.value.details() or "").startswith("stream_ids[2]: ")
        assert dict(refused.value.trailing_metadata() or ())["cellstream-owner"] == "beta"
        for stream_id in mine:  # nothing was applied
            with pytest.raises(grpc.RpcError) as unknown:
                stub.GetState(pb.GetStateRequest(stream_id=stream_id))
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_step_stream_refuses_another_replicas_stream_in_band_and_goes_on(
    cluster: tuple[ClusterMap, RunningServer],
) -> None:
    cmap, server = cluster
    (mine,) = ids_of("alpha", cmap, 1, prefix="st")
    (theirs,) = ids_of("beta", cmap, 1, prefix="st")
    requests = [pb.StepRequest(stream_id=i, model="gru", input=[0.2] * 8) for i in (theirs, mine)]
    with grpc.insecure_channel(server.address) as channel:
        replies = list(CellStreamStub(channel).StepStream(iter(requests)))
    assert replies[0].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "served by replica 'beta'" in replies[0].error.message
    assert replies[1].step == 1 and not replies[1].error.code


def test_a_replica_the_map_does_not_name_serves_nothing_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    cmap = ClusterMap.initial(REPLICAS, SHARDS)
    cmap.write(path)
    server = start_server(tmp_path / "s", "--cluster-map", str(path), "--replica-name", "gamma")
    try:
        assert "replica 'gamma' is not in the cluster map" in server.log()
        with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as refused:
            CellStreamStub(channel).Step(pb.StepRequest(stream_id="any", model="gru", input=[0.1] * 8))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert dict(refused.value.trailing_metadata() or ())["cellstream-owner"] == owner("any", cmap)
    finally:
        assert server.stop() == 0


def test_a_bad_cluster_map_stops_the_start_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "map.json"
    path.write_text('{"epoch": 1, "shards": 4, "replicas": {"a": "h:1"}, "ranges": {"a": [[0, 3]]}}')
    result = serve("--cluster-map", str(path), "--replica-name", "a", "--metrics-address", "")
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"cellstream serve: --cluster-map '{path}'")


def test_get_and_set_cluster_map_move_forwards_only_and_are_kept_on_disk(tmp_path: Path) -> None:
    cmap = ClusterMap.initial(REPLICAS, SHARDS)
    path = tmp_path / "map.json"
    cmap.write(path)
    server = start_server(tmp_path / "s", "--cluster-map", str(path), "--replica-name", "alpha")
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = CellStreamStub(channel)
            info = stub.GetClusterMap(pb.GetClusterMapRequest())
            assert (info.replica, info.epoch) == ("alpha", 1)
            assert ClusterMap.from_json(info.map_json) == cmap
            (theirs,) = ids_of("beta", cmap, 1, prefix="m")
            replies = list(
                stub.StepStream(iter([pb.StepRequest(stream_id=theirs, model="gru", input=[0.3] * 8)]))
            )
            error = replies[0].error
            assert (error.owner, error.owner_address, error.map_epoch) == ("beta", "beta.test:50051", 1)
            solo, _ = cmap.rebalanced(remove=["beta"])  # epoch 2: every shard is alpha's
            with pytest.raises(grpc.RpcError) as stale:
                stub.SetClusterMap(pb.SetClusterMapRequest(map_json=cmap.to_json()))
            assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "not newer" in (stale.value.details() or "")
            with pytest.raises(grpc.RpcError) as junk:
                stub.SetClusterMap(pb.SetClusterMapRequest(map_json="{}"))
            assert junk.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert stub.SetClusterMap(pb.SetClusterMapRequest(map_json=solo.to_json())).epoch == 2
            assert stub.Step(pb.StepRequest(stream_id=theirs, model="gru", input=[0.3] * 8)).step == 1
        assert ClusterMap.read(path) == solo
    finally:
        assert server.stop() == 0


def test_a_server_without_a_cluster_map_is_a_cluster_of_one(tmp_path: Path) -> None:
    server = start_server(tmp_path / "s")
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = CellStreamStub(channel)
            assert stub.GetClusterMap(pb.GetClusterMapRequest()).epoch == 0
            one = ClusterMap.initial({"alpha": "a.test:1"}, SHARDS)
            with pytest.raises(grpc.RpcError) as refused:
                stub.SetClusterMap(pb.SetClusterMapRequest(map_json=one.to_json()))
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        assert server.stop() == 0


def test_the_map_epoch_shards_and_misroutes_are_on_metrics(cluster: tuple[ClusterMap, RunningServer]) -> None:
    import urllib.request  # noqa: PLC0415

    cmap, server = cluster
    (theirs,) = ids_of("beta", cmap, 1, prefix="metric")
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError):
        CellStreamStub(channel).GetState(pb.GetStateRequest(stream_id=theirs))
    with urllib.request.urlopen(f"http://{server.metrics_address}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"
    }
    assert values["cellstream_cluster_map_epoch"] == cmap.epoch
    assert values["cellstream_shards_owned"] == len(cmap.shards_owned("alpha"))
    assert values['cellstream_misrouted_total{reason="not_owner"}'] >= 1


def test_a_replica_that_missed_a_map_takes_the_newest_its_peers_hold_at_start(tmp_path: Path) -> None:
    ports = {}
    for name in ("alpha", "beta"):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports[name] = f"127.0.0.1:{probe.getsockname()[1]}"
    first = ClusterMap.initial(ports, SHARDS)
    second, _ = first.rebalanced(remove=["alpha"])  # epoch 2: beta has every shard
    beta_map, alpha_map = tmp_path / "beta.json", tmp_path / "alpha.json"
    second.write(beta_map)
    first.write(alpha_map)  # alpha was away when epoch 2 went out
    beta = start_server(
        tmp_path / "b", "--cluster-map", str(beta_map), "--replica-name", "beta", address=ports["beta"]
    )
    alpha = start_server(
        tmp_path / "a", "--cluster-map", str(alpha_map), "--replica-name", "alpha", address=ports["alpha"]
    )
    try:
        assert "cluster map: epoch 2 from a peer replaces epoch 1" in alpha.log()
        assert ClusterMap.read(alpha_map) == second
        with grpc.insecure_channel(alpha.address) as channel:
            assert CellStreamStub(channel).GetClusterMap(pb.GetClusterMapRequest()).epoch == 2
    finally:
        assert alpha.stop() == 0 and beta.stop() == 0
