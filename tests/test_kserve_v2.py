"""The KServe v2 / Triton protocol against the real server, driven by Triton's own client
(`tritonclient.grpc`, unchanged): health and metadata, sequences as streams against the ONNX
sequence-operator reference, ModelStreamInfer with errors in-band, the asyncio client, every
malformed request refused with its code and nothing changed, the RPCs not served, statistics,
metrics, reflection and tokens.

Hand-made requests go through tritonclient's own generated stub (`service_pb2_grpc`), so they
are exactly what a Triton client can put on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import queue
import re
import secrets
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc
from tritonclient.utils import InferenceServerException

from cellstream.client import CellStreamError, Client
from cellstream.tenants import token_line
from reference import reference_sequence
from support import MODELS, REPO, RunningServer, start_server

# Each bundled cell model: its reading, its answer, and its states -> their next-value outputs.
MODEL_TENSORS = {
    "gru": ("x", "y", {"h": "h_out"}),
    "lstm": ("reading", "prediction", {"hidden": "hidden_next", "cell": "cell_next"}),
    "gru2": ("x", "y", {"h": "h_out"}),
}
TOLERANCE = 1e-5
_ids = itertools.count(1)


def new_sequence() -> int:
    return 7_000_000 + next(_ids)


def readings(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)


def reading_input(model: str, x: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput(MODEL_TENSORS[model][0], [1, 8], "FP32")
    tensor.set_data_from_numpy(np.asarray(x, np.float32).reshape(1, 8))
    return tensor


def assert_matches(result: Any, model: str, expected: np.ndarray, states: dict[str, np.ndarray]) -> None:
    """A reply's answer and every state's next value against the reference's step."""
    _, answer, pairs = MODEL_TENSORS[model]
    np.testing.assert_allclose(result.as_numpy(answer)[0], expected, atol=TOLERANCE)
    for state, output in pairs.items():
        np.testing.assert_allclose(result.as_numpy(output)[0], states[state], atol=TOLERANCE)


