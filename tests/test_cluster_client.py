"""ClusterClient against 3 real replicas that check ownership: every stream's work lands on its
owner, whatever the call (Step, StepBatch of mixed owners, StepStream, the Stepper), the numbers
equal the independent reference of one process, and a client holding a stale map follows the
replicas' misroute answers to the new owners."""

from __future__ import annotations

import asyncio
import urllib.request
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from cellstream.client import (
    AsyncClusterClient,
    Client,
    ClusterClient,
    InvalidArgument,
    NotFound,
    Stepper,
    StepReply,
    Unavailable,
)
from cellstream.cluster import ClusterMap
from reference import reference_sequence
from support import MODELS, STARTED, RunningServer, start_server
from test_haproxy_routing import UNUSUAL_IDS, start_proxy  # (it skips without the haproxy binary)

SHARDS = 64
NAMES = ("replica-0", "replica-1", "replica-2")
STREAMS, STEPS = 300, 20
TOLERANCE = 1e-5


@dataclass
class Cluster:
    tmp: Path
    servers: dict[str, RunningServer]
    cluster_map: ClusterMap  # with the replicas' real addresses

    @property
    def seeds(self) -> list[str]:
        return [self.servers[NAMES[0]].address]

    def owner(self, stream_id: str, cluster_map: ClusterMap | None = None) -> str:
        """Independent of the client: zlib's CRC-32 of the UTF-8 id, mod the shards, in the ranges."""
        shard = zlib.crc32(stream_id.encode()) % SHARDS
        ranges = (cluster_map or self.cluster_map).ranges
        (name,) = [n for n, held in ranges.items() if any(a <= shard < b for a, b in held)]
        return name


def start_cluster(tmp: Path) -> Cluster:
    """3 replicas on port 0 with a map of placeholder addresses (epoch 1), then, once their ports
    are known, the same ranges with the real addresses (epoch 2) given to each."""
    placeholder = ClusterMap.initial({name: f"{name}.invalid:50051" for name in NAMES}, SHARDS)
    servers: dict[str, RunningServer] = {}

    def start(name: str) -> None:
        placeholder.write(map_file(tmp, name))
        servers[name] = start_replica(tmp, name)

    try:
        with ThreadPoolExecutor(len(NAMES)) as pool:  # (their starts overlap)
            list(pool.map(start, NAMES))
        servers = {name: servers[name] for name in NAMES}
        real = ClusterMap(2, SHARDS, {n: s.address for n, s in servers.items()}, placeholder.ranges)
        set_map(servers, real)
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return Cluster(tmp, servers, real)


def map_file(tmp: Path, name: str) -> Path:
    return tmp / f"{name}.map.json"  # one file each: SetClusterMap writes it


def start_replica(tmp: Path, name: str, address: str = "127.0.0.1:0") -> RunningServer:
    path = str(map_file(tmp, name))
    return start_server(tmp / name, "--cluster-map", path, "--replica-name", name, address=address)


def set_map(servers: dict[str, RunningServer], cluster_map: ClusterMap) -> None:
    for server in servers.values():
        with server.client() as admin:
            assert admin.set_cluster_map(cluster_map).epoch == cluster_map.epoch


