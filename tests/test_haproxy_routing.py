"""Through a real HAProxy with the generated config, in front of real replicas: every call lands on
the owner of its stream's shard.

Replicas do not check ownership yet, so where a call landed is read from the replicas themselves:
the stream exists on its owner (by `shard_of` and the map) and on no other replica.
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
from cellstream._proto.cellstream.v1 import cellstream_pb2_grpc as pb_grpc
from cellstream.cluster import ClusterMap, routing_value, shard_of
from cellstream.cluster import haproxy as proxy_config
from cellstream.cluster.haproxy import haproxy_set_map_commands, render_map
from cellstream.tools import cluster as cluster_tool
from reference import reference_sequence
from support import MODELS, RunningServer, start_server, wait_for

HAPROXY = shutil.which("haproxy")
THREE = {f"cellstream-{i}": f"cellstream-{i}.cellstream:50051" for i in range(3)}
X = np.linspace(-1, 1, 8, dtype=np.float32)
# "ü" * 128 is 256 bytes, the longest id; req.hdr would hash only the "b" of "a,b"; url_dec turns
# the '+' of "q?x+y" into a space unless it is encoded.
UNUSUAL_IDS = ["é", "ü" * 128, "日本語のストリーム", "emoji-🚀", "a,b", "with space", " lead", "trail "]
UNUSUAL_IDS += ["100%", "q?x+y", "slash/x", "x" * 256]


@dataclass
class Proxy:
    process: subprocess.Popen[bytes]
    address: str
    socket_path: Path
    map_path: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def states(self) -> dict[str, str]:
        """Each replica backend's server status (UP, DOWN, ...), from the runtime API."""
        text = proxy_config.runtime_command(self.socket_path, "show stat").removeprefix("# ")
        return {
            row["pxname"]: row["status"]
            for row in csv.DictReader(io.StringIO(text))
            if row["svname"] == row["pxname"]
        }

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(10)


def start_proxy(tmp: Path, cluster_map: ClusterMap, extra: dict[str, str] | None = None) -> Proxy:
    """HAProxy in the foreground on a listening socket made here (so no port can be taken in
    between), with the generated files; returns once every backend's gRPC health check passes."""
    if HAPROXY is None:
        pytest.skip("the haproxy binary is missing (Debian: apt-get install haproxy; .ci/run installs it)")
    listener = socket.create_server(("127.0.0.1", 0))
    settings = proxy_config.ProxySettings(
        map_path=tmp / "shards.map",
        socket_path=tmp / "haproxy.sock",
        bind=f"fd@{listener.fileno()}",
        check_interval_ms=200,
    )
    config, _ = proxy_config.write(cluster_map, tmp, settings, extra)
    checked = subprocess.run(
        [HAPROXY, "-c", "-f", str(config)],
        capture_output=True,
        text=True,
        check=False,
        pass_fds=[listener.fileno()],
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    log_path = tmp / "haproxy.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=[listener.fileno()],
        )
    host, port = listener.getsockname()
    address = f"{host}:{port}"
    listener.close()
    proxy = Proxy(process, address, settings.socket_path, settings.map_path, log_path)
    replicas = {**cluster_map.replicas, **(extra or {})}

    def all_up() -> bool:
        assert process.poll() is None, proxy.log()
        try:
            return proxy.states() == dict.fromkeys(replicas, "UP")
        except proxy_config.RuntimeAPIError:
            return False

    try:
        wait_for(all_up, timeout=30)
    except BaseException:
        proxy.stop()
        raise
    return proxy


def step(stub: pb_grpc.CellStreamStub, stream_id: str) -> tuple[pb.StepResponse, dict[str, str]]:
    """One Step with the header a proxy routes by; returns the reply and its metadata."""
    reply, call = stub.Step.with_call(
        pb.StepRequest(stream_id=stream_id, input=X.tolist(), omit_state=True),
        metadata=[("x-stream-id", routing_value(stream_id))],
        timeout=10,
    )
    return reply, dict(call.initial_metadata())


