"""A cluster under load while it is hurt: a replica killed with SIGKILL and restarted from its
state dir, and shards handed to a fourth replica, each while a resuming `ClusterClient` steps
100 streams from a thread. However the kill or the move falls between the readings, every stream
ends where one uninterrupted process would (the ONNX reference), with each reading applied once,
on the stream's owner."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
from cellstream._proto.cellstream.v1.cellstream_pb2_grpc import CellStreamStub
from cellstream.client import Client, ClusterClient
from cellstream.cluster.cluster_map import ClusterMap
from reference import reference_sequence
from support import MODELS, RunningServer, start_server, wait_for
from test_rebalance import free_port

SHARDS = 32
NAMES = ("a", "b", "c")
STREAMS, STEPS = 100, 60
IDS = [f"chaos-{k}" for k in range(STREAMS)]
TOLERANCE = 1e-5
SNAPSHOT_INTERVAL = "0.05"  # seconds: a kill loses at most the last few readings of each stream


@pytest.fixture(scope="module")
def readings() -> np.ndarray:
    return np.random.default_rng(1515).normal(0.0, 1.0, (STREAMS, STEPS, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def expected(readings: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per stream: the outputs [STEPS, 1] and the final h, by the ONNX GRU sequence operator."""
    found = []
    for k in range(STREAMS):
        outputs, states = reference_sequence(MODELS / "gru", readings[k])
        found.append((outputs, states[-1]["h"].ravel()))
    return found


def owner(stream_id: str, cluster_map: ClusterMap) -> str:
    """Independent of the code under test: zlib's CRC-32 of the UTF-8 id, mod the shards, in the ranges."""
    shard = zlib.crc32(stream_id.encode()) % cluster_map.shards
    (name,) = [n for n, held in cluster_map.ranges.items() if any(a <= shard < b for a, b in held)]
    return name


@dataclass
class Cluster:
    """Replicas on fixed ports (a restarted one takes the same) that the map file names."""

    tmp: Path
    addresses: dict[str, str]
    servers: dict[str, RunningServer] = field(default_factory=dict)
    starts: dict[str, int] = field(default_factory=dict)

    @property
    def map_path(self) -> Path:
        return self.tmp / "map.json"

    @property
    def seeds(self) -> list[str]:
        return [self.addresses[name] for name in NAMES]

    def start(self, name: str, *extra: str) -> RunningServer:
        """Start (or restart) replica `name` with its own map file, which SetClusterMap rewrites."""
        own = self.tmp / f"{name}.map.json"
        if not own.exists():
            ClusterMap.read(self.map_path).write(own)
        run = self.starts[name] = self.starts.get(name, 0) + 1  # (a fresh ready file and log per run)
        server = start_server(
            self.tmp / name / f"run-{run}",
            "--cluster-map",
            str(own),
            "--replica-name",
            name,
            *extra,
            address=self.addresses[name],
        )
        self.servers[name] = server
        return server


def start_cluster(tmp: Path, options: Callable[[str], tuple[str, ...]] = lambda name: ()) -> Cluster:
    """Replicas a, b, c on free ports, with `options(name)` each, and the first map naming them."""
    cluster = Cluster(tmp, {name: f"127.0.0.1:{free_port()}" for name in NAMES})
    ClusterMap.initial(cluster.addresses, SHARDS).write(cluster.map_path)
    try:
        with ThreadPoolExecutor(len(NAMES)) as pool:  # (their starts overlap)
            list(pool.map(lambda name: cluster.start(name, *options(name)), NAMES))
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def stop_cluster(cluster: Cluster) -> None:
    for server in cluster.servers.values():
        assert server.stop() == 0, server.log()


def durable(tmp: Path, name: str) -> tuple[str, ...]:
    """Each replica snapshots to its own state dir, as a StatefulSet's volume keeps it."""
    return ("--state-dir", str(tmp / name / "state"), "--snapshot-interval", SNAPSHOT_INTERVAL)


@pytest.fixture
def durable_cluster(tmp_path: Path) -> Iterator[Cluster]:
    running = start_cluster(tmp_path, lambda name: durable(tmp_path, name))
    yield running
    stop_cluster(running)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    running = start_cluster(tmp_path)
    yield running
    stop_cluster(running)


class Load:
    """Every stream's readings through one resuming ClusterClient, reading-major (all streams'
    reading t, then t + 1), so a fault falls in the middle of every stream. At `hold_at` readings
    per stream it waits for `resume` to be set: what follows is sent after the fault is over."""

    def __init__(self, seeds: list[str], readings: np.ndarray, hold_at: int = STEPS) -> None:
        self.seeds, self.readings, self.hold_at = seeds, readings, hold_at
        self.outputs = np.full((STREAMS, STEPS, 1), np.nan, np.float32)
        self.steps = np.zeros((STREAMS, STEPS), np.int64)
        self.sent = 0  # readings answered (only this thread writes it)
        self.resume = threading.Event()
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cluster-load")

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.resume.set()  # (a test that fails before the fault is over still lets it finish)
        self._thread.join(60)

    def _run(self) -> None:
        try:
            with ClusterClient(self.seeds, resume=True, retry_seconds=30) as client:
                for t in range(STEPS):
                    if t == self.hold_at:
                        assert self.resume.wait(60), "the fault was never over"
                    for k, stream_id in enumerate(IDS):
                        reply = client.step(stream_id, self.readings[k, t], model="gru", omit_state=True)
                        self.outputs[k, t], self.steps[k, t] = reply.output, reply.step
                        self.sent += 1
        except BaseException as error:  # (raised again in the test's thread by finished())
            self.failure = error

    def finished(self) -> None:
        self._thread.join(60)
        assert not self._thread.is_alive(), "the load did not finish within 60 s"
        if self.failure is not None:
            raise self.failure


