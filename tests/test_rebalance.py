"""Shards handed off between real replicas by `cellstream cluster rebalance`: 3 -> 4 and back to 3,
every stream's state and step kept (against the ONNX reference), the old owner refusing with the
new owner's name, and a rebalance stopped half-way finished by running it again."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
from cellstream._proto.cellstream.v1.cellstream_pb2_grpc import CellStreamStub
from cellstream.cluster.cluster_map import ClusterMap
from cellstream.cluster.haproxy import render_map
from reference import reference_sequence
from support import MODELS, RunningServer, start_server

SHARDS = 32
STREAMS = [f"sensor-{i}" for i in range(60)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def readings(stream_id: str, count: int) -> np.ndarray:
    seed = sum(stream_id.encode())
    return np.random.default_rng(seed).standard_normal((count, 8)).astype(np.float32)


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.map_path = tmp / "map.json"
        self.servers: dict[str, RunningServer] = {}
        self.addresses: dict[str, str] = {}

    def stub(self, name: str) -> CellStreamStub:
        return CellStreamStub(grpc.insecure_channel(self.addresses[name]))

    def owner(self, stream_id: str) -> str:
        return ClusterMap.read(self.map_path).owner_of_stream(stream_id)

    def step_all(self, start: int, count: int) -> None:
        for stream_id in STREAMS:
            x = readings(stream_id, start + count)
            stub = self.stub(self.owner(stream_id))
            for t in range(start, start + count):
                reply = stub.Step(
                    pb.StepRequest(stream_id=stream_id, model="gru", input=x[t].tolist(), seq=t + 1)
                )
                assert reply.step == t + 1

    def check_all(self, count: int) -> None:
        for stream_id in STREAMS:
            state = self.stub(self.owner(stream_id)).GetState(pb.GetStateRequest(stream_id=stream_id))
            assert state.step == count
            _, states = reference_sequence(MODELS / "gru", readings(stream_id, count))
            np.testing.assert_allclose(
                np.array(state.state["h"].data), states[-1]["h"].ravel(), rtol=1e-5, atol=1e-6
            )

    def rebalance(self, *args: str) -> dict[str, object]:
        result = subprocess.run(
            [sys.executable, "-m", "cellstream", "cluster", "rebalance", "--map", str(self.map_path), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    names = {name: f"127.0.0.1:{free_port()}" for name in ("a", "b", "c")}
    ClusterMap.initial(names, SHARDS).write(tmp_path / "map.json")
    found = Cluster(tmp_path)
    for name, address in names.items():  # (the map names the ports the replicas then take)
        own = tmp_path / f"{name}.json"
        ClusterMap.read(found.map_path).write(own)
        found.servers[name] = start_server(
            tmp_path / name, "--cluster-map", str(own), "--replica-name", name, address=address
        )
        found.addresses[name] = address
    yield found
    for server in found.servers.values():
        assert server.stop() == 0, server.log()


def test_scaling_3_to_4_and_back_keeps_every_stream(cluster: Cluster) -> None:
    cluster.step_all(0, 3)
    before = {stream_id: cluster.owner(stream_id) for stream_id in STREAMS}
    d = f"127.0.0.1:{free_port()}"
    ClusterMap.read(cluster.map_path).write(cluster.tmp / "d.json")  # (not named: it serves nothing yet)
    cluster.servers["d"] = start_server(
        cluster.tmp / "d", "--cluster-map", str(cluster.tmp / "d.json"), "--replica-name", "d", address=d
    )
    cluster.addresses["d"] = d
    report = cluster.rebalance("--add", f"d={d}")
    assert report["epoch"] == 2 and report["shards_moved"] == SHARDS // 4
    moved = [stream_id for stream_id in STREAMS if cluster.owner(stream_id) != before[stream_id]]
    assert moved and all(cluster.owner(stream_id) == "d" for stream_id in moved)
    cluster.check_all(3)
    with pytest.raises(grpc.RpcError) as refused:  # the old owner sends callers on
        cluster.stub(before[moved[0]]).GetState(pb.GetStateRequest(stream_id=moved[0]))
    assert dict(refused.value.trailing_metadata() or ())["cellstream-owner"] == "d"
    cluster.step_all(3, 2)
    report = cluster.rebalance("--remove", "d")
    assert report["epoch"] == 3
    cluster.check_all(5)
    assert all(cluster.owner(stream_id) != "d" for stream_id in STREAMS)


def test_a_rebalance_stopped_half_way_is_finished_by_running_it_again(cluster: Cluster) -> None:
    cluster.step_all(0, 2)
    d = f"127.0.0.1:{free_port()}"
    ClusterMap.read(cluster.map_path).write(cluster.tmp / "d.json")
    cluster.servers["d"] = start_server(
        cluster.tmp / "d", "--cluster-map", str(cluster.tmp / "d.json"), "--replica-name", "d", address=d
    )
    cluster.addresses["d"] = d
    old = ClusterMap.read(cluster.map_path)
    new, moves = old.rebalanced(add={"d": d})
    new.write(cluster.map_path.with_name("map.json.next"))  # as a first run leaves it ...
    source = moves[0].source
    shards = [m.shard for m in moves if m.source == source]
    cluster.stub(source).BeginHandoff(
        pb.HandoffRequest(shards=shards)
    )  # ... stopped after one hand-off began
    moving = next(s for s in STREAMS if old.owner_of_stream(s) == source and new.owner_of_stream(s) == "d")
    with pytest.raises(grpc.RpcError) as busy:
        cluster.stub(source).Step(pb.StepRequest(stream_id=moving, model="gru", input=[0.0] * 8))
    assert busy.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "cellstream-shard-moving" in dict(busy.value.trailing_metadata() or ())
    assert cluster.rebalance("--add", f"d={d}")["epoch"] == 2
    assert not cluster.map_path.with_name("map.json.next").exists()
    cluster.check_all(2)


def test_a_rebalance_repoints_haproxy_to_the_new_owners(cluster: Cluster) -> None:
    from cellstream.client import Client  # noqa: PLC0415 - (it sends x-stream-id, which HAProxy routes by)
    from test_haproxy_routing import start_proxy  # noqa: PLC0415

    d = f"127.0.0.1:{free_port()}"
    ClusterMap.read(cluster.map_path).write(cluster.tmp / "d.json")
    cluster.servers["d"] = start_server(
        cluster.tmp / "d", "--cluster-map", str(cluster.tmp / "d.json"), "--replica-name", "d", address=d
    )
    cluster.addresses["d"] = d
    proxy = start_proxy(cluster.tmp / "proxy", ClusterMap.read(cluster.map_path), extra={"d": d})
    try:
        with Client(proxy.address) as client:
            for stream_id in STREAMS:
                assert client.step(stream_id, readings(stream_id, 1)[0], model="gru").step == 1
            report = cluster.rebalance(
                "--add",
                f"d={d}",
                "--haproxy-socket",
                str(proxy.socket_path),
                "--haproxy-map",
                str(proxy.map_path),
            )
            assert report["proxy_routes_set"] == SHARDS // 4
            for stream_id in STREAMS:  # (a misroute would be FAILED_PRECONDITION from the old owner)
                assert client.step(stream_id, readings(stream_id, 2)[1], model="gru").step == 2
        # (the map file too, so that a reload of HAProxy keeps the new routes)
        assert proxy.map_path.read_text() == render_map(ClusterMap.read(cluster.map_path))
    finally:
        proxy.stop()
    cluster.check_all(2)
