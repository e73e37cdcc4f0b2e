"""A KServe v2 ModelInferRequest as plain values: which stream, which reading, which states to
replace, which outputs to return. Every check a cellstream request gets is made on the tensors
here or in the engine, so a refused request changes nothing; each refusal names what to send.

Sequences are streams: a string `sequence_id` is the stream id itself, an integer its decimal
text, so Triton's sequence 42 is cellstream's stream "42".
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cellstream.engine import TensorValue
from cellstream.errors import BadInput, quoted
from cellstream.model import CellModel

FP32 = "FP32"
SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
NO_SHARED_MEMORY = (
    "shared memory is not served: send the values in the request (tritonclient: "
    "InferInput.set_data_from_numpy, which fills raw_input_contents)"
)


class TensorSpec:
    """One input or output as v2 names it, with its shape per request (without the batch axis)."""

    __slots__ = ("dims", "name", "shape", "size")

    def __init__(self, name: str, dims: tuple[int, ...]) -> None:
        self.name = name
        self.dims = dims
        self.shape = [1, *dims]  # in a request or reply: one reading per request, a batch axis of 1
        self.size = math.prod(dims)


class Signature:
    """A model version's tensors as the v2 protocol shows them: the reading, then the states as
    optional inputs; the answer, then each state's next value as outputs (the model's names)."""

    def __init__(self, model: CellModel) -> None:
        self.model = model.name
        self.version = model.version
        self.reading = TensorSpec(model.reading, (model.input_size,))
        self.states = tuple(TensorSpec(spec.name, spec.shape) for spec in model.states)
        self.inputs = (self.reading, *self.states)
        self.answer = TensorSpec(model.output, (model.output_size,))
        self.outputs = (self.answer, *(TensorSpec(s.output, s.shape) for s in model.states))
        self._inputs = {spec.name: spec for spec in self.inputs}
        self._outputs = {spec.name: i for i, spec in enumerate(self.outputs)}
        self.every_output = tuple(range(len(self.outputs)))

    def input(self, name: str) -> TensorSpec:
        spec = self._inputs.get(name)
        if spec is None:
            raise BadInput(
                f"model {self.model!r} has no input {quoted(name)}; its inputs are "
                f"{[s.name for s in self.inputs]} (the reading {self.reading.name!r}, then optional states)"
            )
        return spec

    def output_index(self, name: str) -> int:
        index = self._outputs.get(name)
        if index is None:
            raise BadInput(
                f"model {self.model!r} has no output {quoted(name)}; its outputs are "
                f"{[s.name for s in self.outputs]}"
            )
        return index


@dataclass(slots=True)
class Inference:
    """What one request asks of the engine, and which outputs its reply carries."""

    stream_id: str
    x: np.ndarray
    state: dict[str, TensorValue] | None
    reset: bool
    end: bool
    outputs: tuple[int, ...]  # indexes into Signature.outputs, in reply order
    want_state: bool
    timeout: float | None  # seconds, from the `timeout` parameter


def _parameter(parameters: Mapping[str, Any], name: str) -> tuple[str | None, Any]:
    """(the oneof field set, its value) of a request parameter; (None, None) when absent."""
    value = parameters.get(name)
    if value is None:
        return None, None
    which = value.WhichOneof("parameter_choice")
    return which, None if which is None else getattr(value, which)


def sequence_of(parameters: Mapping[str, Any], model: str) -> str:
    """The stream id a request's `sequence_id` names; every cellstream model is stateful."""
    which, value = _parameter(parameters, "sequence_id")
    if which == "string_param":
        stream_id = str(value)
    elif which in ("int64_param", "uint64_param"):
        if value < 0:
            raise BadInput(
                f"sequence_id {value} is negative: a sequence id is an unsigned integer or a string"
            )
        stream_id = str(value) if value else ""
    elif which is None:
        stream_id = ""
    else:
        raise BadInput(f"sequence_id is a {which}; send it as an integer (int64 or uint64) or a string")
    if not stream_id:
        raise BadInput(
            f"model {model!r} is stateful: every request needs a sequence_id parameter, a non-zero "
            f"integer or a non-empty string (tritonclient: infer(..., sequence_id=42)); it names the stream"
        )
    return stream_id


def _flag(parameters: Mapping[str, Any], name: str) -> bool:
    which, value = _parameter(parameters, name)
    if which is None:
        return False
    if which != "bool_param":
        raise BadInput(f"{name} is a {which}; send it as a bool parameter")
    return bool(value)


def _timeout(parameters: Mapping[str, Any]) -> float | None:
    """The `timeout` parameter (microseconds, as tritonclient's `timeout=`) in seconds."""
    which, value = _parameter(parameters, "timeout")
    if which is None:
        return None
    if which not in ("int64_param", "uint64_param") or value < 0:
        raise BadInput("timeout is a non-negative integer parameter, in microseconds")
    return float(value) / 1e6


