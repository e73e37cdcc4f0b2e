"""Limits and backpressure: stream caps, eviction, TTL, bounded queues, deadlines, flow control."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest

from cellstream.client import AsyncClient, CellStreamError, Client, step_request
from support import RunningServer, start_server, wait_for
from test_server import sample, scrape

X = np.ones(8, np.float32)


def code_of(call: object, *args: object, **kwargs: object) -> grpc.StatusCode:
    with pytest.raises(CellStreamError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    return info.value.code()


@pytest.fixture
def limited(tmp_path: Path, request: pytest.FixtureRequest) -> RunningServer:
    running = start_server(tmp_path, *request.param)
    yield running  # type: ignore[misc]
    assert running.stop() == 0, running.log()


@pytest.mark.parametrize("limited", [("--max-streams", "5")], indirect=True)
def test_max_streams_refuses_new_streams_but_serves_existing(limited: RunningServer) -> None:
    with limited.client() as client:
        for k in range(5):
            client.step(f"cap-{k}", X)
        assert code_of(client.step, "cap-5", X) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (
            code_of(client.step_batch, ["cap-0", "cap-6"], np.ones((2, 8)))
            == grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        assert client.get_state("cap-0").step == 1  # the refused batch applied nothing
        assert client.step("cap-4", X).step == 2
        client.delete("cap-0")
        assert client.step("cap-5", X).step == 1
    assert sample(scrape(limited), "cellstream_max_streams ") == 5


@pytest.mark.parametrize("limited", [("--max-streams", "3", "--evict", "lru")], indirect=True)
def test_lru_eviction_drops_the_idlest_stream_and_counts_it(limited: RunningServer) -> None:
    with limited.client() as client:
        for stream_id in ("old", "mid", "new"):
            client.step(stream_id, X)
        client.step("old", X)  # now "mid" is the least recently used
        assert client.step("newest", X).step == 1
        assert code_of(client.get_state, "mid") == grpc.StatusCode.NOT_FOUND
        assert client.get_state("old").step == 2
    assert sample(scrape(limited), 'cellstream_streams_dropped_total{reason="lru"}') == 1


@pytest.mark.parametrize("limited", [("--stream-ttl", "0.6")], indirect=True)
def test_idle_streams_expire_after_ttl_and_active_ones_stay(limited: RunningServer) -> None:
    with limited.client() as client:
        client.step("idle", X)
        client.step("busy", X)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            client.step("busy", X)
            try:
                client.get_state("idle")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the idle stream never expired")
        assert client.get_state("busy").step > 1
    assert sample(scrape(limited), 'cellstream_streams_dropped_total{reason="ttl"}') >= 1


@pytest.mark.parametrize("limited", [("--max-queue", "500", "--max-batch", "64")], indirect=True)
def test_flood_of_ten_times_the_queue_is_refused_fast_and_server_recovers(limited: RunningServer) -> None:
    process = psutil.Process(limited.pid)
    rss_before = process.memory_info().rss

    async def flood() -> list[grpc.StatusCode]:
        # StepStream carries the flood: grpc.aio itself cancels calls when thousands of unary
        # calls share one connection, which would hide what the server does.
        async with AsyncClient(limited.address) as client:

            async def call(c: int) -> list[grpc.StatusCode]:
                requests = [step_request(f"flood-{c * 500 + k}", X, omit_state=True) for k in range(500)]
                return [
                    r.error[0] if r.error else grpc.StatusCode.OK async for r in client.step_stream(requests)
                ]

            per_call = await asyncio.gather(*(call(c) for c in range(10)))
            return [code for codes in per_call for code in codes]

    codes = asyncio.run(flood())
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert codes.count(grpc.StatusCode.OK) >= 500
    growth = process.memory_info().rss - rss_before
    assert growth < 200 * 1024 * 1024, f"RSS grew by {growth / 1e6:.0f} MB"
    with limited.client() as client:
        assert client.step("after-flood", X).step == 1
        refused = [c for c in codes if c != grpc.StatusCode.OK]
        for k, code in enumerate(codes):
            if code != grpc.StatusCode.OK and k % 50 == 0:  # refused readings changed nothing
                assert code_of(client.get_state, f"flood-{k}") == grpc.StatusCode.NOT_FOUND
    if refused:
        assert sample(scrape(limited), 'cellstream_rejections_total{model="gru",reason="queue_full"}') == len(
            refused
        )


@pytest.mark.parametrize(
    "limited", [("--max-batch", "400000", "--max-batch-request", "400000", "--max-queue", "0")], indirect=True
)
def test_work_whose_deadline_passed_in_the_queue_is_not_applied(limited: RunningServer) -> None:
    with limited.client() as client:
        client.step("deadline", X)
        ids = [f"bulk-{k}" for k in range(300_000)]
        inputs = np.ones((len(ids), 8), np.float32)
        bulk = threading.Thread(
            target=lambda: Client(limited.address, timeout=120).step_batch(ids, inputs, omit_state=True)
        )
        bulk.start()
        # Its streams exist once its one big run is about to start (they are created just before).
        gauge = 'cellstream_streams{model="gru",version="1"}'
        wait_for(lambda: sample(scrape(limited), gauge, 0) >= len(ids), timeout=30, interval=0.005)
        # The one big run takes far longer than this call's deadline; the step queues behind it.
        with Client(limited.address, timeout=0.05) as hurried:
            assert code_of(hurried.step, "deadline", X) == grpc.StatusCode.DEADLINE_EXCEEDED
        bulk.join(120)
        assert client.get_state("deadline").step == 1


def test_engine_does_not_run_work_whose_deadline_passed() -> None:
    """In-process, so the deadline has surely passed when the batcher looks at the work."""
    from cellstream.config import Settings  # noqa: PLC0415
    from cellstream.engine import Engine  # noqa: PLC0415
    from cellstream.errors import DeadlineExpired  # noqa: PLC0415
    from cellstream.model import ModelRepository  # noqa: PLC0415
    from support import MODELS  # noqa: PLC0415

    async def main() -> None:
        engine = Engine(ModelRepository(MODELS, default_model="gru"), Settings(models=MODELS))
        engine.start()
        try:
            late = time.monotonic() - 1
            with pytest.raises(DeadlineExpired):
                await engine.submit_step("late", "", X, deadline=late)
            with pytest.raises(DeadlineExpired):
                await engine.step_batch(
                    "", ["late-a", "late-b"], np.ones((2, 8), np.float32).tobytes(), deadline=late
                )
            directory = engine.deployment.directory
            assert directory.model_of("late") is None and directory.model_of("late-a") is None
            assert (await engine.submit_step("late", "", X, deadline=time.monotonic() + 30)).step == 1
        finally:
            await engine.stop()

    asyncio.run(main())


@pytest.mark.parametrize(
    "limited",
    [
        (
            "--stream-window",
            "256",
        )
    ],
    indirect=True,
)
def test_client_that_never_reads_replies_cannot_grow_server_memory(limited: RunningServer) -> None:
    process = psutil.Process(limited.pid)
    rss_before = process.memory_info().rss
    channel = grpc.insecure_channel(limited.address)
    from cellstream._proto.cellstream.v1 import cellstream_pb2_grpc as pb_grpc  # noqa: PLC0415

    requests = (step_request(f"deaf-{i % 10}", X, request_id=i) for i in range(300_000))
    call = pb_grpc.CellStreamStub(channel).StepStream(requests)  # replies are never read

    with Client(limited.address) as client:

        def applied() -> int:
            return sum(client.get_state(f"deaf-{k}").step for k in range(10)) if _exists(client) else 0

        wait_for(lambda: applied() > 0, timeout=30)
        last, stable_since = -1, time.monotonic()
        while time.monotonic() - stable_since < 1.0:  # until the server stops taking readings
            now = applied()
            if now != last:
                last, stable_since = now, time.monotonic()
            time.sleep(0.1)
        assert last < 60_000, f"{last} of 300,000 readings were taken without being read"
        growth = process.memory_info().rss - rss_before
        assert growth < 100 * 1024 * 1024, f"RSS grew by {growth / 1e6:.0f} MB"
        call.cancel()
        channel.close()
        assert client.step("after-deaf", X).step == 1


def _exists(client: Client) -> bool:
    try:
        client.get_state("deaf-9")
    except grpc.RpcError:
        return False
    return True
