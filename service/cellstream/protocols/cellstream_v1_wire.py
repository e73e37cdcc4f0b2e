"""cellstream.v1 wire format: StepResponse and StepBatchResponse bytes written directly, for the
hot paths, and the metadata keys both sides of the protocol use.

Building a StepResponse message (a Tensor per state, floats converted one by one from Python
lists) and serializing it was the largest piece of cellstream's own work per reading. For a model
every reply has the same layout except the stream id, the float bytes and a few integers, so the
fixed parts are made once per model and a reply is a join of a few byte strings. The result is
ordinary protobuf wire format: any client parses it with the generated classes, and
tests/test_wire.py checks it against `SerializeToString` field for field. A 10,000-stream
StepBatchResponse is about 3x cheaper this way than as a message (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # (the client imports this module too, without the server's dependencies)
    from cellstream.engine import ReplyLayout, StepResult

# Trailing metadata of a FAILED_PRECONDITION for a stale seq: the stream's step, for clients that resume.
STEP_METADATA = "cellstream-step"

_ONE_BYTE = [bytes([n]) for n in range(0x80)]

# Field keys (field number << 3 | wire type) of cellstream.v1.StepResponse and its map entries.
_STREAM_ID = b"\x0a"  # 1, length-delimited
_OUTPUT = b"\x12"  # 2, packed floats
_STATE = b"\x1a"  # 3, map<string, Tensor> entry
_STEP = b"\x20"  # 4, varint
_REQUEST_ID = b"\x30"  # 6, varint
_REPLAYED_TRUE = b"\x38\x01"  # 7, bool
_ENTRY_KEY = b"\x0a"  # map entry: 1 = key
_ENTRY_VALUE = b"\x12"  # map entry: 2 = value
_TENSOR_SHAPE = b"\x0a"  # Tensor: 1 = packed int64 shape
_TENSOR_DATA = b"\x12"  # Tensor: 2 = packed float data
_BATCH_OUTPUTS = b"\x0a"  # StepBatchResponse: 1 = bytes
_BATCH_STATE = b"\x12"  # StepBatchResponse: 2 = map<string, bytes> entry
_BATCH_STEPS = b"\x1a"  # StepBatchResponse: 3 = packed uint64


def varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative integer below 2**64."""
    if value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _delimited(key: bytes, payload: bytes) -> bytes:
    return key + varint(len(payload)) + payload


class ReplyEncoder:
    """Encodes the StepResponses of one model layout (output size, state names and shapes)."""

    def __init__(self, output_size: int, states: Sequence[tuple[str, Sequence[int]]]) -> None:
        self.output_bytes = 4 * output_size
        self._output_head = _OUTPUT + varint(self.output_bytes) if output_size else b""
        self.state_bytes: list[int] = []
        self._state_heads: list[bytes] = []  # everything of a state's map entry before its floats
        for name, shape in states:
            size = 1
            for dim in shape:
                size *= int(dim)
            data = 4 * size
            shape_field = _delimited(_TENSOR_SHAPE, b"".join(varint(int(d)) for d in shape)) if shape else b""
            tensor_head = shape_field + (_TENSOR_DATA + varint(data) if data else b"")
            tensor_len = len(tensor_head) + data
            key = _delimited(_ENTRY_KEY, name.encode())
            entry_head = key + _ENTRY_VALUE + varint(tensor_len) + tensor_head
            entry_len = len(entry_head) + data
            self._state_heads.append(_STATE + varint(entry_len) + entry_head)
            self.state_bytes.append(data)

    def encode(
        self,
        stream_id: str,
        output: bytes,
        states: Sequence[bytes] | None,
        step: int,
        *,
        request_id: int,
        replayed: bool = False,
    ) -> bytes:
        """One StepResponse; `output` and each of `states` are the row's little-endian float32 bytes."""
        parts: list[bytes] = []
        if stream_id:
            encoded_id = stream_id.encode()
            parts += (_STREAM_ID, varint(len(encoded_id)), encoded_id)
        if self.output_bytes:
            parts += (self._output_head, output)
        if states is not None:
            for head, data in zip(self._state_heads, states, strict=True):
                parts += (head, data)
        if step:
            parts += (_STEP, varint(step))
        if request_id:
            parts += (_REQUEST_ID, varint(request_id))
        if replayed:
            parts.append(_REPLAYED_TRUE)
        return b"".join(parts)