def _values(tensor: Any, spec: TensorSpec, raw: Sequence[bytes], index: int, *, reading: bool) -> np.ndarray:
    """One input tensor's values, flat, after checking its datatype, shape and byte count."""
    name = spec.name
    if tensor.datatype != FP32:
        raise BadInput(f"input {name!r} is {quoted(tensor.datatype)}; cellstream takes FP32 only")
    if tensor.shape != spec.shape:
        shape = list(tensor.shape)
        batch = (
            "; a request carries one reading (batch axis 1): send one request per reading, or many "
            "streams at once with cellstream's StepBatch"
            if reading and len(shape) == 2 and shape[1:] == list(spec.dims)
            else ""
        )
        raise BadInput(f"input {name!r} has shape {shape}; model expects {spec.shape}{batch}")
    if tensor.parameters and any(key in tensor.parameters for key in SHARED_MEMORY):
        raise BadInput(f"input {name!r}: {NO_SHARED_MEMORY}")
    if raw:
        if tensor.HasField("contents"):
            raise BadInput(
                f"input {name!r} has both raw_input_contents and contents: send its values in one of them"
            )
        data = raw[index]
        if len(data) != 4 * spec.size:
            raise BadInput(
                f"raw_input_contents[{index}] (input {name!r}) holds {len(data)} bytes; shape "
                f"{spec.shape} of FP32 needs {4 * spec.size}"
            )
        return np.frombuffer(data, "<f4")
    contents = tensor.contents
    for field, _ in contents.ListFields():
        if field.name != "fp32_contents":
            raise BadInput(
                f"input {name!r} is FP32: its values go in contents.fp32_contents, not {field.name}"
            )
    values = contents.fp32_contents
    if len(values) != spec.size:
        raise BadInput(
            f"input {name!r} holds {len(values)} values in contents.fp32_contents; shape "
            f"{spec.shape} needs {spec.size}"
        )
    return np.fromiter(values, np.float32, spec.size)


def _inputs(request: Any, signature: Signature) -> tuple[np.ndarray, dict[str, TensorValue] | None]:
    tensors = request.inputs
    raw = request.raw_input_contents
    if not tensors:
        spec = signature.reading
        raise BadInput(
            f"the request has no inputs: send the reading as input {spec.name!r}, FP32 {spec.shape}"
        )
    if raw and len(raw) != len(tensors):
        raise BadInput(
            f"raw_input_contents holds {len(raw)} entries for {len(tensors)} inputs: send one per input, "
            f"in the order of `inputs`, or none (then each input's contents)"
        )
    x: np.ndarray | None = None
    state: dict[str, TensorValue] = {}
    for index, tensor in enumerate(tensors):
        spec = signature.input(tensor.name)
        is_reading = spec is signature.reading
        duplicate = x is not None if is_reading else spec.name in state
        if duplicate:
            raise BadInput(f"input {spec.name!r} is given twice")
        values = _values(tensor, spec, raw, index, reading=is_reading)
        if is_reading:
            x = values
        else:
            state[spec.name] = (spec.dims, values)
    if x is None:
        spec = signature.reading
        raise BadInput(f"input {spec.name!r} (the reading, FP32 {spec.shape}) is missing")
    return x, state or None


def _outputs(request: Any, signature: Signature) -> tuple[tuple[int, ...], bool]:
    """The outputs selected (indexes into Signature.outputs), and whether any is a state."""
    wanted = request.outputs
    if not wanted:
        return signature.every_output, True
    chosen: list[int] = []
    for output in wanted:
        index = signature.output_index(output.name)
        if index in chosen:
            raise BadInput(f"output {output.name!r} is asked for twice")
        if any(key in output.parameters for key in SHARED_MEMORY):
            raise BadInput(
                f"output {output.name!r}: shared memory is not served: the reply carries the values"
            )
        if "classification" in output.parameters:
            raise BadInput(
                f"output {output.name!r}: classification is not served: read the values themselves"
            )
        chosen.append(index)
    return tuple(chosen), any(index > 0 for index in chosen)  # (index 0 is the answer)


def decode(request: Any, signature: Signature) -> Inference:
    """The plain values of a ModelInferRequest for `signature`'s model (BadInput if malformed)."""
    parameters = request.parameters
    stream_id = sequence_of(parameters, signature.model)
    reset = _flag(parameters, "sequence_start")
    end = _flag(parameters, "sequence_end")
    timeout = _timeout(parameters)
    x, state = _inputs(request, signature)
    outputs, want_state = _outputs(request, signature)
    return Inference(stream_id, x, state, reset, end, outputs, want_state, timeout)


def deadline(context_deadline: float | None, timeout: float | None) -> float | None:
    """The earlier of the call's deadline and the request's `timeout`, on time.monotonic()."""
    if timeout is None:
        return context_deadline
    ends = time.monotonic() + timeout
    return ends if context_deadline is None else min(context_deadline, ends)