def refusals(server: RunningServer) -> dict[str, float]:
    """FAILED_PRECONDITION answers per method, from the replica's own metrics."""
    with urllib.request.urlopen(f"http://{server.metrics_address}/metrics", timeout=10) as page:
        text = page.read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        count = line.startswith("cellstream_request_duration_seconds_count{")
        if count and 'code="FAILED_PRECONDITION"' in line:
            method = line.split('method="', 1)[1].split('"', 1)[0]
            counts[method] = counts.get(method, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def stop_cluster(cluster: Cluster) -> None:
    for server in cluster.servers.values():
        assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    running = start_cluster(tmp_path_factory.mktemp("cluster"))
    yield running
    stop_cluster(running)


@pytest.fixture(scope="module")
def readings() -> np.ndarray:
    return np.random.default_rng(15).normal(0.0, 1.0, (STREAMS, STEPS, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def expected(readings: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per stream: the outputs [STEPS, 1] and the final h, by the ONNX GRU sequence operator."""
    result = []
    for k in range(STREAMS):
        outputs, states = reference_sequence(MODELS / "gru", readings[k])
        result.append((outputs, states[-1]["h"]))
    return result


def assert_close(actual: object, wanted: object, what: str) -> None:
    error = float(np.max(np.abs(np.asarray(actual) - np.asarray(wanted))))
    assert error <= TOLERANCE, f"{what}: max abs error {error:.2e} > {TOLERANCE}"


def assert_streams_end_right(
    cluster: Cluster,
    ids: list[str],
    outputs: np.ndarray,
    expected: list[tuple[np.ndarray, np.ndarray]],
    owners: ClusterMap | None = None,
) -> None:
    """Every output as the reference says, and every final state on the stream's owner (asked of
    that replica alone), equal to the reference's."""
    for k, stream_id in enumerate(ids):
        assert_close(outputs[k], expected[k][0], f"{stream_id} outputs")
    by_owner: dict[str, list[int]] = {}
    for k, stream_id in enumerate(ids):
        by_owner.setdefault(cluster.owner(stream_id, owners), []).append(k)
    assert set(by_owner) == set((owners or cluster.cluster_map).names), "streams should spread over all"
    for name, ks in by_owner.items():
        with cluster.servers[name].client() as direct:
            for k in ks:
                state = direct.get_state(ids[k])
                assert state.step == STEPS, ids[k]
                assert_close(state.state["h"], expected[k][1], f"{ids[k]} final state on {name}")


def test_step_sends_each_stream_to_its_owner(
    cluster: Cluster, readings: np.ndarray, expected: list[tuple[np.ndarray, np.ndarray]]
) -> None:
    ids = [f"step-{k}" for k in range(STREAMS)]
    outputs = np.zeros((STREAMS, STEPS, 1), np.float32)
    with ClusterClient(cluster.seeds) as client:
        assert client.cluster_map == cluster.cluster_map

        def run(k: int) -> None:  # a stream's readings in order; threads share the client
            for t in range(STEPS):
                reply = client.step(ids[k], readings[k, t], model="gru", omit_state=True)
                assert reply.step == t + 1
                outputs[k, t] = reply.output

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(run, range(STREAMS)))
        assert [client.get_state(i).step for i in ids[:5]] == [STEPS] * 5
    assert_streams_end_right(cluster, ids, outputs, expected)


def test_step_batch_of_mixed_owners_is_split_and_merged_in_request_order(
    cluster: Cluster, readings: np.ndarray, expected: list[tuple[np.ndarray, np.ndarray]]
) -> None:
    ids = [f"batch-{k}" for k in range(STREAMS)]
    assert {cluster.owner(i) for i in ids[:10]} == set(NAMES), "one batch should span every replica"
    outputs = np.zeros((STREAMS, STEPS, 1), np.float32)
    with ClusterClient(cluster.seeds) as client:
        for t in range(0, STEPS, 2):  # each stream twice per batch: its readings apply in order
            x = np.concatenate([readings[:, t], readings[:, t + 1]])
            reply = client.step_batch(ids + ids, x, model="gru")
            assert reply.outputs.shape == (2 * STREAMS, 1) and reply.states["h"].shape == (2 * STREAMS, 64)
            assert reply.steps.tolist() == [t + 1] * STREAMS + [t + 2] * STREAMS
            outputs[:, t], outputs[:, t + 1] = reply.outputs[:STREAMS], reply.outputs[STREAMS:]
        for k in range(STREAMS):
            assert_close(reply.states["h"][STREAMS + k], expected[k][1], f"{ids[k]} state in the reply")
    assert_streams_end_right(cluster, ids, outputs, expected)


def test_step_stream_keeps_one_call_per_owner_and_answers_in_request_order(
    cluster: Cluster, readings: np.ndarray, expected: list[tuple[np.ndarray, np.ndarray]]
) -> None:
    ids = [f"stream-{k}" for k in range(STREAMS)]
    requests = [(ids[k], readings[k, t]) for t in range(STEPS) for k in range(STREAMS)]
    with ClusterClient(cluster.seeds) as client:
        replies = list(client.step_stream(dict(stream_id=i, input=x, model="gru") for i, x in requests))
    assert [r.stream_id for r in replies] == [i for i, _ in requests]
    assert [r.error for r in replies if r.error] == []
    assert [r.step for r in replies] == [t + 1 for t in range(STEPS) for _ in range(STREAMS)]
    outputs = np.array([r.output for r in replies]).reshape(STEPS, STREAMS, 1).transpose(1, 0, 2)
    assert_streams_end_right(cluster, ids, outputs, expected)


def test_the_stepper_through_an_async_cluster_client_coalesces_per_owner(
    cluster: Cluster, readings: np.ndarray, expected: list[tuple[np.ndarray, np.ndarray]]
) -> None:
    ids = [f"stepper-{k}" for k in range(STREAMS)]

    async def main() -> tuple[list[list[StepReply]], float]:
        async with AsyncClusterClient(cluster.seeds) as client, Stepper(client, model="gru") as stepper:

            async def stream(k: int) -> list[StepReply]:
                return [await stepper.step(ids[k], reading) for reading in readings[k]]

            replies = await asyncio.gather(*(stream(k) for k in range(STREAMS)))
        return list(replies), stepper.stats.mean_batch

    replies, mean_batch = asyncio.run(main())
    assert mean_batch > 2, "readings of concurrent tasks should share batches"
    assert all([r.step for r in mine] == list(range(1, STEPS + 1)) for mine in replies)
    outputs = np.array([[r.output for r in mine] for mine in replies])
    assert_streams_end_right(cluster, ids, outputs, expected)


def test_a_batch_part_refused_by_its_replica_leaves_the_others_applied_and_says_so(
    cluster: Cluster,
) -> None:
    ids = [f"partial-{k}" for k in range(12)]
    bound = next(i for i in ids[3:] if cluster.owner(i) != cluster.owner(ids[0]))
    x = np.ones((len(ids), 8), np.float32)
    with ClusterClient(cluster.seeds) as client:
        client.step(bound, np.zeros(8), model="lstm")  # a gru batch may not step it
        with pytest.raises(InvalidArgument) as refused:
            client.step_batch(ids, x, model="gru")
        error = refused.value
        assert error.message.startswith(f"stream_ids[{ids.index(bound)}]: "), error.message
        assert "split across replicas" in error.message
        assert error.partial is not None
        applied = [cluster.owner(i) != cluster.owner(bound) for i in ids]
        assert error.partial.applied.tolist() == applied
        for stream_id, was_applied, step in zip(
            ids, applied, error.partial.reply.steps.tolist(), strict=True
        ):
            if was_applied:
                assert step == 1 and client.get_state(stream_id).step == 1
            elif stream_id != bound:
                with pytest.raises(NotFound):
                    client.get_state(stream_id)


def test_the_stepper_answers_what_other_replicas_applied_and_resends_the_rest(cluster: Cluster) -> None:
    ids = [f"stepper-partial-{k}" for k in range(12)]
    bound = next(i for i in ids[3:] if cluster.owner(i) != cluster.owner(ids[0]))
    with ClusterClient(cluster.seeds) as client:
        client.step(bound, np.zeros(8), model="lstm")
    x = np.random.default_rng(4).normal(0.0, 1.0, (len(ids), 8)).astype(np.float32)

    async def main() -> tuple[list[StepReply | BaseException], int]:
        async with AsyncClusterClient(cluster.seeds) as client, Stepper(client, model="gru") as stepper:
            await stepper.contract()
            calls = [stepper.step(i, x[k]) for k, i in enumerate(ids)]
            return list(await asyncio.gather(*calls, return_exceptions=True)), stepper.stats.resent

    outcomes, resent = asyncio.run(main())
    assert resent == 1
    for k, (stream_id, outcome) in enumerate(zip(ids, outcomes, strict=True)):
        if stream_id == bound:
            assert isinstance(outcome, InvalidArgument) and "lstm" in outcome.message
            continue
        assert isinstance(outcome, StepReply), outcome
        expected, _ = reference_sequence(MODELS / "gru", x[k : k + 1])
        assert outcome.step == 1
        assert_close(outcome.output, expected[0], stream_id)


def test_a_client_holding_a_stale_map_follows_the_replicas_to_the_new_owners(
    tmp_path: Path, readings: np.ndarray, expected: list[tuple[np.ndarray, np.ndarray]]
) -> None:
    cluster = start_cluster(tmp_path)
    n = 60
    ids = {m: [f"stale-{m}-{k}" for k in range(n)] for m in ("step", "batch", "stream", "stepper")}
    # No stream exists yet: replica-2's shards move to the others with nothing to hand off.
    moved, moves = cluster.cluster_map.rebalanced(remove=["replica-2"])
    assert moves and {m.source for m in moves} == {"replica-2"}
    for group in ids.values():
        assert "replica-2" in {cluster.owner(i) for i in group}, "some streams must be misrouted"
    try:
        stale = {m: ClusterClient(cluster.seeds) for m in ("step", "batch", "stream")}

        async def stepper_with_a_stale_map() -> list[list[StepReply]]:
            async with AsyncClusterClient(cluster.seeds) as client:
                assert await client.refresh() == cluster.cluster_map
                set_map(cluster.servers, moved)  # (every replica at once: nothing else runs meanwhile)
                assert client.cluster_map == cluster.cluster_map  # it knows nothing yet
                async with Stepper(client, model="gru") as stepper:

                    async def stream(k: int) -> list[StepReply]:
                        return [await stepper.step(ids["stepper"][k], x) for x in readings[k]]

                    replies = await asyncio.gather(*(stream(k) for k in range(n)))
                assert client.cluster_map == moved
            return list(replies)

        stepped = asyncio.run(stepper_with_a_stale_map())
        outputs = {"stepper": np.array([[r.output for r in mine] for mine in stepped])}
        assert all(client.cluster_map == cluster.cluster_map for client in stale.values())

        def step_all(k: int) -> list[np.ndarray]:
            return [stale["step"].step(ids["step"][k], x, model="gru").output for x in readings[k]]

        with ThreadPoolExecutor(8) as pool:
            outputs["step"] = np.array(list(pool.map(step_all, range(n))))
        outputs["batch"] = np.stack(
            [
                stale["batch"].step_batch(ids["batch"], readings[:n, t], model="gru").outputs
                for t in range(STEPS)
            ],
            axis=1,
        )
        requests = [(ids["stream"][k], readings[k, t]) for t in range(STEPS) for k in range(n)]
        replies = list(
            stale["stream"].step_stream(dict(stream_id=i, input=x, model="gru") for i, x in requests)
        )
        assert [r.error for r in replies if r.error] == []
        assert [r.stream_id for r in replies] == [i for i, _ in requests]
        outputs["stream"] = np.array([r.output for r in replies]).reshape(STEPS, n, 1).transpose(1, 0, 2)

        for method, client in stale.items():
            assert client.cluster_map == moved, method
            client.close()
        # Each kind of call was refused by the old owner first: the clients did follow a misroute.
        assert {"Step", "StepBatch", "StepStream"} <= set(refusals(cluster.servers["replica-2"]))
        for method, group in ids.items():
            assert_streams_end_right(cluster, group, outputs[method], expected[:n], owners=moved)
    finally:
        stop_cluster(cluster)


def test_the_plain_client_names_its_stream_so_a_proxy_routes_it_to_the_owner(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Through a real HAProxy that routes by `x-stream-id`: the replicas refuse any stream that is
    not theirs, so every single-stream call answering is every call routed to its owner."""
    proxy = start_proxy(tmp_path, cluster.cluster_map)
    try:
        ids = [f"proxied-{k}" for k in range(60)] + UNUSUAL_IDS
        assert {cluster.owner(i) for i in ids} == set(NAMES)
        x = np.ones(8, np.float32)
        with Client(proxy.address) as client, Client(proxy.address, token="any") as with_token:
            for stream_id in ids:
                assert client.step(stream_id, x, model="gru").step == 1
                assert with_token.get_state(stream_id).step == 1  # (after the token's metadata too)
                state = client.set_state(stream_id, {"h": np.zeros(64)}, model="gru", step=5)
                assert state.step == 5
                assert client.delete(stream_id)
    finally:
        proxy.stop()


def test_the_other_calls_go_to_each_streams_owner_too(cluster: Cluster) -> None:
    ids = [f"other-{k}" for k in range(12)]
    assert {cluster.owner(i) for i in ids} == set(NAMES)
    h = np.full(64, 0.25, np.float32)
    with ClusterClient(cluster.seeds) as client:
        assert client.health()
        assert {m.name for m in client.list_models()} >= {"gru", "lstm"}
        for stream_id in ids:
            assert client.set_state(stream_id, {"h": h}, model="gru", step=7).step == 7
            state = client.get_state(stream_id)
            assert (state.model, state.step) == ("gru", 7)
            assert_close(state.state["h"], h, stream_id)
            with cluster.servers[cluster.owner(stream_id)].client() as direct:
                assert direct.get_state(stream_id).step == 7  # on its owner, asked directly
            assert client.delete(stream_id) and not client.delete(stream_id)
            with pytest.raises(NotFound):
                client.get_state(stream_id)


def test_the_async_cluster_client_routes_each_call_to_the_owner(cluster: Cluster) -> None:
    ids = [f"async-{k}" for k in range(12)]
    x = np.random.default_rng(8).normal(0.0, 1.0, (len(ids), 8)).astype(np.float32)

    async def main() -> list[StepReply]:
        async with AsyncClusterClient(cluster.seeds) as client:
            assert await client.health()
            replies = [await client.step(i, x[k], model="gru") for k, i in enumerate(ids)]
            for stream_id in ids:
                assert (await client.get_state(stream_id)).step == 1
                assert (await client.set_state(stream_id, {"h": np.zeros(64)}, step=3)).step == 3
                assert await client.delete(stream_id)
            return replies

    for k, reply in enumerate(asyncio.run(main())):
        expected, _ = reference_sequence(MODELS / "gru", x[k : k + 1])
        assert reply.step == 1
        assert_close(reply.output, expected[0], reply.stream_id)


def test_a_reading_with_seq_is_retried_while_its_replica_restarts_and_one_without_is_not(
    cluster: Cluster,
) -> None:
    name = "replica-1"
    ids = [i for i in (f"restart-{k}" for k in range(100)) if cluster.owner(i) == name][:2]
    address = cluster.servers[name].address
    x = np.ones(8, np.float32)
    with ClusterClient(cluster.seeds, retry_seconds=30) as client:
        assert cluster.servers[name].stop() == 0
        with pytest.raises(Unavailable):  # without seq it may have been applied: not sent again
            client.step(ids[0], x, model="gru")
        with ThreadPoolExecutor(1) as pool:
            restarted = pool.submit(start_replica, cluster.tmp, name, address)  # (about a second)
            reply = client.step(ids[1], x, model="gru", seq=1)
            cluster.servers[name] = restarted.result()
        STARTED.remove(cluster.servers[name])  # the module's cluster stops it, not this test's end
        assert reply.step == 1
        assert client.get_state(ids[1]).step == 1  # applied once


def test_a_resuming_cluster_client_numbers_each_streams_readings_on_its_owner(cluster: Cluster) -> None:
    ids = [f"resume-{k}" for k in range(9)]
    x = np.ones(8, np.float32)
    with ClusterClient(cluster.seeds, resume=True) as client:
        for t in range(3):
            assert [client.step(i, x, model="gru").step for i in ids] == [t + 1] * len(ids)
    with ClusterClient(cluster.seeds, resume=True) as later:  # starts from each owner's step
        replies = [later.step(i, x, model="gru") for i in ids]
        assert [r.step for r in replies] == [4] * len(ids) and not any(r.replayed for r in replies)
        again = later.step(ids[0], x, model="gru", seq=4)  # a retry of the last: replayed, not applied
        assert again.replayed and again.step == 4
    with ClusterClient(cluster.seeds) as plain:
        assert {plain.get_state(i).step for i in ids} == {4}


def test_step_stream_answers_what_came_before_a_bad_item_then_names_it(cluster: Cluster) -> None:
    ids = [f"stream-bad-{k}" for k in range(9)]
    items: list[object] = [(i, np.ones(8)) for i in ids] + ["not an item", (ids[0], np.ones(8))]
    with ClusterClient(cluster.seeds) as client:
        replies: list[StepReply] = []
        with pytest.raises(InvalidArgument) as bad:
            for reply in client.step_stream(items):  # type: ignore[arg-type]
                replies.append(reply)
        assert [r.stream_id for r in replies] == ids and all(r.step == 1 for r in replies)
        assert "step_stream item 9" in bad.value.message
        stream = client.step_stream((i, np.ones(8)) for i in ids)
        assert next(stream).step == 2
        stream.close()  # a caller that stops early ends the calls (what was sent may still apply)
        assert client.get_state(ids[0]).step == 2 and client.step(ids[0], np.ones(8)).step == 3
