"""The hand-written StepResponse bytes are what the generated classes make and read."""

from __future__ import annotations

import numpy as np
import pytest

from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb
from cellstream.protocols.cellstream_v1_wire import ReplyEncoder, batch_reply, varint, varints

LAYOUTS = {
    "gru": (1, [("h", (64,))]),
    "lstm": (3, [("h", (16,)), ("c", (16,))]),
    "stacked": (2, [("h", (2, 1, 32))]),
    "scalar-state": (1, [("s", ())]),
    "wide-output": (300, [("hidden", (200,))]),
}


def reference(
    layout: tuple[int, list[tuple[str, tuple[int, ...]]]],
    stream_id: str,
    output: np.ndarray,
    states: list[np.ndarray] | None,
    step: int,
    request_id: int,
    replayed: bool,
) -> pb.StepResponse:
    reply = pb.StepResponse(
        stream_id=stream_id, output=output.tolist(), step=step, request_id=request_id, replayed=replayed
    )
    if states is not None:
        for (name, shape), value in zip(layout[1], states, strict=True):
            reply.state[name].shape.extend(shape)
            reply.state[name].data.extend(value.ravel().tolist())
    return reply


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize(
    ("stream_id", "step", "request_id", "replayed", "with_state"),
    [
        ("sensor-1", 1, 0, False, True),
        ("", 0, 0, False, True),
        ("ticker/€/日本", 127, 128, True, True),
        ("x" * 256, 2**64 - 1, 2**63 + 5, False, False),
        ("s", 16_384, 300, False, False),
    ],
)
def test_encoded_reply_parses_to_the_message_the_generated_code_builds(
    name: str, stream_id: str, step: int, request_id: int, replayed: bool, with_state: bool
) -> None:
    layout = LAYOUTS[name]
    rng = np.random.default_rng(len(stream_id) + step % 1000)
    output = rng.standard_normal(layout[0]).astype(np.float32)
    states = [rng.standard_normal(shape).astype(np.float32) for _, shape in layout[1]]
    encoder = ReplyEncoder(*layout)
    data = encoder.encode(
        stream_id,
        output.tobytes(),
        [s.tobytes() for s in states] if with_state else None,
        step,
        request_id=request_id,
        replayed=replayed,
    )
    given = states if with_state else None
    expected = reference(layout, stream_id, output, given, step, request_id, replayed)
    parsed = pb.StepResponse.FromString(data)
    assert parsed == expected
    assert pb.StepResponse.FromString(expected.SerializeToString()) == parsed
    if len(layout[1]) == 1 or not with_state:  # one map entry: the canonical bytes are unique
        assert data == expected.SerializeToString(deterministic=True)


def test_varint_matches_protobuf_for_edge_values() -> None:
    for value in [0, 1, 127, 128, 255, 300, 16_383, 16_384, 2**32, 2**63, 2**64 - 1]:
        encoded = pb.StepResponse(step=value).SerializeToString()
        assert encoded == (b"\x20" + varint(value) if value else b"")


@pytest.mark.parametrize(
    "steps",
    [
        [1, 2, 3],
        [0, 127, 128, 300, 16_383, 16_384, 2**21, 2**35, 2**63, 2**64 - 1],
        list(range(0, 20_000, 7)),
        [],
    ],
)
@pytest.mark.parametrize("states", [None, {"h": (3,)}, {"h": (2, 4), "c": (2, 4)}])
def test_batch_reply_parses_to_the_message_the_generated_code_builds(
    steps: list[int], states: dict[str, tuple[int, ...]] | None
) -> None:
    n = len(steps)
    rng = np.random.default_rng(n)
    outputs = rng.standard_normal((n, 2)).astype(np.float32)
    values = None
    if states is not None:
        values = {k: rng.standard_normal((n, *shape)).astype(np.float32) for k, shape in states.items()}
    data = batch_reply(outputs, values, np.array(steps, np.uint64))
    expected = pb.StepBatchResponse(
        outputs=outputs.tobytes(),
        states={} if values is None else {k: v.tobytes() for k, v in values.items()},
        steps=steps,
    )
    assert pb.StepBatchResponse.FromString(data) == expected
    packed = varints(np.array(steps, np.uint64))
    assert pb.StepBatchResponse.FromString(b"\x1a" + varint(len(packed)) + packed).steps == steps
