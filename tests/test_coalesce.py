"""The coalescing Stepper: many tasks' readings as few StepBatch calls, same numbers as Step, in order."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest

from cellstream.client import AsyncClient, BatchReply, Cancelled, Client, StepReply
from cellstream.coalesce import StepError, Stepper
from reference import reference_sequence
from support import MODELS, RunningServer, start_server

TOLERANCE = 1e-5
Outcome = StepReply | BaseException


def readings(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.0, (n, 8)).astype(np.float32)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def assert_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    error = float(np.max(np.abs(np.asarray(actual) - np.asarray(expected))))
    assert error <= TOLERANCE, f"{what}: max abs error {error:.2e} > {TOLERANCE}"


class RecordingClient(AsyncClient):
    """The real client, plus a log of every StepBatch and of which batches overlapped in time."""

    def __init__(self, address: str, delay: float = 0.0) -> None:
        super().__init__(address)
        self.delay = delay
        self.sent: list[list[str]] = []
        self.in_flight: list[list[str]] = []
        self.overlaps: list[tuple[list[str], list[str]]] = []

    async def step_batch(
        self, stream_ids: Sequence[str], inputs: np.ndarray, *, model: str = "", omit_state: bool = False
    ) -> BatchReply:
        ids = list(stream_ids)
        self.sent.append(ids)
        self.overlaps += [(other, ids) for other in self.in_flight]
        self.in_flight.append(ids)
        try:
            await asyncio.sleep(self.delay)  # widen the time a batch is in flight
            return await super().step_batch(ids, inputs, model=model, omit_state=omit_state)
        finally:
            self.in_flight.remove(ids)


def test_many_tasks_get_the_same_numbers_as_sequential_step(server: RunningServer) -> None:
    streams, steps = 40, 12
    prefix = unique("coalesce-many")
    x = {k: readings(100 + k, steps) for k in range(streams)}

    async def main() -> tuple[dict[int, list[StepReply]], dict[int, list[StepReply]], Stepper]:
        async with AsyncClient(server.address) as plain, Stepper(server.address) as stepper:

            async def via_stepper(k: int) -> list[StepReply]:
                return [await stepper.step(f"{prefix}-{k}", reading) for reading in x[k]]

            async def via_step(k: int) -> list[StepReply]:
                return [await plain.step(f"{prefix}-twin-{k}", reading) for reading in x[k]]

            coalesced = await asyncio.gather(*(via_stepper(k) for k in range(streams)))
            sequential = await asyncio.gather(*(via_step(k) for k in range(streams)))
        return dict(enumerate(coalesced)), dict(enumerate(sequential)), stepper

    coalesced, sequential, stepper = asyncio.run(main())
    assert stepper.stats.mean_batch > 2, "readings of concurrent tasks should share batches"
    for k in range(streams):
        mine, twin = coalesced[k], sequential[k]
        assert [r.step for r in mine] == list(range(1, steps + 1))
        assert all(r.stream_id == f"{prefix}-{k}" for r in mine)
        assert_close(
            np.array([r.output for r in mine]), np.array([r.output for r in twin]), f"stream {k} outputs"
        )
        assert_close(mine[-1].state["h"], twin[-1].state["h"], f"stream {k} final state")
        expected_out, expected_states = reference_sequence(MODELS / "gru", x[k])
        assert_close(np.array([r.output for r in mine]), expected_out, f"stream {k} vs reference")
        assert_close(mine[-1].state["h"], expected_states[-1]["h"], f"stream {k} state vs reference")


def test_readings_of_one_stream_apply_in_call_order_and_never_in_two_batches_at_once(
    server: RunningServer,
) -> None:
    n = 60
    hot, others = unique("coalesce-hot"), [unique("coalesce-cold") for _ in range(5)]
    x = readings(7, n)

    async def main() -> tuple[list[StepReply], RecordingClient]:
        client = RecordingClient(server.address, delay=0.003)
        async with client, Stepper(client, max_in_flight=2) as stepper:
            await stepper.contract()

            async def caller(i: int) -> StepReply:
                await asyncio.sleep(i * 0.0007)  # spread the calls over several batches
                other = None
                if i % 3 == 0:  # other streams' readings may go in any batch beside the hot one
                    other = asyncio.ensure_future(stepper.step(others[i % len(others)], x[i]))
                reply = await stepper.step(hot, x[i])  # queued before this task first yields
                if other is not None:
                    await other
                return reply

            replies = await asyncio.gather(*(caller(i) for i in range(n)))
        return list(replies), client

    replies, client = asyncio.run(main())
    assert len(client.sent) > 2
    assert client.overlaps, "two batches should have been in flight together"
    for first, second in client.overlaps:
        assert not set(first) & set(second), "a stream had readings in two batches in flight"
    assert [r.step for r in replies] == list(range(1, n + 1))
    expected_out, expected_states = reference_sequence(MODELS / "gru", x)
    assert_close(np.array([r.output for r in replies]), expected_out, "outputs in call order")
    assert_close(replies[-1].state["h"], expected_states[-1]["h"], "final state")


def test_bad_readings_fail_only_their_callers(server: RunningServer) -> None:
    prefix = unique("coalesce-bad")
    good = readings(3, 4)
    nan = good[0].copy()
    nan[2] = np.nan

    async def main() -> tuple[list[Outcome], Stepper]:
        async with Stepper(server.address) as stepper:
            await stepper.contract()
            calls = [
                stepper.step(f"{prefix}-a", good[0]),
                stepper.step(f"{prefix}-short", good[0][:7]),
                stepper.step(f"{prefix}-nan", nan),
                stepper.step("", good[1]),
                stepper.step(f"{prefix}\n", good[1]),
                stepper.step("x" * 300, good[1]),
                stepper.step(f"{prefix}-b", good[2]),
                stepper.step(f"{prefix}-a", good[3]),
            ]
            results = await asyncio.gather(*calls, return_exceptions=True)
            after = await stepper.step(f"{prefix}-nan", good[0])
        return [*results, after], stepper

    results, stepper = asyncio.run(main())
    a1, short, nan_error, empty, control, long_id, b, a2, nan_after = results
    for error, words in (
        (short, "7 values"),
        (nan_error, "NaN"),
        (empty, "empty"),
        (control, "control"),
        (long_id, "bytes"),
    ):
        assert isinstance(error, StepError), error
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in error.details()
    assert isinstance(a1, StepReply) and isinstance(a2, StepReply) and isinstance(b, StepReply)
    assert isinstance(nan_after, StepReply)
    assert (a1.step, a2.step, b.step) == (1, 2, 1)
    expected_a, _ = reference_sequence(MODELS / "gru", good[[0, 3]])
    assert_close(np.array([a1.output, a2.output]), expected_a, "stream a beside bad readings")
    expected_b, _ = reference_sequence(MODELS / "gru", good[2:3])
    assert_close(b.output, expected_b[0], "stream b beside bad readings")
    assert nan_after.step == 1, "a refused reading must leave its stream untouched"
    assert stepper.stats.batches == 2


def test_an_item_the_server_refuses_goes_to_its_caller_and_the_rest_is_resent(
    server: RunningServer, client: Client
) -> None:
    owned = unique("coalesce-lstm-owned")
    client.step(owned, np.zeros(8, np.float32), model="lstm")
    prefix = unique("coalesce-rest")
    x = readings(5, 3)

    async def main() -> tuple[list[Outcome], Stepper]:
        async with Stepper(server.address, model="gru") as stepper:
            await stepper.contract()
            calls = [
                stepper.step(f"{prefix}-0", x[0]),
                stepper.step(owned, x[1]),
                stepper.step(f"{prefix}-2", x[2]),
            ]
            return await asyncio.gather(*calls, return_exceptions=True), stepper

    (first, refused, third), stepper = asyncio.run(main())
    assert isinstance(refused, StepError)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "lstm" in refused.details()
    assert stepper.stats.resent == 1
    for reply, i in ((first, 0), (third, 2)):
        assert not isinstance(reply, BaseException), reply
        assert reply.step == 1
        expected, _ = reference_sequence(MODELS / "gru", x[i : i + 1])
        assert_close(reply.output, expected[0], f"reading {i} after the resend")


def test_a_failure_of_the_whole_batch_reaches_every_caller(tmp_path: Path) -> None:
    limited = start_server(tmp_path, "--max-streams", "3")
    try:

        async def main() -> list[Outcome]:
            async with Stepper(limited.address) as stepper:
                await stepper.contract()
                calls = [stepper.step(f"full-{i}", np.zeros(8, np.float32)) for i in range(5)]
                return await asyncio.gather(*calls, return_exceptions=True)

        results = asyncio.run(main())
    finally:
        assert limited.stop() == 0, limited.log()
    errors = [r for r in results if isinstance(r, StepError)]
    assert len(errors) == len(results), results
    assert {e.code() for e in errors} == {grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_an_unknown_model_is_reported_to_the_caller(server: RunningServer) -> None:
    async def main() -> BaseException | None:
        async with Stepper(server.address, model="no-such-model") as stepper:
            try:
                await stepper.step("whatever", np.zeros(8, np.float32))
            except StepError as exc:
                return exc
        return None

    error = asyncio.run(main())
    assert isinstance(error, StepError)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in error.details()


def test_an_idle_stepper_sends_at_once(server: RunningServer) -> None:
    # No timer: a lone reading leaves in the same loop pass, so it costs what a plain Step costs.
    prefix = unique("coalesce-idle")
    x = readings(9, 1)[0]

    async def main() -> tuple[list[float], list[float], Stepper]:
        async with AsyncClient(server.address) as plain, Stepper(server.address) as stepper:
            await stepper.step(f"{prefix}-warm", x)
            await plain.step(f"{prefix}-warm-plain", x)
            via_stepper, via_step = [], []
            for i in range(40):
                started = time.perf_counter()
                await stepper.step(f"{prefix}-{i % 4}", x)
                via_stepper.append(time.perf_counter() - started)
                started = time.perf_counter()
                await plain.step(f"{prefix}-plain-{i % 4}", x)
                via_step.append(time.perf_counter() - started)
        return via_stepper, via_step, stepper

    via_stepper, via_step, stepper = asyncio.run(main())
    assert stepper.stats.largest == 1
    assert statistics.median(via_stepper) <= statistics.median(via_step) + 0.001, (
        f"stepper median {statistics.median(via_stepper) * 1e3:.2f} ms vs Step "
        f"{statistics.median(via_step) * 1e3:.2f} ms"
    )


def test_close_sends_what_is_queued_and_waits_for_it(server: RunningServer) -> None:
    prefix = unique("coalesce-close")

    async def main() -> list[StepReply]:
        stepper = Stepper(server.address, max_in_flight=1)
        await stepper.contract()
        tasks = [asyncio.ensure_future(stepper.step(f"{prefix}-{i % 3}", np.ones(8))) for i in range(30)]
        await asyncio.sleep(0)  # let the calls queue
        await stepper.close()
        assert all(t.done() for t in tasks)
        with pytest.raises(Cancelled):
            await stepper.step(f"{prefix}-late", np.ones(8))
        return [t.result() for t in tasks]

    replies = asyncio.run(main())
    assert sorted(r.step for r in replies) == sorted([*range(1, 11)] * 3)
