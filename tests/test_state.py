"""Row lookups made when a StepBatch arrives stay right by the time the batcher uses them."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cellstream.batching.plan import plan_waves
from cellstream.batching.work import StepResult
from cellstream.config import Settings
from cellstream.engine import Engine
from cellstream.model import ModelRepository, StateSpec
from cellstream.streams.busy import BusyRows
from cellstream.streams.directory import StreamDirectory
from cellstream.streams.store import StateStore
from reference import reference_sequence
from support import MODELS


def reference_step(h0: np.ndarray) -> np.ndarray:
    """The GRU's answer to a reading of ones from state h0 (the ONNX GRU sequence operator)."""
    outputs, _ = reference_sequence(MODELS / "gru", np.ones((1, 8), np.float32), {"h": h0})
    return np.asarray(outputs[0])


def make_store() -> StateStore:
    spec = StateSpec("h", "h_next", (4,), np.zeros(4, np.float32))
    return StateStore(("m", "1"), [spec], 1, StreamDirectory(), capacity=4)


def test_a_lookup_is_reused_only_while_no_row_was_freed() -> None:
    store = make_store()
    store.create(["a", "b"])
    earlier = (store.lookup(["a", "b"]), store.generation)
    store.delete(["a"])
    store.create(["c"])  # takes the row "a" had
    rows, created = store.rows_for(["a", "b"], earlier)
    assert created == ["a"]
    assert store.rows["a"] == rows[0] != store.rows["c"]
    assert rows[1] == store.rows["b"]
    assert len(set(store.rows.values())) == len(store.rows) == 3


def test_streams_created_after_the_lookup_are_not_created_twice() -> None:
    store = make_store()
    earlier = (store.lookup(["x", "y"]), store.generation)
    store.create(["x"])  # other work made "x" between the lookup and this batch's turn
    rows, created = store.rows_for(["x", "y"], earlier)
    assert created == ["y"]
    assert rows.tolist() == [store.rows["x"], store.rows["y"]]
    assert len(store) == 2
    assert int(store.alive.sum()) == 2, "a second row was made for x"


def test_two_batches_queued_together_with_the_same_new_stream_share_it() -> None:
    async def main() -> list[list[int]]:
        engine = Engine(ModelRepository(MODELS, default_model="gru"), Settings(models=MODELS))
        engine.start()
        try:
            x = np.ones((2, 8), np.float32).tobytes()
            # Both are validated (and look up their rows) before the batcher creates "new".
            first, second = await asyncio.gather(
                engine.step_batch("gru", ["new", "old"], x), engine.step_batch("gru", ["new", "other"], x)
            )
            streams = len(engine.deployment.current_for("gru").store)
            return [first.steps.tolist(), second.steps.tolist(), [streams]]
        finally:
            await engine.stop()

    assert asyncio.run(main()) == [[1, 1], [2, 1], [3]]


def test_new_streams_of_one_run_are_created_together_and_only_the_ones_that_fail_are_refused() -> None:
    from cellstream.errors import TooManyStreams  # noqa: PLC0415

    calls: list[list[str]] = []
    create = StateStore.create

    def picky_create(self: StateStore, stream_ids: list[str]) -> np.ndarray:
        calls.append(list(stream_ids))
        if "n1" in stream_ids or "n3" in stream_ids:
            raise TooManyStreams("no room for n1 or n3")
        return create(self, stream_ids)

    async def main() -> list[object]:
        engine = Engine(ModelRepository(MODELS, default_model="gru"), Settings(models=MODELS))
        engine.start()
        try:
            # Queued before the batcher runs: one plan with five new streams, each from its own state.
            futures = [
                engine.submit_step(
                    f"n{k}", "gru", np.ones(8, np.float32), state={"h": ((64,), np.full(64, k, np.float32))}
                )
                for k in range(5)
            ]
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
            return [*outcomes, sorted(engine.deployment.current_for("gru").store.rows)]
        finally:
            await engine.stop()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StateStore, "create", picky_create)
        *outcomes, streams = asyncio.run(main())
    assert calls[0] == ["n0", "n1", "n2", "n3", "n4"], "the new streams were not created with one call"
    assert [type(o).__name__ for o in outcomes] == [
        "StepResult",
        "TooManyStreams",
        "StepResult",
        "TooManyStreams",
        "StepResult",
    ]
    assert streams == ["n0", "n2", "n4"]
    expected = {k: reference_step(np.full(64, k, np.float32)) for k in (0, 2, 4)}
    for k in (0, 2, 4):  # each ran from its own given state: positions survived dropping n1 and n3
        result = outcomes[k]
        assert isinstance(result, StepResult)
        np.testing.assert_allclose(result.output, expected[k], atol=1e-5)