def assert_close(actual: object, wanted: object, what: str) -> None:
    error = float(np.max(np.abs(np.asarray(actual) - np.asarray(wanted))))
    assert error <= TOLERANCE, f"{what}: max abs error {error:.2e} > {TOLERANCE}"


def assert_every_stream_uninterrupted(
    cluster: Cluster, load: Load, expected: list[tuple[np.ndarray, np.ndarray]]
) -> ClusterMap:
    """Each reading answered once with the reference's output, and each stream's final state on
    its owner by the map file (asked of that replica alone): step STEPS, the reference's h."""
    cluster_map = ClusterMap.read(cluster.map_path)
    for k, stream_id in enumerate(IDS):
        assert load.steps[k].tolist() == list(range(1, STEPS + 1)), stream_id
        assert_close(load.outputs[k], expected[k][0], f"{stream_id} outputs")
    owners = {stream_id: owner(stream_id, cluster_map) for stream_id in IDS}
    assert set(owners.values()) == set(cluster_map.names), "streams should spread over every replica"
    for name in cluster_map.names:
        with Client(cluster.addresses[name]) as direct:
            for k, stream_id in enumerate(IDS):
                if owners[stream_id] == name:
                    state = direct.get_state(stream_id)
                    assert state.step == STEPS, f"{stream_id} on {name}: step {state.step}"
                    assert_close(state.state["h"], expected[k][1], f"{stream_id} final state on {name}")
    return cluster_map


def test_a_replica_killed_under_load_and_restarted_loses_and_repeats_no_reading(
    durable_cluster: Cluster, readings: np.ndarray, expected: list[tuple[np.ndarray, np.ndarray]]
) -> None:
    cluster, victim = durable_cluster, "b"
    state_dir = cluster.tmp / victim / "state"
    with Load(cluster.seeds, readings) as load:
        wait_for(lambda: load.sent >= STREAMS * STEPS // 3 or load.failure, timeout=30)
        wait_for(lambda: list(state_dir.glob("*.csnap")))  # (what the restart restores from)
        killed_at = load.sent
        assert killed_at < STREAMS * STEPS, "the kill should fall while the readings are sent"
        assert cluster.servers[victim].stop(signal.SIGKILL) == -signal.SIGKILL
        # Same name, port and state dir, as Kubernetes restarts a StatefulSet's pod.
        restarted = cluster.start(victim, *durable(cluster.tmp, victim))
        load.finished()
    assert "restored" in restarted.log(), restarted.log()
    assert_every_stream_uninterrupted(cluster, load, expected)


def test_a_rebalance_3_to_4_under_load_keeps_every_reading_once_on_its_new_owner(
    cluster: Cluster, readings: np.ndarray, expected: list[tuple[np.ndarray, np.ndarray]]
) -> None:
    before = ClusterMap.read(cluster.map_path)
    cluster.addresses["d"] = f"127.0.0.1:{free_port()}"
    cluster.start("d")  # (its map, the old one, does not name it: it serves nothing yet)
    with Load(cluster.seeds, readings, hold_at=STEPS * 2 // 3) as load:
        wait_for(lambda: load.sent >= STREAMS * STEPS // 3 or load.failure, timeout=30)
        moving_at = load.sent
        report = run_rebalance(cluster, "--add", f"d={cluster.addresses['d']}")
        load.resume.set()
        load.finished()
    assert report["epoch"] == before.epoch + 1 and report["shards_moved"] == SHARDS // 4
    assert moving_at < STREAMS * STEPS * 2 // 3, "the move should start while the readings are sent"
    after = assert_every_stream_uninterrupted(cluster, load, expected)
    moved = [stream_id for stream_id in IDS if owner(stream_id, after) != owner(stream_id, before)]
    assert moved and {owner(stream_id, after) for stream_id in moved} == {"d"}
    for stream_id in moved:  # the old owner sends callers on, and applies nothing
        with (
            grpc.insecure_channel(cluster.addresses[owner(stream_id, before)]) as channel,
            pytest.raises(grpc.RpcError) as refused,
        ):
            CellStreamStub(channel).Step(  # type: ignore[no-untyped-call]
                pb.StepRequest(stream_id=stream_id, model="gru", input=[0.0] * 8, seq=STEPS + 1)
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        trailers = {str(m.key): str(m.value) for m in refused.value.trailing_metadata() or ()}
        assert trailers["cellstream-owner"] == "d", trailers
        assert trailers["cellstream-owner-address"] == cluster.addresses["d"]
        assert trailers["cellstream-map-epoch"] == str(after.epoch)


def run_rebalance(cluster: Cluster, *args: str) -> dict[str, object]:
    command = [
        sys.executable,
        "-m",
        "cellstream",
        "cluster",
        "rebalance",
        "--map",
        str(cluster.map_path),
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_a_rebalance_4_to_3_under_load_keeps_every_reading_once(
    cluster: Cluster, readings: np.ndarray, expected: list[tuple[np.ndarray, np.ndarray]]
) -> None:
    cluster.addresses["d"] = f"127.0.0.1:{free_port()}"
    cluster.start("d")
    assert run_rebalance(cluster, "--add", f"d={cluster.addresses['d']}")["epoch"] == 2  # (no load yet)
    with Load(cluster.seeds, readings, hold_at=STEPS * 2 // 3) as load:
        wait_for(lambda: load.sent >= STREAMS * STEPS // 3 or load.failure, timeout=30)
        report = run_rebalance(cluster, "--remove", "c")
        load.resume.set()
        load.finished()
    assert report["epoch"] == 3 and report["shards_moved"] == SHARDS // 4
    after = assert_every_stream_uninterrupted(cluster, load, expected)
    assert "c" not in after.replicas
