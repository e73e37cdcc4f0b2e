"""KServe v2 reply bytes: ModelInferResponse and ModelStreamInferResponse written directly.

As for cellstream.v1 (cellstream_v1_wire), a model's replies differ only in the request id, the
step and the float bytes, so the fixed part (model name and version, each output's name, type and
shape) is made once per model version and output selection, and a reply is a join of a few byte
strings. It is ordinary protobuf wire format; tests/test_kserve_v2.py reads it with tritonclient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cellstream.protocols.cellstream_v1_wire import varint
from cellstream.protocols.kserve_v2_request import FP32, Signature

if TYPE_CHECKING:
    from cellstream.engine import StepResult

# Field keys (field number << 3 | wire type) of inference.ModelInferResponse and its parts.
_MODEL_NAME = b"\x0a"  # 1, string
_MODEL_VERSION = b"\x12"  # 2, string
_ID = b"\x1a"  # 3, string
_PARAMETER = b"\x22"  # 4, map<string, InferParameter> entry
_OUTPUT = b"\x2a"  # 5, InferOutputTensor
_RAW_OUTPUT = b"\x32"  # 6, bytes
_TENSOR_NAME = b"\x0a"  # InferOutputTensor: 1, string
_TENSOR_DATATYPE = b"\x12"  # InferOutputTensor: 2, string
_TENSOR_SHAPE = b"\x1a"  # InferOutputTensor: 3, packed int64
_ENTRY_KEY = b"\x0a"  # map entry: 1 = key
_ENTRY_VALUE = b"\x12"  # map entry: 2 = value
_BOOL_PARAM = b"\x08"  # InferParameter: 1, bool
_UINT64_PARAM = b"\x28"  # InferParameter: 5, uint64
_INFER_RESPONSE = b"\x12"  # ModelStreamInferResponse: 2, ModelInferResponse

STEP_PARAMETER = "sequence_step"  # the sequence's step count after the reading, as GetState says
FINAL_PARAMETER = "triton_final_response"  # on every stream reply: each request has exactly one


def _delimited(key: bytes, payload: bytes) -> bytes:
    return key + varint(len(payload)) + payload


def _entry_head(name: str) -> bytes:
    return _delimited(_ENTRY_KEY, name.encode())


_STEP_KEY = _entry_head(STEP_PARAMETER)
_FINAL = _delimited(
    _PARAMETER, _entry_head(FINAL_PARAMETER) + _delimited(_ENTRY_VALUE, _BOOL_PARAM + b"\x01")
)


class _Layout:
    """The fixed bytes of one model version's replies with one output selection."""

    __slots__ = ("head", "names", "states")

    def __init__(self, signature: Signature, outputs: tuple[int, ...]) -> None:
        parts = [
            _delimited(_MODEL_NAME, signature.model.encode()),
            _delimited(_MODEL_VERSION, signature.version.encode()),
        ]
        for index in outputs:
            spec = signature.outputs[index]
            shape = b"".join(varint(d) for d in spec.shape)
            tensor = (
                _delimited(_TENSOR_NAME, spec.name.encode())
                + _delimited(_TENSOR_DATATYPE, FP32.encode())
                + _delimited(_TENSOR_SHAPE, shape)
            )
            parts.append(_delimited(_OUTPUT, tensor))
        self.head = b"".join(parts)
        # Per selected output: None for the answer, else the position of the state it is the next
        # value of among the run's states (the model's state order, as its store keeps them).
        self.names = tuple(spec.name for spec in signature.states)
        self.states = [None if i == 0 else i - 1 for i in outputs]


class InferReplies:
    """Encodes ModelInferResponses, one fixed part per (model version, output selection)."""

    def __init__(self) -> None:
        self._layouts: dict[tuple[Signature, tuple[int, ...]], _Layout] = {}

    def encode(
        self,
        signature: Signature,
        outputs: tuple[int, ...],
        result: StepResult,
        request_id: str,
        *,
        stream: bool = False,
    ) -> bytes:
        """The reply to one reading (`outputs` as Inference.outputs selected them); with `stream`,
        as a ModelStreamInferResponse marked final."""
        layout = self._layouts.get((signature, outputs))
        if layout is None:
            layout = self._layouts[(signature, outputs)] = _Layout(signature, outputs)
        parts = [layout.head]
        if request_id:
            parts.append(_delimited(_ID, request_id.encode()))
        step = _delimited(_ENTRY_VALUE, _UINT64_PARAM + varint(result.step))
        parts.append(_delimited(_PARAMETER, _STEP_KEY + step))
        run, row = result.run, result.index
        # (a sequence still on an older version may order or name its states otherwise)
        same = run.names == layout.names
        for position in layout.states:
            if position is None:
                values = run.outputs[row]
            else:
                values = run.states[position if same else run.names.index(layout.names[position])][row]
            data = values.astype("<f4", copy=False).tobytes()
            parts += (_RAW_OUTPUT, varint(len(data)), data)
        if not stream:
            return b"".join(parts)
        parts.append(_FINAL)
        inner = b"".join(parts)
        return _INFER_RESPONSE + varint(len(inner)) + inner