def holders(replicas: dict[str, pb_grpc.CellStreamStub], stream_ids: list[str]) -> dict[str, list[str]]:
    """For each id, the replicas that hold a stream of that id (asked of each replica directly)."""

    def held(name: str, stream_id: str) -> bool:
        try:
            replicas[name].GetState(pb.GetStateRequest(stream_id=stream_id), timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
            return False
        return True

    pairs = [(name, stream_id) for stream_id in stream_ids for name in replicas]
    with ThreadPoolExecutor(8) as pool:
        found = list(pool.map(lambda pair: held(*pair), pairs))
    result: dict[str, list[str]] = {stream_id: [] for stream_id in stream_ids}
    for (name, stream_id), is_held in zip(pairs, found, strict=True):
        if is_held:
            result[stream_id].append(name)
    return result


@dataclass
class Cluster:
    servers: dict[str, RunningServer]
    cluster_map: ClusterMap
    proxy: Proxy
    stub: pb_grpc.CellStreamStub  # through the proxy
    direct: dict[str, pb_grpc.CellStreamStub]  # to each replica


def direct_stubs(servers: dict[str, RunningServer]) -> dict[str, pb_grpc.CellStreamStub]:
    return {name: pb_grpc.CellStreamStub(grpc.insecure_channel(s.address)) for name, s in servers.items()}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if HAPROXY is None:
        pytest.skip("the haproxy binary is missing (Debian: apt-get install haproxy; .ci/run installs it)")
    servers = {f"cellstream-{i}": start_server(tmp_path_factory.mktemp(f"replica{i}")) for i in range(3)}
    try:
        cluster_map = ClusterMap.initial({name: s.address for name, s in servers.items()})
        proxy = start_proxy(tmp_path_factory.mktemp("haproxy"), cluster_map)
        try:
            with grpc.insecure_channel(proxy.address) as channel:
                yield Cluster(
                    servers, cluster_map, proxy, pb_grpc.CellStreamStub(channel), direct_stubs(servers)
                )
        finally:
            proxy.stop()
    finally:
        for server in servers.values():
            server.stop()


def test_step_calls_for_1000_ids_all_land_on_their_owners(cluster: Cluster) -> None:
    ids = [f"routing-{i}" for i in range(1000)]
    expected, _ = reference_sequence(MODELS / "gru", X[None])
    for stream_id in ids:
        reply, metadata = step(cluster.stub, stream_id)
        assert reply.step == 1 and reply.stream_id == stream_id
        np.testing.assert_allclose(reply.output, expected[0], atol=1e-6)
        assert int(metadata[proxy_config.SHARD_HEADER]) == shard_of(stream_id, cluster.cluster_map.shards)
    found = holders(cluster.direct, ids)
    misrouted = {s: where for s, where in found.items() if where != [cluster.cluster_map.owner_of_stream(s)]}
    assert not misrouted
    assert {where[0] for where in found.values()} == set(cluster.servers)  # every replica took its share


def test_proxy_crc32_agrees_with_shard_of_for_ids_beyond_ascii(cluster: Cluster) -> None:
    for stream_id in UNUSUAL_IDS:
        reply, metadata = step(cluster.stub, stream_id)
        assert reply.stream_id == stream_id
        assert int(metadata[proxy_config.SHARD_HEADER]) == shard_of(stream_id, 256), stream_id
    found = holders(cluster.direct, UNUSUAL_IDS)
    assert found == {s: [cluster.cluster_map.owner_of_stream(s)] for s in UNUSUAL_IDS}


def test_calls_without_a_stream_id_go_to_any_replica(cluster: Cluster) -> None:
    with grpc.insecure_channel(cluster.proxy.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    models = cluster.stub.ListModels(pb.ListModelsRequest(), timeout=10)
    assert "gru" in {m.name for m in models.models}
    # Steps with no header are spread round-robin: more than one replica takes them.
    ids = [f"unrouted-{i}" for i in range(6)]
    for stream_id in ids:
        cluster.stub.Step(pb.StepRequest(stream_id=stream_id, input=X.tolist(), omit_state=True), timeout=10)
    found = holders(cluster.direct, ids)
    assert all(len(where) == 1 for where in found.values()) and len({w[0] for w in found.values()}) > 1


def test_set_map_re_points_moved_shards_to_a_new_replica_without_a_reload(
    cluster: Cluster, tmp_path: Path
) -> None:
    newcomer = start_server(tmp_path / "replica3")
    new, moves = cluster.cluster_map.rebalanced(add={"cellstream-3": newcomer.address})
    proxy = start_proxy(tmp_path / "haproxy", cluster.cluster_map, extra={"cellstream-3": newcomer.address})
    try:
        commands = proxy_config.haproxy_set_map_commands(cluster.cluster_map, new, map_path=proxy.map_path)
        assert proxy_config.apply_commands(proxy.socket_path, commands) == len(moves) == 64
        shown = proxy_config.runtime_command(proxy.socket_path, f"show map {proxy.map_path}")
        assert sum(line.endswith(" cellstream-3") for line in shown.splitlines()) == 64
        ids = [f"moved-{i}" for i in range(200)]
        with grpc.insecure_channel(proxy.address) as channel:
            stub = pb_grpc.CellStreamStub(channel)
            for stream_id in ids:
                step(stub, stream_id)
        found = holders({**cluster.direct, **direct_stubs({"cellstream-3": newcomer})}, ids)
        assert found == {s: [new.owner_of_stream(s)] for s in ids}
        assert any(where == ["cellstream-3"] for where in found.values())
        with pytest.raises(proxy_config.RuntimeAPIError, match="HAProxy refused 'set map /nope 1 x'"):
            proxy_config.apply_commands(proxy.socket_path, ["set map /nope 1 x"])
    finally:
        proxy.stop()


def test_a_stopped_replica_is_taken_out_and_its_shards_answer_unavailable(
    cluster: Cluster, tmp_path: Path
) -> None:
    doomed = start_server(tmp_path / "replica3")
    four = ClusterMap.initial(
        {**{n: s.address for n, s in cluster.servers.items()}, "cellstream-3": doomed.address}
    )
    proxy = start_proxy(tmp_path / "haproxy", four)
    try:
        doomed.stop()
        wait_for(lambda: proxy.states()["cellstream-3"] == "DOWN", timeout=30)
        orphan = next(f"o-{i}" for i in range(10_000) if four.owner_of_stream(f"o-{i}") == "cellstream-3")
        kept = next(f"k-{i}" for i in range(10_000) if four.owner_of_stream(f"k-{i}") == "cellstream-0")
        with grpc.insecure_channel(proxy.address) as channel:
            stub = pb_grpc.CellStreamStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                step(stub, orphan)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # retry with seq once it is back
            assert step(stub, kept)[0].step == 1
    finally:
        proxy.stop()


# --- the files HAProxy is given (no proxy needed but for `haproxy -c`) -------------------------------


def test_map_file_names_every_shards_owner() -> None:
    cluster_map = ClusterMap.initial(THREE)
    lines = render_map(cluster_map).splitlines()
    assert lines[0].startswith("#") and len(lines) == 257
    assert [line.split() for line in lines[1:]] == [[str(s), cluster_map.owner_of(s)] for s in range(256)]


def test_set_map_commands_re_point_exactly_the_moved_shards() -> None:
    old = ClusterMap.initial(THREE)
    new, moves = old.rebalanced(add={"cellstream-3": "cellstream-3.cellstream:50051"})
    commands = haproxy_set_map_commands(old, new, map_path=Path("/etc/haproxy/shards.map"))
    assert commands == [f"set map /etc/haproxy/shards.map {m.shard} {m.target}" for m in moves]
    assert haproxy_set_map_commands(new, new, map_path=Path("/m")) == []
    with pytest.raises(ValueError, match="is older than the proxy's 2: refusing to go back"):
        haproxy_set_map_commands(new, old, map_path=Path("/m"))
    with pytest.raises(ValueError, match="have 256 and 16 shards: a cluster's shard count never changes"):
        haproxy_set_map_commands(old, ClusterMap.initial(THREE, 16), map_path=Path("/m"))


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="cellstream")
    cluster_tool.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_cluster_haproxy_writes_the_config_and_map(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "map.json").write_text(ClusterMap.initial(THREE).to_json())
    out = tmp_path / "proxy"
    more = ["--also", "cellstream-3=cellstream-3.cellstream:50051", "--metrics-bind", "127.0.0.1:8405"]
    assert run_cli("cluster", "haproxy", "--map", str(tmp_path / "map.json"), "--out", str(out), *more) == 0
    assert "wrote" in capsys.readouterr().out
    if HAPROXY is not None:  # names that do not resolve yet are fine: the servers start down
        checked = subprocess.run(
            [HAPROXY, "-c", "-f", str(out / "haproxy.cfg")], capture_output=True, text=True, check=False
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
    config = (out / "haproxy.cfg").read_text()
    assert (
        f"map_int({out / 'shards.map'},cellstream_any)" in config
        and f"stats socket {out / 'haproxy.sock'}" in config
    )
    assert (out / "shards.map").read_text() == render_map(ClusterMap.initial(THREE))
    (tmp_path / "bad.json").write_text("{}")
    assert run_cli("cluster", "haproxy", "--map", str(tmp_path / "bad.json"), "--out", str(out)) == 2
    assert "cluster map" in capsys.readouterr().err
    bad_path = ["--map-path", "relative/shards.map"]
    assert (
        run_cli("cluster", "haproxy", "--map", str(tmp_path / "map.json"), "--out", str(out), *bad_path) == 2
    )
    assert "must be absolute and plain" in capsys.readouterr().err