@pytest.fixture(scope="module")
def triton_client(server: RunningServer) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(server.address) as client:
        yield client


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[tpb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield tpb_grpc.GRPCInferenceServiceStub(channel)


# --- health and metadata ------------------------------------------------------------------------


def test_server_is_live_and_ready_and_names_its_extensions(
    triton_client: triton.InferenceServerClient,
) -> None:
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    metadata = triton_client.get_server_metadata()
    assert metadata.name == "cellstream"
    assert {"sequence", "sequence(string_id)", "statistics", "model_configuration"} <= set(
        metadata.extensions
    )


def test_models_are_ready_and_an_unknown_one_is_not(triton_client: triton.InferenceServerClient) -> None:
    assert all(triton_client.is_model_ready(name) for name in MODEL_TENSORS)
    assert triton_client.is_model_ready("gru", "1")
    assert not triton_client.is_model_ready("no-such-model")
    assert not triton_client.is_model_ready("gru", "99")


def test_model_metadata_lists_the_reading_then_states_and_the_answer_then_next_states(
    triton_client: triton.InferenceServerClient,
) -> None:
    metadata = triton_client.get_model_metadata("lstm")
    assert metadata.name == "lstm" and list(metadata.versions) == ["1"]
    assert metadata.platform == "onnxruntime_onnx"
    inputs = [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs]
    outputs = [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs]
    assert inputs == [("reading", "FP32", [-1, 8]), ("cell", "FP32", [-1, 32]), ("hidden", "FP32", [-1, 32])]
    assert outputs == [
        ("prediction", "FP32", [-1, 1]),
        ("cell_next", "FP32", [-1, 32]),
        ("hidden_next", "FP32", [-1, 32]),
    ]
    assert [list(t.shape) for t in triton_client.get_model_metadata("gru2").inputs] == [[-1, 8], [-1, 2, 32]]


def test_model_config_is_a_stateful_triton_configuration(triton_client: triton.InferenceServerClient) -> None:
    config = triton_client.get_model_config("gru").config
    assert config.name == "gru" and config.backend == "onnxruntime" and config.max_batch_size > 0
    assert [(i.name, list(i.dims), i.optional) for i in config.input] == [
        ("x", [8], False),
        ("h", [64], True),
    ]
    assert [(o.name, list(o.dims)) for o in config.output] == [("y", [1]), ("h_out", [64])]
    assert config.WhichOneof("scheduling_choice") == "sequence_batching"
    (state,) = config.sequence_batching.state
    assert (state.input_name, state.output_name, list(state.dims)) == ("h", "h_out", [64])
    assert state.initial_state[0].zero_data


def test_unknown_models_and_versions_are_not_found(triton_client: triton.InferenceServerClient) -> None:
    for call in (
        lambda: triton_client.get_model_metadata("no-such-model"),
        lambda: triton_client.get_model_config("no-such-model"),
        lambda: triton_client.get_model_metadata("gru", "99"),
        lambda: triton_client.get_inference_statistics("no-such-model"),
    ):
        with pytest.raises(InferenceServerException) as refused:
            call()
        assert refused.value.status() == "StatusCode.NOT_FOUND", refused.value.message()


def test_repository_index_lists_every_model_ready(triton_client: triton.InferenceServerClient) -> None:
    index = triton_client.get_model_repository_index()
    assert {(m.name, m.version, m.state) for m in index.models} >= {(n, "1", "READY") for n in MODEL_TENSORS}


def test_the_guides_example_runs_against_a_real_server(server: RunningServer, client: Client) -> None:
    guide = REPO / "docs" / "kserve.md"
    text = guide.read_text()
    (block,) = re.finditer(r"^```python\n(.*?)^```$", text, re.DOTALL | re.MULTILINE)
    line = text.count("\n", 0, block.start(1)) + 1
    code = "\n" * (line - 1) + block.group(1).replace("localhost:50051", server.address)
    namespace: dict[str, Any] = {"__name__": "kserve_guide_example"}
    exec(compile(code, str(guide), "exec"), namespace)
    expected, states = reference_sequence(MODELS / "gru", np.zeros((2, 8), np.float32))
    np.testing.assert_allclose(namespace["y"][0], expected[1], atol=TOLERANCE)
    np.testing.assert_allclose(namespace["h"][0], states[1]["h"], atol=TOLERANCE)
    with pytest.raises(CellStreamError):  # the example ended its sequence
        client.get_state("42")


# --- sequences are streams ----------------------------------------------------------------------


@pytest.mark.parametrize("model", sorted(MODEL_TENSORS))
def test_a_sequence_through_model_infer_matches_the_reference_and_is_the_native_stream(
    model: str, triton_client: triton.InferenceServerClient, client: Client
) -> None:
    x = readings(6, seed=len(model))
    expected, states = reference_sequence(MODELS / model, x)
    sequence = new_sequence()
    for t in range(len(x)):
        if t == len(x) - 1:  # before the end: the native API sees the same stream, by its decimal id
            view = client.get_state(str(sequence))
            assert view.model == model and view.step == t
            for name, value in states[t - 1].items():
                np.testing.assert_allclose(view.state[name], value, atol=TOLERANCE)
        result = triton_client.infer(
            model,
            [reading_input(model, x[t])],
            sequence_id=sequence,
            sequence_start=t == 0,
            sequence_end=t == len(x) - 1,
        )
        assert_matches(result, model, expected[t], states[t])
        assert result.get_response().parameters["sequence_step"].uint64_param == t + 1
    with pytest.raises(CellStreamError) as gone:  # sequence_end dropped it after answering
        client.get_state(str(sequence))
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_string_sequence_id_is_the_stream_id_and_native_steps_continue_it(
    triton_client: triton.InferenceServerClient, client: Client
) -> None:
    x = readings(4, seed=11)
    expected, states = reference_sequence(MODELS / "gru", x)
    sequence = f"sensor/{new_sequence()}"
    first = triton_client.infer(
        "gru", [reading_input("gru", x[0])], sequence_id=sequence, sequence_start=True
    )
    assert_matches(first, "gru", expected[0], states[0])
    native = client.step(sequence, x[1], model="gru")
    np.testing.assert_allclose(native.output, expected[1], atol=TOLERANCE)
    for t in (2, 3):
        result = triton_client.infer("gru", [reading_input("gru", x[t])], sequence_id=sequence)
        assert_matches(result, "gru", expected[t], states[t])
    assert client.get_state(sequence).step == 4


def test_sequence_start_resets_the_stream_to_its_initial_state(
    triton_client: triton.InferenceServerClient,
) -> None:
    x = readings(3, seed=12)
    expected, states = reference_sequence(MODELS / "gru", x[:1])
    sequence = new_sequence()
    for t in range(3):
        triton_client.infer("gru", [reading_input("gru", x[t])], sequence_id=sequence, sequence_start=t == 0)
    again = triton_client.infer(
        "gru", [reading_input("gru", x[0])], sequence_id=sequence, sequence_start=True
    )
    assert_matches(again, "gru", expected[0], states[0])
    assert again.get_response().parameters["sequence_step"].uint64_param == 1


def test_a_state_input_replaces_the_state_before_the_step(
    triton_client: triton.InferenceServerClient,
) -> None:
    x = readings(2, seed=13)
    h = np.random.default_rng(14).standard_normal(64).astype(np.float32) * 0.5
    expected, states = reference_sequence(MODELS / "gru", x[1:], initial={"h": h})
    sequence = new_sequence()
    triton_client.infer("gru", [reading_input("gru", x[0])], sequence_id=sequence, sequence_start=True)
    state = triton.InferInput("h", [1, 64], "FP32")
    state.set_data_from_numpy(h[None])
    result = triton_client.infer("gru", [reading_input("gru", x[1]), state], sequence_id=sequence)
    assert_matches(result, "gru", expected[0], states[0])


def test_requested_outputs_select_what_the_reply_carries_and_the_id_is_echoed(
    triton_client: triton.InferenceServerClient,
) -> None:
    x = readings(1, seed=15)
    expected, _ = reference_sequence(MODELS / "lstm", x)
    result = triton_client.infer(
        "lstm",
        [reading_input("lstm", x[0])],
        sequence_id=new_sequence(),
        request_id="req-17",
        outputs=[triton.InferRequestedOutput("prediction")],
    )
    response = result.get_response()
    assert response.id == "req-17" and response.model_name == "lstm" and response.model_version == "1"
    assert [o.name for o in response.outputs] == ["prediction"] and len(response.raw_output_contents) == 1
    np.testing.assert_allclose(result.as_numpy("prediction"), expected[:1], atol=TOLERANCE)
    assert result.as_numpy("hidden_next") is None


def test_typed_fp32_contents_are_taken_like_raw_bytes(stub: tpb_grpc.GRPCInferenceServiceStub) -> None:
    x = readings(1, seed=16)
    expected, _ = reference_sequence(MODELS / "gru", x)
    request = tpb.ModelInferRequest(model_name="gru")
    request.parameters["sequence_id"].uint64_param = new_sequence()
    request.inputs.add(name="x", datatype="FP32", shape=[1, 8]).contents.fp32_contents.extend(x[0].tolist())
    reply = stub.ModelInfer(request, timeout=10)
    np.testing.assert_allclose(
        np.frombuffer(reply.raw_output_contents[0], "<f4"), expected[0], atol=TOLERANCE
    )


def test_two_interleaved_sequences_keep_separate_state(triton_client: triton.InferenceServerClient) -> None:
    a, b = readings(3, seed=17), readings(3, seed=18)
    (expected_a, states_a), (expected_b, states_b) = (reference_sequence(MODELS / "gru", v) for v in (a, b))
    first, second = new_sequence(), f"other-{new_sequence()}"
    for t in range(3):
        result_a = triton_client.infer("gru", [reading_input("gru", a[t])], sequence_id=first)
        result_b = triton_client.infer("gru", [reading_input("gru", b[t])], sequence_id=second)
        assert_matches(result_a, "gru", expected_a[t], states_a[t])
        assert_matches(result_b, "gru", expected_b[t], states_b[t])


def test_in_flight_unary_requests_of_one_sequence_apply_in_order(
    triton_client: triton.InferenceServerClient,
) -> None:
    x = readings(40, seed=19)
    expected, states = reference_sequence(MODELS / "gru", x)
    sequence = new_sequence()
    done: queue.Queue[tuple[Any, Any]] = queue.Queue()
    # The server applies them in the order they arrive; a channel still connecting may send the
    # calls queued meanwhile in any order, so it is connected first.
    assert triton_client.is_server_live()
    for t in range(len(x)):  # all sent before any reply is read
        triton_client.async_infer(
            "gru",
            [reading_input("gru", x[t])],
            callback=lambda result, error: done.put((result, error)),
            sequence_id=sequence,
            request_id=str(t),
        )
    replies = [done.get(timeout=20) for _ in range(len(x))]
    assert all(error is None for _, error in replies), [e for _, e in replies if e]
    for result, _ in replies:
        t = int(result.get_response().id)
        assert result.get_response().parameters["sequence_step"].uint64_param == t + 1
        assert_matches(result, "gru", expected[t], states[t])


# --- ModelStreamInfer ---------------------------------------------------------------------------


def test_stream_infer_of_200_interleaved_sequences_matches_and_an_error_stays_in_band(
    server: RunningServer,
) -> None:
    steps, count = 3, 200
    x = readings(steps * count, seed=20).reshape(count, steps, 8)
    references = [reference_sequence(MODELS / "lstm", x[s]) for s in range(count)]
    base = new_sequence() * 1000
    replies: queue.Queue[tuple[Any, Any]] = queue.Queue()
    with triton.InferenceServerClient(server.address) as streamer:
        streamer.start_stream(callback=lambda result, error: replies.put((result, error)))
        sent = 0
        for t in range(steps):
            for s in range(count):
                streamer.async_stream_infer(
                    "lstm",
                    [reading_input("lstm", x[s, t])],
                    request_id=f"{s}:{t}",
                    sequence_id=base + s,
                    sequence_start=t == 0,
                    sequence_end=t == steps - 1,
                )
                sent += 1
                if t == 1 and s == count // 2:  # a wrong input name, mid-stream
                    streamer.async_stream_infer(
                        "lstm", [reading_input("gru", x[s, t])], request_id="bad", sequence_id=base + s
                    )
                    sent += 1
        got = [replies.get(timeout=30) for _ in range(sent)]
        streamer.stop_stream()
    errors = [error for _, error in got if error is not None]
    assert len(errors) == 1 and "[INVALID_ARGUMENT]" in errors[0].message() and "'x'" in errors[0].message()
    order = [result.get_response().id for result, _ in got if result is not None]
    assert order == [f"{s}:{t}" for t in range(steps) for s in range(count)]  # request order
    for result, _ in got:
        if result is None:
            continue
        s, t = (int(v) for v in result.get_response().id.split(":"))
        expected, states = references[s]
        assert_matches(result, "lstm", expected[t], states[t])
        assert result.get_response().parameters["triton_final_response"].bool_param


def test_aio_client_infers_and_streams(server: RunningServer) -> None:
    x = readings(4, seed=21)
    expected, states = reference_sequence(MODELS / "gru2", x)
    sequence = new_sequence()

    async def drive() -> list[Any]:
        async with triton_aio.InferenceServerClient(server.address) as aio:
            assert await aio.is_server_live()
            first = await aio.infer(
                "gru2", [reading_input("gru2", x[0])], sequence_id=sequence, sequence_start=True
            )

            async def requests() -> Any:
                for t in (1, 2, 3):
                    yield {
                        "model_name": "gru2",
                        "inputs": [reading_input("gru2", x[t])],
                        "sequence_id": sequence,
                    }

            streamed = [result async for result, error in aio.stream_infer(requests()) if error is None]
            return [first, *streamed]

    results = asyncio.run(drive())
    assert len(results) == 4
    for t, result in enumerate(results):
        assert_matches(result, "gru2", expected[t], states[t])


# --- refusals -----------------------------------------------------------------------------------


ZEROS = np.zeros(8, np.float32).tobytes()


def _request(**change: Any) -> tpb.ModelInferRequest:
    """A valid request of gru for the primed stream, with `change`: `model`, `version`,
    `sequence` (its type picks the parameter field; None: no sequence_id), `inputs` (name ->
    (datatype, shape, raw bytes or a function filling the tensor); a '#suffix' names one input
    twice), `parameters` (name -> a function filling it), `outputs` (names), `then` (functions
    of the whole request)."""
    request = tpb.ModelInferRequest(
        model_name=change.pop("model", "gru"), model_version=change.pop("version", "")
    )
    sequence = change.pop("sequence", "primed")
    if sequence is not None:
        field = {int: "int64_param", float: "double_param", str: "string_param"}[type(sequence)]
        setattr(request.parameters["sequence_id"], field, sequence)
    for name, (datatype, shape, data) in change.pop("inputs", {"x": ("FP32", [1, 8], ZEROS)}).items():
        tensor = request.inputs.add(name=name.split("#")[0], datatype=datatype, shape=shape)
        if isinstance(data, bytes):
            request.raw_input_contents.append(data)
        else:
            data(tensor)
    for key, fill in change.pop("parameters", {}).items():
        fill(request.parameters[key])
    for name in change.pop("outputs", []):
        request.outputs.add(name=name)
    for hook in change.pop("then", []):
        hook(request)
    assert not change, change
    return request


REFUSALS: dict[str, tuple[dict[str, Any], grpc.StatusCode, str]] = {
    "wrong datatype": (
        {"inputs": {"x": ("FP64", [1, 8], bytes(64))}},
        grpc.StatusCode.INVALID_ARGUMENT,
        "FP32",
    ),
    "short shape": (
        {"inputs": {"x": ("FP32", [1, 7], bytes(28))}},
        grpc.StatusCode.INVALID_ARGUMENT,
        "[1, 8]",
    ),
    "no batch axis": ({"inputs": {"x": ("FP32", [8], ZEROS)}}, grpc.StatusCode.INVALID_ARGUMENT, "[1, 8]"),
    "batch of two": (
        {"inputs": {"x": ("FP32", [2, 8], ZEROS * 2)}},
        grpc.StatusCode.INVALID_ARGUMENT,
        "one reading",
    ),
    "unknown input": (
        {"inputs": {"z": ("FP32", [1, 8], ZEROS)}},
        grpc.StatusCode.INVALID_ARGUMENT,
        "no input 'z'",
    ),
    "no inputs": ({"inputs": {}}, grpc.StatusCode.INVALID_ARGUMENT, "no inputs"),
    "reading missing": (
        {"inputs": {"h": ("FP32", [1, 64], bytes(256))}},
        grpc.StatusCode.INVALID_ARGUMENT,
        "'x' (the reading",
    ),
    "input twice": (
        {"inputs": {"x": ("FP32", [1, 8], ZEROS), "x#2": ("FP32", [1, 8], ZEROS)}},
        grpc.StatusCode.INVALID_ARGUMENT,
        "twice",
    ),
    "raw bytes too short": (
        {"inputs": {"x": ("FP32", [1, 8], bytes(31))}},
        grpc.StatusCode.INVALID_ARGUMENT,
        "31 bytes",
    ),
    "raw entries not one per input": (
        {"then": [lambda r: r.raw_input_contents.append(ZEROS)]},
        grpc.StatusCode.INVALID_ARGUMENT,
        "2 entries for 1 inputs",
    ),
    "raw and typed at once": (
        {"then": [lambda r: r.inputs[0].contents.fp32_contents.extend([0.0] * 8)]},
        grpc.StatusCode.INVALID_ARGUMENT,
        "both",
    ),
    "typed values of another type": (
        {"inputs": {"x": ("FP32", [1, 8], lambda t: t.contents.int_contents.extend([0] * 8))}},
        grpc.StatusCode.INVALID_ARGUMENT,
        "fp32_contents",
    ),
    "typed values too few": (
        {"inputs": {"x": ("FP32", [1, 8], lambda t: t.contents.fp32_contents.extend([0.0] * 7))}},
        grpc.StatusCode.INVALID_ARGUMENT,
        "7 values",
    ),
    "NaN in the reading": (
        {"inputs": {"x": ("FP32", [1, 8], np.full(8, np.nan, np.float32).tobytes())}},
        grpc.StatusCode.INVALID_ARGUMENT,
        "NaN",
    ),
    "state of the wrong shape": (
        {"inputs": {"x": ("FP32", [1, 8], ZEROS), "h": ("FP32", [1, 63], bytes(252))}},
        grpc.StatusCode.INVALID_ARGUMENT,
        "[1, 64]",
    ),
    "shared memory": (
        {
            "inputs": {
                "x": (
                    "FP32",
                    [1, 8],
                    lambda t: t.parameters["shared_memory_region"].MergeFrom(
                        tpb.InferParameter(string_param="r")
                    ),
                )
            }
        },
        grpc.StatusCode.INVALID_ARGUMENT,
        "shared memory",
    ),
    "unknown output": ({"outputs": ["nope"]}, grpc.StatusCode.INVALID_ARGUMENT, "no output 'nope'"),
    "no sequence id": ({"sequence": None}, grpc.StatusCode.INVALID_ARGUMENT, "sequence_id"),
    "sequence id zero": ({"sequence": 0}, grpc.StatusCode.INVALID_ARGUMENT, "sequence_id"),
    "negative sequence id": ({"sequence": -3}, grpc.StatusCode.INVALID_ARGUMENT, "negative"),
    "sequence id a double": ({"sequence": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, "double_param"),
    "sequence_start not a bool": (
        {"parameters": {"sequence_start": lambda p: setattr(p, "int64_param", 1)}},
        grpc.StatusCode.INVALID_ARGUMENT,
        "bool",
    ),
    "timeout not an integer": (
        {"parameters": {"timeout": lambda p: setattr(p, "string_param", "soon")}},
        grpc.StatusCode.INVALID_ARGUMENT,
        "microseconds",
    ),
    "id too long": (
        {"then": [lambda r: setattr(r, "id", "i" * 300)]},
        grpc.StatusCode.INVALID_ARGUMENT,
        "limit",
    ),
    "no model named": ({"model": ""}, grpc.StatusCode.INVALID_ARGUMENT, "names no model"),
    "unknown model": ({"model": "no-such-model"}, grpc.StatusCode.NOT_FOUND, "not served"),
    "unknown version": ({"version": "99"}, grpc.StatusCode.NOT_FOUND, "version '99'"),
    "another model's stream": (
        {"model": "lstm", "inputs": {"reading": ("FP32", [1, 8], ZEROS)}},
        grpc.StatusCode.FAILED_PRECONDITION,
        "gru",
    ),
}


@pytest.fixture(scope="module")
def primed(triton_client: triton.InferenceServerClient) -> str:
    for t, x in enumerate(readings(2, seed=22)):
        triton_client.infer("gru", [reading_input("gru", x)], sequence_id="primed", sequence_start=t == 0)
    return "primed"


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_each_malformed_request_gets_its_code_and_changes_nothing(
    case: str, primed: str, stub: tpb_grpc.GRPCInferenceServiceStub, client: Client
) -> None:
    change, code, words = REFUSALS[case]
    before = client.get_state(primed)
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(_request(**change), timeout=10)
    assert refused.value.code() == code, refused.value.details()
    assert words in (refused.value.details() or ""), refused.value.details()
    after = client.get_state(primed)
    assert (after.model, after.step) == (before.model, before.step) == ("gru", 2)
    np.testing.assert_array_equal(after.state["h"], before.state["h"])


def test_bytes_that_are_no_request_get_an_in_band_error_and_the_stream_goes_on(
    server: RunningServer,
) -> None:
    good = _request(sequence=new_sequence()).SerializeToString()
    with grpc.insecure_channel(server.address) as channel:
        call = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        replies = [
            tpb.ModelStreamInferResponse.FromString(r) for r in call(iter([b"\xff\xff", good]), timeout=10)
        ]
    assert "[INVALID_ARGUMENT]" in replies[0].error_message
    assert "not a valid inference.ModelInferRequest" in replies[0].error_message
    assert (
        not replies[1].error_message
        and replies[1].infer_response.parameters["sequence_step"].uint64_param == 1
    )


def test_a_timeout_that_passes_before_the_run_applies_nothing(
    primed: str, triton_client: triton.InferenceServerClient, client: Client
) -> None:
    before = client.get_state(primed)
    with pytest.raises(InferenceServerException) as refused:
        triton_client.infer(
            "gru", [reading_input("gru", readings(1, seed=27)[0])], sequence_id=primed, timeout=1
        )
    assert refused.value.status() == "StatusCode.DEADLINE_EXCEEDED", refused.value.message()
    assert client.get_state(primed).step == before.step


def test_unserved_rpcs_answer_unimplemented_with_what_to_use_instead(
    triton_client: triton.InferenceServerClient,
) -> None:
    for call, words in (
        (lambda: triton_client.load_model("gru"), "--models"),
        (lambda: triton_client.unload_model("gru"), "--models"),
        (triton_client.get_system_shared_memory_status, "raw_input_contents"),
        (lambda: triton_client.register_cuda_shared_memory("r", b"", 0, 4), "raw_input_contents"),
        (triton_client.get_trace_settings, "--otlp-endpoint"),
        (triton_client.get_log_settings, "--log-level"),
    ):
        with pytest.raises(InferenceServerException) as refused:
            call()
        assert refused.value.status() == "StatusCode.UNIMPLEMENTED"
        assert words in refused.value.message(), refused.value.message()


# --- statistics, metrics, reflection ------------------------------------------------------------


def test_statistics_grow_with_traffic(triton_client: triton.InferenceServerClient) -> None:
    def gru2() -> Any:
        (stats,) = triton_client.get_inference_statistics("gru2").model_stats
        return stats

    before = gru2()
    sequence = new_sequence()
    for x in readings(3, seed=23):
        triton_client.infer("gru2", [reading_input("gru2", x)], sequence_id=sequence)
    with pytest.raises(InferenceServerException):
        triton_client.infer("gru2", [reading_input("lstm", readings(1, seed=24)[0])], sequence_id=sequence)
    after = gru2()
    assert after.inference_count == before.inference_count + 3
    assert after.inference_stats.success.count == before.inference_stats.success.count + 3
    assert after.inference_stats.success.ns > before.inference_stats.success.ns
    assert after.inference_stats.fail.count == before.inference_stats.fail.count + 1
    for part in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert getattr(after.inference_stats, part).count == getattr(before.inference_stats, part).count + 3
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    assert before.execution_count < after.execution_count <= before.execution_count + 3
    assert after.last_inference >= before.last_inference > 0
    assert {s.name for s in triton_client.get_inference_statistics().model_stats} >= set(MODEL_TENSORS)


def test_v2_calls_are_timed_in_the_request_metrics_by_rpc(
    server: RunningServer, triton_client: triton.InferenceServerClient
) -> None:
    triton_client.infer("gru", [reading_input("gru", readings(1, seed=25)[0])], sequence_id=new_sequence())
    with urllib.request.urlopen(f"http://{server.metrics_address}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert 'cellstream_request_duration_seconds_count{code="OK",method="ModelInfer",model="gru"}' in text
    assert 'method="ModelMetadata"' in text and 'method="ServerLive"' in text


def test_reflection_describes_every_service_it_lists(server: RunningServer) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: PLC0415

    symbols = ("inference.GRPCInferenceService", "cellstream.v1.CellStream", "grpc.health.v1.Health")
    asked = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol) for symbol in symbols]
    with grpc.insecure_channel(server.address) as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        listed, *described = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services=""), *asked]), timeout=10
        )
    names = {service.name for service in listed.list_services_response.service}
    assert set(symbols) <= names
    files = [len(reply.file_descriptor_response.file_descriptor_proto) for reply in described]
    assert files == [2, 1, 1]  # grpc_service.proto comes with the model_config.proto it imports