class StepReplies:
    """Encodes the StepResponse of each reading, with one encoder per model layout. A run's
    outputs and states are turned into bytes once, on the first reply of that run (kept in the
    run's memo): slicing a row out of them is cheaper than converting each row on its own."""

    def __init__(self) -> None:
        self._encoders: dict[ReplyLayout, ReplyEncoder] = {}

    def encode(self, result: StepResult, request_id: int, stream_id: str) -> bytes:
        """The reply to one reading; `stream_id` as its client sent it (the result's is the
        server's key, which carries the tenant)."""
        run = result.run
        encoder = self._encoders.get(run.layout)
        if encoder is None:
            encoder = self._encoders[run.layout] = ReplyEncoder(run.layout.output_size, run.layout.states)
        encoded = run.memo
        if encoded is None:
            encoded = run.memo = (
                run.outputs.astype("<f4", copy=False).tobytes(),
                [value.astype("<f4", copy=False).tobytes() for value in run.states],
            )
        outputs, states = encoded
        i = result.index
        size = encoder.output_bytes
        return encoder.encode(
            stream_id,
            outputs[i * size : (i + 1) * size],
            [data[i * n : (i + 1) * n] for data, n in zip(states, encoder.state_bytes, strict=True)]
            if result.want_state
            else None,
            result.step,
            request_id=request_id,
            replayed=result.replayed,
        )


def varints(values: np.ndarray) -> bytes:
    """The packed varints of non-negative integers (a `repeated uint64` field's payload), built
    with a few array operations instead of one Python int per value."""
    n = len(values)
    if not n:
        return b""
    values = values.astype(np.uint64, copy=False)
    width = max(1, (int(values.max()).bit_length() + 6) // 7)  # bytes of the largest value
    if width == 1:
        return values.astype(np.uint8).tobytes()
    lengths = np.ones(n, np.int64)
    for k in range(1, width):
        lengths += values >= np.uint64(1 << (7 * k))
    groups = np.empty((n, width), np.uint8)
    for k in range(width):
        groups[:, k] = (values >> np.uint64(7 * k)) & np.uint64(0x7F)
        groups[:, k] |= (lengths > k + 1).astype(np.uint8) << 7  # continuation bit
    return groups[np.arange(width) < lengths[:, None]].tobytes()


def _raw(values: np.ndarray) -> memoryview:
    """The array's little-endian float32 bytes, without a copy when they are laid out already
    (a 10,000-stream state is 2.5 MB: join copies it once, straight into the reply)."""
    return np.ascontiguousarray(values, "<f4").reshape(-1).view(np.uint8).data


def batch_reply(outputs: np.ndarray, states: Mapping[str, np.ndarray] | None, steps: np.ndarray) -> bytes:
    """A StepBatchResponse: the arrays' bytes are copied once, into the reply, instead of into a
    message and again when it is serialized."""
    parts: list[bytes | memoryview] = []
    output_bytes = _raw(outputs)
    if output_bytes.nbytes:
        parts += (_BATCH_OUTPUTS, varint(output_bytes.nbytes), output_bytes)
    for name, value in (states or {}).items():
        data = _raw(value)
        key = _delimited(_ENTRY_KEY, name.encode())
        value_head = (_ENTRY_VALUE + varint(data.nbytes)) if data.nbytes else b""
        parts += (_BATCH_STATE, varint(len(key) + len(value_head) + data.nbytes), key, value_head, data)
    step_bytes = varints(steps)
    if step_bytes:
        parts += (_BATCH_STEPS, varint(len(step_bytes)), step_bytes)
    return b"".join(parts)
