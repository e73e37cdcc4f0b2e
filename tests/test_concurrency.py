"""Many streams at once over mixed APIs give exactly the per-stream sequential results."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest

from cellstream.batching.plan import Plan
from cellstream.batching.policy import BatchPolicy
from cellstream.batching.runner import Ran, Runner
from cellstream.client import AsyncClient, step_request
from cellstream.config import Settings
from cellstream.engine import Engine
from cellstream.model import CellModel, ModelRepository
from reference import reference_sequence
from support import MODELS, RunningServer

STREAMS = 200
STEPS = 30


def stream_inputs(k: int) -> np.ndarray:
    return np.random.default_rng(1000 + k).normal(size=(STEPS, 8)).astype(np.float32)


async def drive_unary(client: AsyncClient, stream_id: str, x: np.ndarray) -> list[np.ndarray]:
    return [(await client.step(stream_id, r, seq=i + 1, omit_state=True)).output for i, r in enumerate(x)]


async def drive_stream(client: AsyncClient, stream_id: str, x: np.ndarray) -> list[np.ndarray]:
    replies = [
        r async for r in client.step_stream([step_request(stream_id, r, seq=i + 1) for i, r in enumerate(x)])
    ]
    assert all(r.error is None for r in replies)
    return [r.output for r in replies]


async def drive_batch(client: AsyncClient, stream_id: str, x: np.ndarray) -> list[np.ndarray]:
    outputs = []
    for i in range(0, STEPS, 3):  # three readings of the same stream per message
        reply = await client.step_batch([stream_id] * 3, x[i : i + 3])
        outputs.extend(reply.outputs)
    return outputs


def test_200_streams_mixed_apis_match_sequential_reference(server: RunningServer) -> None:
    drivers = [drive_unary, drive_stream, drive_batch]

    async def main() -> list[list[np.ndarray]]:
        async with AsyncClient(server.address) as client:
            return await asyncio.gather(
                *(drivers[k % 3](client, f"conc-{k}", stream_inputs(k)) for k in range(STREAMS))
            )

    results = asyncio.run(main())
    for k, outputs in enumerate(results):
        expected, _ = reference_sequence(MODELS / "gru", stream_inputs(k))
        np.testing.assert_allclose(np.array(outputs), expected, atol=1e-5, err_msg=f"stream conc-{k}")
    with server.client() as client:
        assert {client.get_state(f"conc-{k}").step for k in range(STREAMS)} == {STEPS}


@contextmanager
def recorded_run_sizes() -> Iterator[list[int]]:
    """The batch size of every session.run made inside the block."""
    sizes: list[int] = []
    run = CellModel.run

    def recording_run(
        self: CellModel, x: np.ndarray, states: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        sizes.append(len(x))
        return run(self, x, states)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CellModel, "run", recording_run)
        yield sizes


def test_same_stream_never_in_one_batch_and_batches_form() -> None:
    """In-process: record every plan and every session.run while 50 streams pipeline 20 readings each."""
    plans: list[np.ndarray] = []
    run = Runner.run

    def recording_run(self: Runner, plan: Plan) -> Ran:
        plans.append(np.concatenate([np.array(plan.single_rows, np.int64), *plan.piece_rows]))
        return run(self, plan)

    async def main() -> None:
        settings = Settings(models=MODELS, max_batch=16, inline_batch=4)
        engine = Engine(ModelRepository(MODELS, default_model="gru"), settings)
        engine.start()
        try:
            futures = [
                engine.submit_step(f"s{k}", "gru", np.full(8, t, np.float32), seq=t + 1)
                for t in range(20)
                for k in range(50)
            ]
            results = await asyncio.gather(*futures)
            assert [r.step for r in results] == [t + 1 for t in range(20) for _ in range(50)]
            batch = await engine.step_batch(
                "gru", ["b1", "b2", "b1", "b1"], np.ones((4, 8), np.float32).tobytes()
            )
            assert batch.steps.tolist() == [1, 1, 2, 3]
        finally:
            await engine.stop()

    with pytest.MonkeyPatch.context() as patch, recorded_run_sizes() as run_sizes:
        patch.setattr(Runner, "run", recording_run)
        asyncio.run(main())
    assert plans, "no run happened"
    for rows in plans:
        assert len(rows) == len(set(rows.tolist())), f"a stream appears twice in one run: {rows}"
    assert max(run_sizes) <= 16, "a session.run exceeded --max-batch"
    assert max(run_sizes) > 1, "readings of different streams were never batched"
    assert max(len(rows) for rows in plans) > 16, "a trip to the worker never held several runs"


def test_a_broken_batcher_fails_its_work_instead_of_hanging_and_keeps_serving() -> None:
    from cellstream.errors import ModelFailure  # noqa: PLC0415
    from cellstream.streams.store import StateStore  # noqa: PLC0415

    create = StateStore.create
    calls = {"n": 0}

    def flaky_create(self: StateStore, stream_ids: list[str]) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected bug")
        return create(self, stream_ids)

    async def main() -> None:
        engine = Engine(ModelRepository(MODELS, default_model="gru"), Settings(models=MODELS))
        engine.start()
        try:
            first = engine.submit_step("victim", "gru", np.zeros(8, np.float32))
            second = engine.submit_step("bystander", "gru", np.zeros(8, np.float32))
            with pytest.raises(ModelFailure):
                await asyncio.wait_for(first, 10)
            with pytest.raises(ModelFailure):
                await asyncio.wait_for(second, 10)
            after = await asyncio.wait_for(engine.submit_step("later", "gru", np.zeros(8, np.float32)), 10)
            assert after.step == 1
        finally:
            await engine.stop()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StateStore, "create", flaky_create)
        asyncio.run(main())


def test_requests_that_arrive_together_share_one_run() -> None:
    """gRPC hands a burst of requests to the loop over successive iterations; the batcher lets the
    loop finish them before it plans, so they share one run instead of running one or two each."""

    async def main(run_sizes: list[int]) -> None:
        settings = Settings(models=MODELS)
        # The time bound on settling depends on the machine's speed; this test is about iterations.
        policy = replace(BatchPolicy.from_settings(settings), settle_seconds=60.0)
        engine = Engine(ModelRepository(MODELS, default_model="gru"), settings, policy)
        engine.start()
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[object]] = []

        def submit(k: int) -> None:
            futures.append(engine.submit_step(f"burst-{k}", "gru", np.zeros(8, np.float32)))
            if k + 1 < 40:
                loop.call_soon(submit, k + 1)  # the next request arrives in the next iteration

        try:
            await asyncio.sleep(0)  # the batcher task is waiting for work
            run_sizes.clear()  # (runs made while loading the model)
            loop.call_soon(submit, 0)
            await asyncio.wait_for(_all_done(futures, 40), 10)
        finally:
            await engine.stop()

    with recorded_run_sizes() as run_sizes:
        asyncio.run(main(run_sizes))
    assert run_sizes == [40]


async def _all_done(futures: list[asyncio.Future[object]], n: int) -> None:
    while len(futures) < n:
        await asyncio.sleep(0)
    await asyncio.gather(*futures)


@pytest.mark.parametrize("threads", [2, 3])
def test_a_large_plan_split_over_compute_threads_matches_the_reference_and_a_failed_run_writes_nothing(
    threads: int,
) -> None:
    """Each compute thread gathers, runs and scatters its own rows of a StepBatch over --max-batch;
    every stream still gets exactly its own sequence, and if one run fails no row is written."""
    from cellstream.errors import ModelFailure  # noqa: PLC0415
    from reference import numpy_sequence  # noqa: PLC0415

    n, steps = 300, 3
    ids = [f"split-{i}" for i in range(n)]
    x = np.random.default_rng(threads).normal(size=(steps + 1, n, 8)).astype(np.float32)

    async def main(run_sizes: list[int]) -> None:
        settings = Settings(models=MODELS, max_batch=256, compute_threads=threads)
        engine = Engine(ModelRepository(MODELS, default_model="gru"), settings)
        engine.start()
        run_sizes.clear()  # (loading the models made test runs of their own)
        try:
            replies = [await engine.step_batch("gru", ids, x[t].tobytes()) for t in range(steps)]
            assert run_sizes == [n // threads] * threads * steps  # equal runs, one per thread
            for k in range(0, n, 7):
                outputs, states = numpy_sequence(MODELS / "gru", x[:steps, k])
                for t, reply in enumerate(replies):
                    assert reply.steps[k] == t + 1
                    np.testing.assert_allclose(reply.outputs[k], outputs[t], atol=1e-5)
                    assert reply.states is not None
                    np.testing.assert_allclose(reply.states["h"][k], states[t]["h"], atol=1e-5)

            before = [await engine.get_state(stream_id) for stream_id in ids]
            calls = len(run_sizes)
            run = CellModel.run

            def failing_last_run(
                self: CellModel, xs: np.ndarray, values: list[np.ndarray]
            ) -> tuple[np.ndarray, list[np.ndarray]]:
                if len(run_sizes) == calls + threads - 1:  # the plan's last run, after the others ran
                    raise RuntimeError("injected failure")
                return run(self, xs, values)  # (records its size)

            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(CellModel, "run", failing_last_run)
                with pytest.raises(ModelFailure):
                    await engine.step_batch("gru", ids, x[steps].tobytes())
            for old in before:
                new = await engine.get_state(old.stream_id)
                assert new.step == old.step == steps
                np.testing.assert_array_equal(new.state["h"], old.state["h"])
        finally:
            await engine.stop()

    with recorded_run_sizes() as sizes:
        asyncio.run(main(sizes))


class FakeClock:
    """The batcher's clock, moved by the test: idle periods without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def all_parked(engine: Engine) -> None:
    """Yield until every batcher's task is parked with nothing to do (bounded)."""
    for _ in range(10_000):
        await asyncio.sleep(0)
        if all(batcher.idle for batcher in engine.deployment.batchers.values()):
            for _ in range(3):  # and whatever their parking scheduled has run
                await asyncio.sleep(0)
            return
    raise AssertionError("the batchers never became idle")


