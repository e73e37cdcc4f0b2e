"""The client a Python user holds: one exception type, shapes checked before sending, easy StepStream.

Every failed Client, AsyncClient or Stepper call raises a CellStreamError: a subclass per gRPC
status, the server's message, the stream's step where the server gave it, and still a
grpc.RpcError. Numbers are checked against the ONNX sequence-operator reference.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import threading
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import cellstream.client
from cellstream._proto.cellstream.v1 import cellstream_pb2_grpc as pb_grpc
from cellstream.client import (
    AsyncClient,
    Cancelled,
    CellStreamError,
    Client,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResumeError,
    StepError,
    Stepper,
    StepReply,
    Unavailable,
    batch_request,
    step_request,
)
from reference import reference_sequence
from support import MODELS, RunningServer

X = np.random.default_rng(11).normal(size=(6, 8)).astype(np.float32)
TOLERANCE = 1e-5


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def calls(server: RunningServer, method: str) -> float:
    """How many `method` calls the server has answered (its request histogram's count)."""
    url = f"http://{server.metrics_address}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("cellstream_request_duration_seconds_count{") and f'method="{method}"' in line
    )


def nothing_listens() -> str:
    """An address on 127.0.0.1 where no server listens (a port just freed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def raised(call: Callable[..., Any], *args: Any, **kwargs: Any) -> CellStreamError:
    with pytest.raises(CellStreamError) as info:
        call(*args, **kwargs)
    return info.value


def assert_plain(error: CellStreamError) -> None:
    """What a caller catches is the client's own type, with no grpc internals attached."""
    assert type(error).__module__ == "cellstream.client.errors", type(error)
    assert isinstance(error, grpc.RpcError)
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    assert str(error) == error.message == error.details()
    assert error.code() == type(error).status


# --- The type -----------------------------------------------------------------------------------


def test_every_status_code_has_its_own_subclass_exported_by_the_client() -> None:
    codes = [code for code in grpc.StatusCode if code != grpc.StatusCode.OK]
    classes = {code: cellstream.client.errors.ERRORS[code] for code in codes}
    assert len(set(classes.values())) == len(codes)
    for code, cls in classes.items():
        assert cls.__name__ == code.name.title().replace("_", "")  # NOT_FOUND -> NotFound
        assert getattr(cellstream.client, cls.__name__) is cls
        assert issubclass(cls, CellStreamError) and issubclass(cls, grpc.RpcError)
        error = cellstream.client.errors.error_for(code, "what happened", step=4)
        assert type(error) is cls and error.code() == code and error.step == 4
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is cls and back.message == "what happened" and back.step == 4
    assert StepError is CellStreamError
    assert issubclass(ResumeError, FailedPrecondition)


def test_a_refused_call_raises_its_status_subclass_with_the_servers_message(client: Client) -> None:
    ghost = unique("ghost")
    error = raised(client.get_state, ghost)
    assert isinstance(error, NotFound) and error.code() == grpc.StatusCode.NOT_FOUND
    assert "does not exist" in error.message and ghost in error.message
    assert error.step is None
    assert_plain(error)


def test_a_stale_seq_carries_the_streams_current_step(client: Client) -> None:
    stream_id = unique("stale")
    client.step(stream_id, X[0], seq=1)
    client.step(stream_id, X[1], seq=2)
    error = raised(client.step, stream_id, X[2], seq=5)
    assert isinstance(error, FailedPrecondition) and error.step == 2
    assert "at step 2" in error.message
    assert ("cellstream-step", "2") in list(error.trailing_metadata())
    assert_plain(error)
    assert client.get_state(stream_id).step == 2


def test_code_written_for_plain_grpc_errors_keeps_working(client: Client) -> None:
    try:
        client.get_state(unique("ghost"))
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND and "does not exist" in (exc.details() or "")
    else:
        raise AssertionError("no error")


def test_every_client_method_raises_a_cellstream_error(server: RunningServer, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.csnap"
    garbage.write_bytes(b"not a snapshot at all")
    with server.client() as client:
        lstm = unique("lstm")
        client.step(lstm, X[0], model="lstm")
        failures: dict[str, tuple[Callable[[], object], type[CellStreamError]]] = {
            "step": (lambda: client.step("bad\nid", X[0]), InvalidArgument),
            "step_batch": (lambda: client.step_batch([lstm], X[:1], model="gru"), InvalidArgument),
            "get_state": (lambda: client.get_state(unique("ghost")), NotFound),
            "set_state": (lambda: client.set_state(lstm, {"hidden": np.zeros(5)}), InvalidArgument),
            "delete": (lambda: client.delete(""), InvalidArgument),
            "export_states": (lambda: client.export_states(tmp_path / "out.csnap", ["nope"]), NotFound),
            "import_states": (lambda: client.import_states(garbage), InvalidArgument),
            "health": (lambda: client.health("no.such.Service"), NotFound),
        }
        for method, (call, expected) in failures.items():
            error = raised(call)
            assert isinstance(error, expected), (method, error)
            assert error.message, method
            assert_plain(error)


def test_an_unreachable_server_is_unavailable_for_every_client() -> None:
    address = nothing_listens()
    with Client(address, timeout=10) as client:
        assert_plain(error := raised(client.list_models))
        assert isinstance(error, Unavailable)

    async def from_async() -> BaseException:
        async with AsyncClient(address, timeout=10) as aclient:
            with pytest.raises(CellStreamError) as info:
                await aclient.get_state("anything")
            return info.value

    assert isinstance(asyncio.run(from_async()), Unavailable)


def test_a_deadline_that_passes_is_deadline_exceeded(server: RunningServer) -> None:
    release = threading.Event()

    def slow() -> Iterator[tuple[str, np.ndarray]]:
        yield unique("slow"), X[0]
        release.wait(20)  # holds the call open past its deadline

    with Client(server.address, timeout=0.5) as client:
        replies: list[StepReply] = []
        try:
            with pytest.raises(DeadlineExceeded) as info:
                replies.extend(client.step_stream(slow()))
        finally:
            release.set()
    assert [r.step for r in replies] == [1]
    assert_plain(info.value)


def test_the_async_client_raises_the_same_errors(server: RunningServer) -> None:
    stream_id = unique("async-stale")

    async def main() -> list[CellStreamError]:
        found = []
        async with AsyncClient(server.address) as client:
            await client.step(stream_id, X[0], seq=1)
            for call in (
                lambda: client.step(stream_id, X[1], seq=3),
                lambda: client.get_state(unique("ghost")),
                lambda: client.step_batch([stream_id], X[:1, :5]),
                lambda: client.delete(""),
            ):
                with pytest.raises(CellStreamError) as info:
                    await call()
                found.append(info.value)
        return found

    stale, ghost, narrow, bad_id = asyncio.run(main())
    assert isinstance(stale, FailedPrecondition) and stale.step == 1 and "at step 1" in stale.message
    assert isinstance(ghost, NotFound) and isinstance(bad_id, InvalidArgument)
    assert isinstance(narrow, InvalidArgument) and "shape (1, 5)" in narrow.message
    for error in (stale, ghost, narrow, bad_id):
        assert_plain(error)
        assert isinstance(error, grpc.aio.AioRpcError)  # what asyncio gRPC code catches


def test_stepper_errors_are_cellstream_errors(server: RunningServer) -> None:
    owned = unique("stepper-lstm")

    async def main() -> list[BaseException]:
        async with AsyncClient(server.address) as client:
            await client.step(owned, X[0], model="lstm")
            async with Stepper(client, model="gru") as stepper:
                results = await asyncio.gather(
                    stepper.step(owned, X[1]),  # refused by the server: bound to lstm
                    stepper.step(unique("stepper"), X[1][:5]),  # refused here: 5 values
                    stepper.step(unique("stepper"), X[:2]),  # refused here: two readings
                    return_exceptions=True,
                )
            async with Stepper(client, model="nope") as missing:
                with pytest.raises(CellStreamError) as info:
                    await missing.step(unique("stepper"), X[0])
        async with Stepper(nothing_listens()) as unreachable:
            with pytest.raises(CellStreamError) as down:
                await unreachable.step(unique("stepper"), X[0])
        return [*results, info.value, down.value]

    bound, short, two, missing, down = asyncio.run(main())
    assert isinstance(bound, InvalidArgument) and "lstm" in bound.message
    assert isinstance(short, InvalidArgument) and "5 values" in short.message
    assert isinstance(two, InvalidArgument) and "shape (2, 8)" in two.message
    assert isinstance(missing, NotFound) and "'nope'" in missing.message
    assert isinstance(down, Unavailable)
    for error in (bound, short, two, missing, down):
        assert isinstance(error, CellStreamError)
        assert_plain(error)


def test_a_call_on_a_closed_client_or_stepper_is_cancelled(server: RunningServer) -> None:
    client = server.client()
    client.close()
    for call in (
        lambda: client.get_state("anything"),
        lambda: list(client.step_stream([("anything", X[0])])),
    ):
        error = raised(call)
        assert isinstance(error, Cancelled) and "is closed" in error.message
        assert_plain(error)

    async def main() -> list[BaseException]:
        found = []
        aclient = AsyncClient(server.address)
        stepper = Stepper(aclient)
        await stepper.close()
        await aclient.close()
        for call in (
            lambda: aclient.get_state("anything"),
            lambda: stepper.step("anything", X[0]),
        ):
            with pytest.raises(CellStreamError) as info:
                await call()
            found.append(info.value)
        with pytest.raises(CellStreamError) as info:
            [r async for r in aclient.step_stream([("anything", X[0])])]
        return [*found, info.value]

    for error in asyncio.run(main()):
        assert isinstance(error, Cancelled) and "is closed" in str(error)


def test_a_resuming_client_that_cannot_replay_raises_resume_error_with_the_servers_step(
    server: RunningServer, client: Client
) -> None:
    stream_id = unique("resume")
    with server.client(resume=True, resume_window=1) as resuming:
        for reading in X[:3]:
            resuming.step(stream_id, reading)
        client.set_state(stream_id, {"h": np.zeros(64)}, step=1)  # the server "lost" steps 2 and 3
        error = raised(resuming.step, stream_id, X[3])
    assert isinstance(error, ResumeError) and isinstance(error, FailedPrecondition)
    assert error.step == 1 and "readings 2..3 are no longer kept" in error.message
    assert_plain(error)


# --- Shapes checked before sending --------------------------------------------------------------


def test_step_batch_of_the_wrong_width_is_refused_before_any_call_naming_the_shapes(
    server: RunningServer,
) -> None:
    ids = [unique("wide") for _ in range(6)]
    with server.client() as client:
        client.list_models()
        sent = calls(server, "StepBatch")
        cases = {
            "width": (ids, X[:, :7], ["shape (6, 7)", "takes 8 values per reading", "expected shape (6, 8)"]),
            "rows": (ids, X[:5], ["5 rows", "for 6 stream ids", "expected shape (6, 8)"]),
            "flat": (ids, X.ravel(), ["shape (48,)", "expected shape (6, 8)"]),
        }
        for case, (stream_ids, inputs, words) in cases.items():
            error = raised(client.step_batch, stream_ids, inputs)
            assert isinstance(error, InvalidArgument), case
            for word in words:
                assert word in error.message, (case, error.message)
        named = raised(client.step_batch, ids[:2], X[:2, :3], model="lstm")
        assert "model 'lstm' takes 8 values per reading" in named.message
        assert calls(server, "StepBatch") == sent
        for stream_id in ids:
            assert isinstance(raised(client.get_state, stream_id), NotFound)


def test_a_2d_reading_given_to_step_is_refused_before_any_call_naming_the_shapes(
    server: RunningServer,
) -> None:
    stream_id = unique("two-d")
    with server.client() as client:
        sent = calls(server, "Step")
        error = raised(client.step, stream_id, X[:3], model="gru")
        assert isinstance(error, InvalidArgument)
        assert "shape (3, 8)" in error.message and "shape (8,) for model 'gru'" in error.message
        column = raised(client.step, stream_id, X[0][:, None])
        assert "shape (8, 1)" in column.message
        assert calls(server, "Step") == sent
        assert isinstance(raised(client.get_state, stream_id), NotFound)
        assert client.step(stream_id, X[0]).step == 1  # a vector, or a plain list, is one reading
        assert client.step(stream_id, X[1].tolist()).step == 2


def test_the_input_size_is_asked_of_list_models_once_and_again_only_before_a_refusal(
    server: RunningServer,
) -> None:
    ids = [unique("sizes") for _ in range(3)]
    with server.client() as client:
        asked = calls(server, "ListModels")
        steps = [client.step_batch(ids, X[:3]).steps.tolist() for _ in range(3)]
        client.step_batch([unique("sizes-lstm")], X[:1], model="lstm")
        assert calls(server, "ListModels") == asked + 1
        assert steps == [[1, 1, 1], [2, 2, 2], [3, 3, 3]]
        raised(client.step_batch, ids, X[:3, :7])
        assert calls(server, "ListModels") == asked + 2  # asked again in case the model was reloaded


def test_concurrent_first_batches_of_an_async_client_share_one_list_models(server: RunningServer) -> None:
    prefix = unique("async-sizes")

    async def main() -> list[list[int]]:
        async with AsyncClient(server.address) as client:
            replies = await asyncio.gather(
                *(client.step_batch([f"{prefix}-{k}"], X[k : k + 1]) for k in range(6))
            )
        return [reply.steps.tolist() for reply in replies]

    asked = calls(server, "ListModels")
    assert asyncio.run(main()) == [[1]] * 6
    assert calls(server, "ListModels") == asked + 1


def test_a_model_the_server_does_not_list_is_left_to_the_server_to_refuse(client: Client) -> None:
    error = raised(client.step_batch, [unique("nope")], X[:1, :3], model="nope")
    assert isinstance(error, NotFound) and "'nope'" in error.message


def test_the_server_still_refuses_inputs_of_the_wrong_byte_count(server: RunningServer) -> None:
    # What a client that checks nothing sends: the server's own check answers it.
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.CellStreamStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.StepBatch(batch_request([unique("raw"), unique("raw")], X[:2, :7]), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "bytes" in (info.value.details() or "")


# --- StepStream items ---------------------------------------------------------------------------


def test_step_stream_takes_requests_pairs_and_dicts_alike(client: Client) -> None:
    stream_id = unique("items")
    items = [
        (stream_id, X[0]),
        {"stream_id": stream_id, "input": X[1], "seq": 2, "request_id": 7},
        step_request(stream_id, X[2], seq=3),
        [stream_id, X[3].tolist()],
        {"stream_id": stream_id, "input": X[4], "omit_state": True, "model": "gru"},
    ]
    replies = [reply.raise_for_error() for reply in client.step_stream(items)]
    assert [r.step for r in replies] == [1, 2, 3, 4, 5]
    assert replies[1].request_id == 7 and replies[4].state == {} and "h" in replies[3].state
    expected, states = reference_sequence(MODELS / "gru", X[:5])
    np.testing.assert_allclose(np.array([r.output for r in replies]), expected, atol=TOLERANCE)
    np.testing.assert_allclose(replies[3].state["h"], states[3]["h"], atol=TOLERANCE)


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ({"stream_id": "x"}, "step_stream item 2: a dict needs 'stream_id' and 'input'"),
        ({"stream_id": "x", "input": X[0], "sequence": 1}, "unknown ['sequence']"),
        (("x", X[:2]), "step_stream item 2: reading has shape (2, 8)"),
        (("x", ["a", "b"]), "step_stream item 2: reading is not an array of numbers"),
        (5, "step_stream item 2 is a int"),
    ],
)
def test_a_bad_step_stream_item_ends_the_requests_after_the_replies_before_it(
    client: Client, bad: object, words: str
) -> None:
    stream_id = unique("bad-item")
    items = [(stream_id, X[0]), (stream_id, X[1]), bad, (stream_id, X[2])]
    replies: list[StepReply] = []
    with pytest.raises(InvalidArgument) as info:
        replies.extend(client.step_stream(items))  # type: ignore[arg-type]
    assert words in info.value.message
    assert [r.step for r in replies] == [1, 2]
    assert client.get_state(stream_id).step == 2  # the item after the bad one was never sent


def test_an_exception_of_the_callers_iterator_reaches_the_caller_after_the_replies(client: Client) -> None:
    stream_id = unique("raising")

    def readings() -> Iterator[tuple[str, np.ndarray]]:
        yield stream_id, X[0]
        yield stream_id, X[1]
        raise LookupError("the sensor feed broke")

    replies: list[StepReply] = []
    with pytest.raises(LookupError, match="the sensor feed broke"):
        replies.extend(client.step_stream(readings()))
    assert [r.step for r in replies] == [1, 2]


def test_an_in_band_error_stays_a_code_and_message_and_can_be_raised(client: Client) -> None:
    stream_id = unique("in-band")
    good, short = client.step_stream([(stream_id, X[0]), (stream_id, X[1][:7])])
    assert good.raise_for_error() is good and good.error is None
    assert short.error is not None
    code, message = short.error
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "7 values" in message
    with pytest.raises(InvalidArgument) as info:
        short.raise_for_error()
    assert info.value.message == message


def test_async_step_stream_takes_pairs_and_dicts_from_an_async_iterator(server: RunningServer) -> None:
    stream_id = unique("async-items")

    async def items() -> AsyncIterator[object]:
        for i, reading in enumerate(X[:4]):
            yield (stream_id, reading) if i % 2 else {"stream_id": stream_id, "input": reading, "seq": i + 1}
        yield {"stream_id": stream_id}  # bad: ends the requests

    async def main() -> tuple[list[StepReply], BaseException]:
        replies: list[StepReply] = []
        async with AsyncClient(server.address) as client:
            try:
                async for reply in client.step_stream(items()):  # type: ignore[arg-type]
                    replies.append(reply.raise_for_error())
            except CellStreamError as exc:
                return replies, exc
        raise AssertionError("the bad item was not refused")

    replies, error = asyncio.run(main())
    assert isinstance(error, InvalidArgument) and "step_stream item 4" in str(error)
    assert [r.step for r in replies] == [1, 2, 3, 4]
    expected, _ = reference_sequence(MODELS / "gru", X[:4])
    np.testing.assert_allclose(np.array([r.output for r in replies]), expected, atol=TOLERANCE)
