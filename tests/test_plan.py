"""The ordering rule and the policy's arithmetic, as pure functions: no loop, no model, no server."""

from __future__ import annotations

import numpy as np

from cellstream.batching.plan import Ordering, Seq, check_seq, plan_waves, take_wave
from cellstream.batching.policy import BatchPolicy
from cellstream.batching.work import BatchProgress, BatchWork


def admitted(order: Ordering, queue: list[tuple[str, int | None]]) -> list[int]:
    """Positions of `queue` that join the plan, applying the rule as the assembler does."""
    taken = []
    for position, (stream_id, row) in enumerate(queue):
        if order.admits(stream_id, row):
            order.take(stream_id, row)
            taken.append(position)
        else:
            order.keep(stream_id)
    return taken


def test_a_stream_is_in_a_run_once_and_its_later_work_waits() -> None:
    queue = [("a", 0), ("b", 1), ("a", 0), ("c", 2), ("a", 0)]
    assert admitted(Ordering(), queue) == [0, 1, 3]


def test_new_streams_are_tracked_by_id_until_created() -> None:
    queue = [("new", None), ("new", None), ("other", None), ("old", 4)]
    assert admitted(Ordering(), queue) == [0, 2, 3]


def test_work_kept_back_holds_back_all_later_work_of_its_stream_only() -> None:
    order = Ordering()
    order.keep("held")  # e.g. waiting for its stream to leave an old model version
    queue = [("held", 3), ("free", 5), ("held", 3)]
    assert admitted(order, queue) == [1]


def test_rows_busy_in_the_plan_refuse_and_free_rows_admit() -> None:
    order = Ordering()
    order.busy.add(7)
    assert not order.admits("x", 7) and order.admits("y", 8)


def test_a_batch_waits_behind_kept_or_new_streams_it_shares() -> None:
    order = Ordering()
    assert order.admits_batch(["a", "b"])
    order.take("n", None)
    assert not order.admits_batch(["n", "z"]) and order.admits_batch(["a", "z"])
    order.keep("a")
    assert not order.admits_batch(["b", "a"])


def test_seq_zero_runs_the_next_runs_the_last_replays_anything_else_is_stale() -> None:
    assert check_seq(0, 5, reset=False, replayable=True) is Seq.RUN
    assert check_seq(6, 5, reset=False, replayable=True) is Seq.RUN
    assert check_seq(5, 5, reset=False, replayable=True) is Seq.REPLAY
    assert check_seq(5, 5, reset=False, replayable=False) is Seq.STALE  # state was set since
    assert check_seq(4, 5, reset=False, replayable=True) is Seq.STALE
    assert check_seq(1, 5, reset=True, replayable=True) is Seq.RUN  # a reset starts over at 1
    assert check_seq(6, 5, reset=True, replayable=False) is Seq.STALE


def batch(ids: list[str], rows: list[int]) -> BatchProgress:
    x = np.zeros((len(ids), 1), np.float32)
    work = BatchWork(ids, x, None, plan_waves(ids))  # type: ignore[arg-type]
    return BatchProgress(work, np.array(rows, np.int64))


def test_a_wave_takes_its_free_rows_and_holds_every_row_still_to_run() -> None:
    progress = batch(["a", "b", "a", "c"], [0, 1, 0, 2])  # waves: [a b c] then [a]
    busy = np.zeros(4, bool)
    busy[1] = True  # b is in the plan already
    take = take_wave(progress, busy, budget=10)
    assert take.tolist() == [0, 3]  # a and c; b stays first in the wave
    assert [w.tolist() for w in progress.waves] == [[1], [2]]
    assert busy[[0, 1, 2]].all() and progress.waiting == 2


def test_a_wave_stops_at_the_budget_and_keeps_the_rest_in_order() -> None:
    progress = batch([f"s{i}" for i in range(5)], list(range(5)))
    take = take_wave(progress, np.zeros(5, bool), budget=2)
    assert take.tolist() == [0, 1]
    assert [w.tolist() for w in progress.waves] == [[2, 3, 4]]


def test_waves_keep_each_streams_order_one_wave_per_repeat() -> None:
    waves = plan_waves(["a", "b", "a", "a", "c", "b"])
    assert [w.tolist() for w in waves] == [[0, 1, 4], [2, 5], [3]]
    assert [w.tolist() for w in plan_waves(["a", "b"], np.array([3, 9]))] == [[0, 1]]


def test_large_plans_split_into_equal_runs_the_compute_threads_share_evenly() -> None:
    policy = BatchPolicy(max_batch=2048, compute_threads=2)
    chunks = policy.chunks(10_000)
    assert len(chunks) == 6 and {end - start for start, end in chunks} == {1667, 1665}
    assert chunks[0][0] == 0 and chunks[-1][1] == 10_000
    assert policy.parallel(10_000) and not policy.parallel(2048)
    assert not BatchPolicy(max_batch=100, compute_threads=2).parallel(10_000)  # runs too small
    assert BatchPolicy(max_batch=4, compute_threads=1).chunks(10) == [(0, 4), (4, 8), (8, 10)]


def test_a_models_max_batch_caps_the_servers() -> None:
    class Model:
        config_max_batch = 64

    policy = BatchPolicy(max_batch=2048).for_model(Model())  # type: ignore[arg-type]
    assert policy.max_batch == 64 and policy.plan_limit == 64 * policy.runs_per_trip
