"""Numbers from the server equal an independent reference: the ONNX GRU/LSTM sequence operators."""

from __future__ import annotations

import numpy as np
import pytest

from cellstream.client import Client, step_request
from reference import reference_sequence
from support import MODELS, RunningServer

STEPS = 500
MODEL_NAMES = ["gru", "lstm", "gru2"]
TOLERANCE = 1e-5


def readings(seed: int, n: int = STEPS) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.0, (n, 8)).astype(np.float32)


def assert_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    error = float(np.max(np.abs(actual - expected)))
    assert error <= TOLERANCE, f"{what}: max abs error {error:.2e} > {TOLERANCE}"


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_step_matches_sequence_operator(client: Client, model: str) -> None:
    x = readings(1)
    expected_out, expected_states = reference_sequence(MODELS / model, x)
    outputs, last = [], None
    for i, reading in enumerate(x):
        last = client.step(f"fidelity-step-{model}", reading, model=model)
        assert last.step == i + 1
        outputs.append(last.output)
    assert last is not None
    assert_close(np.array(outputs), expected_out, f"{model} Step outputs")
    for name, value in expected_states[-1].items():
        assert_close(last.state[name], value, f"{model} Step final state {name}")


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_step_stream_matches_sequence_operator(client: Client, model: str) -> None:
    # Three streams interleaved on one call, all in flight at once: order per stream must hold.
    inputs = {f"fidelity-stream-{model}-{k}": readings(10 + k) for k in range(3)}
    requests = [
        step_request(stream_id, x[i], model=model, request_id=i)
        for i in range(STEPS)
        for stream_id, x in inputs.items()
    ]
    replies = list(client.step_stream(requests))
    assert [r.request_id for r in replies] == [r.request_id for r in requests]
    for stream_id, x in inputs.items():
        mine = [r for r in replies if r.stream_id == stream_id]
        assert [r.step for r in mine] == list(range(1, STEPS + 1))
        expected_out, expected_states = reference_sequence(MODELS / model, x)
        assert_close(np.array([r.output for r in mine]), expected_out, f"{model} StepStream outputs")
        for step in (0, STEPS // 2, STEPS - 1):
            for name, value in expected_states[step].items():
                assert_close(mine[step].state[name], value, f"{model} StepStream state {name} at {step}")


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_step_batch_matches_sequence_operator(client: Client, model: str) -> None:
    # 4 streams, each StepBatch carries two readings of every stream (repeated ids apply in order).
    ids = [f"fidelity-batch-{model}-{k}" for k in range(4)]
    x = {stream_id: readings(20 + k) for k, stream_id in enumerate(ids)}
    outputs: dict[str, list[np.ndarray]] = {stream_id: [] for stream_id in ids}
    states: dict[str, list[np.ndarray]] = {stream_id: [] for stream_id in ids}
    for t in range(0, STEPS, 2):
        batch_ids = ids + ids
        inputs = np.stack([x[s][t] for s in ids] + [x[s][t + 1] for s in ids])
        reply = client.step_batch(batch_ids, inputs, model=model)
        assert reply.steps.tolist() == [t + 1] * 4 + [t + 2] * 4
        for i, stream_id in enumerate(batch_ids):
            outputs[stream_id].append(reply.outputs[i])
            states[stream_id].append({name: value[i] for name, value in reply.states.items()})
    for stream_id in ids:
        expected_out, expected_states = reference_sequence(MODELS / model, x[stream_id])
        # Each message lists every stream's earlier reading first, so replies are in time order.
        assert_close(np.array(outputs[stream_id]), expected_out, f"{model} StepBatch outputs")
        final = states[stream_id][-1]
        for name, value in expected_states[-1].items():
            assert_close(final[name].reshape(value.shape), value, f"{model} StepBatch final state {name}")


def test_lstm_config_names_and_gru2_layers_reported(client: Client) -> None:
    models = {m.name: m for m in client.list_models()}
    assert {s.name: list(s.shape) for s in models["lstm"].states} == {"hidden": [32], "cell": [32]}
    assert {s.name: list(s.shape) for s in models["gru2"].states} == {"h": [2, 32]}
    assert {s.name: list(s.shape) for s in models["gru"].states} == {"h": [64]}
    assert models["gru"].is_default and not models["lstm"].is_default
    assert (models["gru"].input_size, models["gru"].output_size) == (8, 1)


def test_server_is_a_separate_process(server: RunningServer) -> None:
    import os  # noqa: PLC0415

    assert server.pid != os.getpid() and server.process.poll() is None