def test_a_new_stream_in_a_step_and_a_batch_queued_together_is_made_once() -> None:
    async def main() -> tuple[list[int], list[int], int]:
        engine = Engine(ModelRepository(MODELS, default_model="gru"), Settings(models=MODELS))
        engine.start()
        try:
            single = engine.submit_step("shared", "gru", np.ones(8, np.float32))
            batch = engine.step_batch("gru", ["shared", "solo"], np.ones((2, 8), np.float32).tobytes())
            first, second = await asyncio.gather(single, batch)
            return [first.step], second.steps.tolist(), len(engine.deployment.current_for("gru").store)
        finally:
            await engine.stop()

    assert asyncio.run(main()) == ([1], [2, 1], 2)


def test_busy_rows_answer_the_same_as_a_set_or_as_a_mask_and_across_growth() -> None:
    busy = BusyRows()
    busy.add(3)
    busy.add(7)
    assert 3 in busy and 7 in busy and 4 not in busy and 10**6 not in busy
    assert busy.of(np.array([7, 1, 3, 10**6])).tolist() == [True, False, True, False]
    mask = busy.mask(8)  # a StepBatch wave needs the mask: the set's rows carry over
    assert mask.tolist() == [False, False, False, True, False, False, False, True]
    mask[5] = True  # waves write into the mask directly
    busy.add(20)  # a row created past the mask grows it
    assert 5 in busy and 20 in busy and 19 not in busy and 21 not in busy
    assert len(busy.mask(4)) == 21  # never shrinks
    assert busy.of(np.array([20, 5, 6, 99])).tolist() == [True, True, False, False]
    assert BusyRows().of(np.array([0, 1])).tolist() == [False, False]


def test_eviction_never_takes_a_row_planned_into_the_run_being_assembled() -> None:
    store = make_store()
    store.evict_lru = True
    rows = store.create(["a", "b"])
    store.last_seen[rows] = [1.0, 2.0]  # "a" is the least recently used
    store.protected = BusyRows()
    store.protected.add(int(rows[0]))
    store.directory.max_streams = 2
    store.create(["c"])
    assert "a" in store and "b" not in store and "c" in store


@pytest.mark.parametrize("seed", range(5))
def test_waves_planned_from_rows_are_the_waves_planned_from_ids(seed: int) -> None:
    rng = np.random.default_rng(seed)
    names = [f"s{i}" for i in range(40)]
    row_of = {name: int(row) for name, row in zip(names, rng.permutation(1000)[:40], strict=True)}
    for size in (1, 5, 40, 200):
        ids = [names[i] for i in rng.integers(0, 40 if size > 40 or seed % 2 else size, size)]
        rows = np.array([row_of[i] for i in ids], np.int64)
        by_rows, by_ids = plan_waves(ids, rows), plan_waves(ids)
        assert [w.tolist() for w in by_rows] == [w.tolist() for w in by_ids]
        seen = [i for wave in by_ids for i in wave.tolist()]
        assert sorted(seen) == list(range(size))  # every reading once
        for wave in by_ids:  # a stream at most once per wave
            assert len({ids[i] for i in wave.tolist()}) == len(wave)
        for name in set(ids):  # and each stream's readings in order, one wave after another
            positions = [i for i in range(size) if ids[i] == name]
            where = [next(k for k, wave in enumerate(by_ids) if i in wave) for i in positions]
            assert where == sorted(where) and len(set(where)) == len(where)
