"""The Step/StepStream/StepBatch/GetState/SetState/DeleteStream/ListModels semantics of the contract."""

from __future__ import annotations

import itertools

import grpc
import numpy as np
import pytest

from cellstream.client import CellStreamError, Client, StreamState, step_request
from reference import reference_sequence
from support import MODELS

_ids = itertools.count()
X = np.linspace(-1, 1, 8, dtype=np.float32)


def new_id(prefix: str = "s") -> str:
    return f"{prefix}-{next(_ids)}"


def rpc_error(call: object, *args: object, **kwargs: object) -> CellStreamError:
    with pytest.raises(CellStreamError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    return info.value


def snapshot(client: Client, stream_id: str) -> StreamState:
    return client.get_state(stream_id)


def assert_unchanged(client: Client, before: StreamState) -> None:
    after = client.get_state(before.stream_id)
    assert after.step == before.step and after.model == before.model
    for name, value in before.state.items():
        np.testing.assert_array_equal(after.state[name], value)


def primed(client: Client, model: str = "", steps: int = 3) -> StreamState:
    stream_id = new_id("primed")
    for _ in range(steps):
        client.step(stream_id, X, model=model)
    return client.get_state(stream_id)


# --- Step ---------------------------------------------------------------------------------------


def test_first_step_starts_from_zero_state_on_default_model(client: Client) -> None:
    reply = client.step(new_id(), X)
    expected, states = reference_sequence(MODELS / "gru", X[None])
    np.testing.assert_allclose(reply.output, expected[0], atol=1e-6)
    np.testing.assert_allclose(reply.state["h"], states[0]["h"], atol=1e-6)
    assert reply.step == 1 and reply.state["h"].shape == (64,)


def test_request_id_is_echoed_and_omit_state_leaves_state_out(client: Client) -> None:
    reply = client.step(new_id(), X, request_id=987654321, omit_state=True)
    assert reply.request_id == 987654321 and reply.state == {} and reply.output.shape == (1,)


def test_stream_stays_bound_to_its_model(client: Client) -> None:
    before = primed(client, "gru")
    error = rpc_error(client.step, before.stream_id, X, model="lstm")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "'gru'" in error.details()
    assert_unchanged(client, before)


@pytest.mark.parametrize(
    ("reading", "code", "words"),
    [
        (np.zeros(7), grpc.StatusCode.INVALID_ARGUMENT, "7 values"),
        (np.zeros(9), grpc.StatusCode.INVALID_ARGUMENT, "expects 8"),
        (np.array([0, 0, np.nan, 0, 0, 0, 0, 0]), grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
        (np.array([0, 0, 0, 0, 0, 0, 0, np.inf]), grpc.StatusCode.INVALID_ARGUMENT, "infinite"),
    ],
)
def test_bad_reading_is_refused_and_changes_nothing(
    client: Client, reading: np.ndarray, code: grpc.StatusCode, words: str
) -> None:
    before = primed(client)
    error = rpc_error(client.step, before.stream_id, reading)
    assert error.code() == code and words in error.details()
    assert_unchanged(client, before)


@pytest.mark.parametrize(
    ("stream_id", "words"),
    [
        ("", "empty"),
        ("x" * 257, "257 bytes"),
        ("é" * 129, "258 bytes"),
        ("bad\nid", "control"),
        ("tab\tid", "control"),
    ],
)
def test_bad_stream_id_is_invalid_argument(client: Client, stream_id: str, words: str) -> None:
    error = rpc_error(client.step, stream_id, X)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and words in error.details()


def test_stream_id_limits_are_inclusive(client: Client) -> None:
    assert client.step("x" * 256, X).step == 1
    assert client.step("ü" * 128, X).step == 1  # 256 bytes of UTF-8


def test_unknown_model_is_not_found_and_creates_nothing(client: Client) -> None:
    stream_id = new_id()
    error = rpc_error(client.step, stream_id, X, model="nope")
    assert error.code() == grpc.StatusCode.NOT_FOUND and "'nope'" in error.details()
    assert rpc_error(client.get_state, stream_id).code() == grpc.StatusCode.NOT_FOUND


def test_given_state_replaces_state_before_the_step(client: Client) -> None:
    before = primed(client)
    h = np.random.default_rng(3).uniform(-0.5, 0.5, 64).astype(np.float32)
    reply = client.step(before.stream_id, X, state={"h": h})
    expected, states = reference_sequence(MODELS / "gru", X[None], initial={"h": h})
    np.testing.assert_allclose(reply.output, expected[0], atol=1e-6)
    np.testing.assert_allclose(reply.state["h"], states[0]["h"], atol=1e-6)
    assert reply.step == before.step + 1


@pytest.mark.parametrize(
    ("state", "words"),
    [
        ({"h": np.zeros(63)}, "expects shape [64]"),
        ({"h": np.zeros((2, 32))}, "expects shape [64]"),
        ({"c": np.zeros(64)}, "no state ['c']"),
        ({"h": np.full(64, np.nan)}, "NaN"),
    ],
)
def test_bad_given_state_is_refused_and_changes_nothing(
    client: Client, state: dict[str, np.ndarray], words: str
) -> None:
    before = primed(client)
    error = rpc_error(client.step, before.stream_id, X, state=state)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and words in error.details()
    assert_unchanged(client, before)


def test_reset_restarts_from_initial_state_and_step_one(client: Client) -> None:
    before = primed(client, steps=5)
    fresh = client.step(new_id(), X)
    reply = client.step(before.stream_id, X, reset=True)
    assert reply.step == 1
    np.testing.assert_array_equal(reply.output, fresh.output)
    np.testing.assert_array_equal(reply.state["h"], fresh.state["h"])


def test_end_replies_with_final_state_then_drops_the_stream(client: Client) -> None:
    before = primed(client, steps=2)
    reply = client.step(before.stream_id, X, end=True)
    assert reply.step == 3 and reply.state["h"].shape == (64,)
    assert rpc_error(client.get_state, before.stream_id).code() == grpc.StatusCode.NOT_FOUND
    assert client.step(before.stream_id, X).step == 1  # the id starts a new stream


# --- seq ----------------------------------------------------------------------------------------


def test_seq_next_applies_and_retry_replays_without_applying(client: Client) -> None:
    stream_id = new_id("seq")
    first = client.step(stream_id, X, seq=1)
    second = client.step(stream_id, X * 2, seq=2)
    retry = client.step(stream_id, X * 2, seq=2)
    assert (first.step, second.step, retry.step) == (1, 2, 2)
    assert retry.replayed and not second.replayed
    np.testing.assert_array_equal(retry.output, second.output)
    np.testing.assert_array_equal(retry.state["h"], second.state["h"])
    assert client.get_state(stream_id).step == 2
    np.testing.assert_array_equal(client.get_state(stream_id).state["h"], second.state["h"])


@pytest.mark.parametrize("seq", [1, 4, 100])
def test_seq_gap_or_old_step_is_failed_precondition_naming_the_step(client: Client, seq: int) -> None:
    stream_id = new_id("seq")
    for i in range(2):
        client.step(stream_id, X, seq=i + 1)
    before = client.get_state(stream_id)
    error = rpc_error(client.step, stream_id, X, seq=seq)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "at step 2" in error.details()
    assert_unchanged(client, before)


def test_seq_on_a_new_stream_must_be_one(client: Client) -> None:
    stream_id = new_id("seq")
    error = rpc_error(client.step, stream_id, X, seq=2)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "at step 0" in error.details()
    assert rpc_error(client.get_state, stream_id).code() == grpc.StatusCode.NOT_FOUND


def test_seq_zero_is_unchecked(client: Client) -> None:
    stream_id = new_id("seq")
    client.step(stream_id, X, seq=1)
    assert client.step(stream_id, X, seq=0).step == 2


def test_replay_is_not_offered_after_state_was_replaced(client: Client) -> None:
    stream_id = new_id("seq")
    client.step(stream_id, X, seq=1)
    client.set_state(stream_id, {"h": np.zeros(64)}, step=1)
    error = rpc_error(client.step, stream_id, X, seq=1)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert client.step(stream_id, X, seq=2).step == 2


# --- StepStream ---------------------------------------------------------------------------------


def test_stream_bad_message_gets_error_reply_and_call_goes_on(client: Client) -> None:
    stream_id = new_id("bidi")
    requests = [
        step_request(stream_id, X, request_id=1),
        step_request(stream_id, np.zeros(3), request_id=2),
        step_request(stream_id, X, model="nope", request_id=3),
        step_request(stream_id, X, seq=9, request_id=4),
        step_request(stream_id, X, request_id=5),
    ]
    replies = list(client.step_stream(requests))
    assert [r.request_id for r in replies] == [1, 2, 3, 4, 5]
    codes = [r.error[0] if r.error else grpc.StatusCode.OK for r in replies]
    assert codes == [
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OK,
    ]
    assert [r.step for r in replies if not r.error] == [1, 2]
    assert "at step 1" in replies[3].error[1]  # type: ignore[index]


def test_stream_in_flight_readings_of_one_stream_apply_in_order(client: Client) -> None:
    stream_id = new_id("bidi")
    x = np.random.default_rng(5).normal(size=(64, 8)).astype(np.float32)
    replies = list(client.step_stream(step_request(stream_id, r, seq=i + 1) for i, r in enumerate(x)))
    assert [r.step for r in replies] == list(range(1, 65))
    expected, _ = reference_sequence(MODELS / "gru", x)
    np.testing.assert_allclose(np.array([r.output for r in replies]), expected, atol=1e-5)


# --- StepBatch ----------------------------------------------------------------------------------


def test_batch_repeated_id_gets_readings_in_order(client: Client) -> None:
    stream_id = new_id("batch")
    x = np.random.default_rng(6).normal(size=(5, 8)).astype(np.float32)
    reply = client.step_batch([stream_id] * 5, x)
    assert reply.steps.tolist() == [1, 2, 3, 4, 5]
    expected, states = reference_sequence(MODELS / "gru", x)
    np.testing.assert_allclose(reply.outputs, expected, atol=1e-5)
    np.testing.assert_allclose(reply.states["h"], np.array([s["h"] for s in states]), atol=1e-5)


def test_batch_omit_state(client: Client) -> None:
    reply = client.step_batch([new_id("batch"), new_id("batch")], np.zeros((2, 8)), omit_state=True)
    assert reply.states == {} and reply.outputs.shape == (2, 1)


def test_batch_larger_than_max_batch_is_chunked_in_order(client: Client) -> None:
    ids = [f"big-{i}" for i in range(5000)]
    x = np.random.default_rng(8).normal(size=(5000, 8)).astype(np.float32)
    reply = client.step_batch(ids + ids[:10], np.concatenate([x, x[:10]]))
    assert reply.steps.tolist() == [1] * 5000 + [2] * 10
    alone = client.step_batch(["big-alone"], x[4321:4322])
    np.testing.assert_allclose(reply.outputs[4321], alone.outputs[0], atol=1e-6)


@pytest.mark.parametrize(
    ("mutate", "code", "words"),
    [
        (lambda ids, x: (ids, x[:, :7]), grpc.StatusCode.INVALID_ARGUMENT, "shape (6, 7)"),
        (lambda ids, x: ([*ids[:2], "", *ids[3:]], x), grpc.StatusCode.INVALID_ARGUMENT, "stream_ids[2]"),
        (
            lambda ids, x: ([*ids[:3], "a\x00b", *ids[4:]], x),
            grpc.StatusCode.INVALID_ARGUMENT,
            "stream_ids[3]",
        ),
        (
            lambda ids, x: (ids, np.where(np.arange(len(x))[:, None] == 4, np.nan, x)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "stream_ids[4]",
        ),
    ],
)
def test_bad_batch_fails_whole_and_applies_nothing(
    client: Client, mutate: object, code: grpc.StatusCode, words: str
) -> None:
    before = [primed(client) for _ in range(6)]
    ids = [b.stream_id for b in before]
    x = np.ones((6, 8), np.float32)
    bad_ids, bad_x = mutate(ids, x)  # type: ignore[operator]
    error = rpc_error(client.step_batch, bad_ids, bad_x)
    assert error.code() == code and words in error.details()
    for b in before:
        assert_unchanged(client, b)


def test_batch_with_stream_of_another_model_applies_nothing(client: Client) -> None:
    lstm = primed(client, "lstm")
    gru = primed(client, "gru")
    error = rpc_error(client.step_batch, [gru.stream_id, lstm.stream_id], np.ones((2, 8)), model="gru")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "stream_ids[1]" in error.details()
    assert_unchanged(client, gru)
    assert_unchanged(client, lstm)


def test_batch_empty_is_invalid(client: Client) -> None:
    assert rpc_error(client.step_batch, [], np.zeros((0, 8))).code() == grpc.StatusCode.INVALID_ARGUMENT


# --- GetState / SetState / DeleteStream / ListModels -------------------------------------------


def test_get_state_of_unknown_stream_is_not_found(client: Client) -> None:
    error = rpc_error(client.get_state, new_id("ghost"))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "does not exist" in error.details()


def test_set_state_creates_then_replaces_state_and_step(client: Client) -> None:
    stream_id = new_id("set")
    h = np.arange(64, dtype=np.float32) / 100
    created = client.set_state(stream_id, {"h": h}, model="gru", step=41)
    assert created.step == 41 and created.model == "gru"
    reply = client.step(stream_id, X, seq=42)
    expected, _ = reference_sequence(MODELS / "gru", X[None], initial={"h": h})
    np.testing.assert_allclose(reply.output, expected[0], atol=1e-6)
    assert reply.step == 42
    replaced = client.set_state(stream_id, {"h": np.zeros(64)}, step=7)
    assert replaced.step == 7 and not replaced.state["h"].any()


def test_set_state_lstm_partial_keeps_other_state(client: Client) -> None:
    before = primed(client, "lstm")
    after = client.set_state(before.stream_id, {"cell": np.ones(32)}, step=before.step)
    np.testing.assert_array_equal(after.state["hidden"], before.state["hidden"])
    np.testing.assert_array_equal(after.state["cell"], np.ones(32, np.float32))


@pytest.mark.parametrize(
    ("state", "model", "code"),
    [
        ({"h": np.zeros(5)}, "", grpc.StatusCode.INVALID_ARGUMENT),
        ({"hidden": np.zeros(32)}, "", grpc.StatusCode.INVALID_ARGUMENT),
        ({"hidden": np.zeros(32)}, "lstm", grpc.StatusCode.FAILED_PRECONDITION),
        ({"h": np.zeros(64)}, "nope", grpc.StatusCode.NOT_FOUND),
    ],
)
def test_bad_set_state_changes_nothing(
    client: Client, state: dict[str, np.ndarray], model: str, code: grpc.StatusCode
) -> None:
    before = primed(client)
    assert rpc_error(client.set_state, before.stream_id, state, model=model).code() == code
    assert_unchanged(client, before)


def test_delete_says_whether_stream_existed(client: Client) -> None:
    before = primed(client)
    assert client.delete(before.stream_id) is True
    assert client.delete(before.stream_id) is False
    assert rpc_error(client.get_state, before.stream_id).code() == grpc.StatusCode.NOT_FOUND


def test_list_models_counts_streams(client: Client) -> None:
    def count() -> int:
        return next(m.streams for m in client.list_models() if m.name == "gru2")

    start = count()
    client.step(new_id("count"), X, model="gru2")
    assert count() == start + 1
    versions = {m.name: m.version for m in client.list_models()}
    assert {name: versions[name] for name in ("gru", "gru2", "lstm")} == {
        "gru": "1",
        "gru2": "1",
        "lstm": "1",
    }