# --- tokens -------------------------------------------------------------------------------------


def test_a_bearer_token_in_headers_works_and_none_is_unauthenticated(tmp_path: Path) -> None:
    token = secrets.token_urlsafe(16)
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"tenants": {"acme": {"tokens": [token_line(token)], "models": ["gru"]}}}))
    running = start_server(tmp_path, "--auth-file", str(auth))
    headers = {"authorization": f"Bearer {token}"}
    x = readings(1, seed=26)
    expected, states = reference_sequence(MODELS / "gru", x)
    with triton.InferenceServerClient(running.address) as tokened:
        result = tokened.infer("gru", [reading_input("gru", x[0])], sequence_id=5, headers=headers)
        assert_matches(result, "gru", expected[0], states[0])
        assert tokened.get_model_metadata("gru", headers=headers).name == "gru"
        for call, code in (
            (lambda: tokened.infer("gru", [reading_input("gru", x[0])], sequence_id=5), "UNAUTHENTICATED"),
            (tokened.is_server_live, "UNAUTHENTICATED"),
            (lambda: tokened.get_model_metadata("lstm", headers=headers), "PERMISSION_DENIED"),
        ):
            with pytest.raises(InferenceServerException) as refused:
                call()
            assert refused.value.status() == f"StatusCode.{code}", refused.value.message()
        replies: queue.Queue[tuple[Any, Any]] = queue.Queue()
        tokened.start_stream(callback=lambda result, error: replies.put((result, error)))
        with contextlib.suppress(InferenceServerException):  # (the call may be refused already)
            tokened.async_stream_infer("gru", [reading_input("gru", x[0])], sequence_id=6)
        _, error = replies.get(timeout=10)
        tokened.stop_stream()
        assert error is not None and "StatusCode.UNAUTHENTICATED" in str(error.status())
        tokened.start_stream(callback=lambda result, error: replies.put((result, error)), headers=headers)
        tokened.async_stream_infer("gru", [reading_input("gru", x[0])], sequence_id=7)
        result, error = replies.get(timeout=10)
        tokened.stop_stream()
        assert error is None
        assert_matches(result, "gru", expected[0], states[0])
    assert running.stop() == 0, running.log()