def test_a_lone_reading_on_an_idle_server_runs_at_once_and_a_burst_still_shares_a_run() -> None:
    """Idle for the quiet period, a reading runs inside its caller's callback (its future is done
    before it is awaited); readings that follow in the same callback go to the batcher and share
    its next run; a batcher busy a moment ago hands a reading to its task."""
    from reference import numpy_sequence  # noqa: PLC0415

    x = np.random.default_rng(5).normal(size=(6, 8)).astype(np.float32)
    clock = FakeClock()

    async def main(run_sizes: list[int]) -> None:
        settings = Settings(models=MODELS)
        policy = replace(BatchPolicy.from_settings(settings), quiet_seconds=0.005, clock=clock)
        engine = Engine(ModelRepository(MODELS, default_model="gru"), settings, policy)
        engine.start()
        run_sizes.clear()
        try:
            await all_parked(engine)
            clock.advance(1.0)  # idle for longer than the quiet period
            lone = engine.submit_step("lone", "gru", x[0])
            assert lone.done() and run_sizes == [1]
            again = engine.submit_step("lone", "gru", x[1])  # same callback: waits for the task
            assert not again.done()
            burst = [engine.submit_step(f"burst-{i}", "gru", x[2 + i]) for i in range(4)]
            results = [await lone, await again, *[await f for f in burst]]
            assert run_sizes == [1, 5]
            outputs, _ = numpy_sequence(MODELS / "gru", x[:2])
            assert [r.step for r in results] == [1, 2, 1, 1, 1, 1]
            np.testing.assert_allclose(results[0].output, outputs[0], atol=1e-5)
            np.testing.assert_allclose(results[1].output, outputs[1], atol=1e-5)
            for i, result in enumerate(results[2:]):
                alone, _ = numpy_sequence(MODELS / "gru", x[2 + i : 3 + i])
                np.testing.assert_allclose(result.output, alone[0], atol=1e-5)
            await all_parked(engine)
            clock.advance(1.0)  # idle again for the quiet period: at once
            later = engine.submit_step("later", "gru", x[0])
            assert later.done() and (await later).step == 1
            # Not idle long enough (as between the requests of a steady load): to the task.
            await all_parked(engine)
            clock.advance(0.001)
            recent = engine.submit_step("recent", "gru", x[0])
            assert not recent.done() and (await recent).step == 1
        finally:
            await engine.stop()

    with recorded_run_sizes() as sizes:
        asyncio.run(main(sizes))
