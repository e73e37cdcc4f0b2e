"""Row lookups made when a StepBatch arrives stay right by the time the batcher uses them."""

from __future__ import annotations

import asyncio

import numpy as np

from cellstream.config import Settings
from cellstream.engine import Engine
from cellstream.model import ModelRepository, StateSpec
from cellstream.state import StateStore, StreamDirectory
from support import MODELS


def make_store() -> StateStore:
    spec = StateSpec("h", "h_next", (4,), np.zeros(4, np.float32))
    return StateStore(("m", "1"), [spec], 1, StreamDirectory(), capacity=4)


def test_a_lookup_is_reused_only_while_no_row_was_freed() -> None:
    store = make_store()
    store.create(["a", "b"])
    earlier = (store.lookup(["a", "b"]), store.generation)
    store.delete(["a"])
    store.create(["c"])  # takes the row "a" had
    rows = store.rows_for(["a", "b"], earlier)
    assert store.rows["a"] == rows[0] != store.rows["c"]
    assert rows[1] == store.rows["b"]
    assert len(set(store.rows.values())) == len(store.rows) == 3


def test_streams_created_after_the_lookup_are_not_created_twice() -> None:
    store = make_store()
    earlier = (store.lookup(["x", "y"]), store.generation)
    store.create(["x"])  # other work made "x" between the lookup and this batch's turn
    rows = store.rows_for(["x", "y"], earlier)
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
