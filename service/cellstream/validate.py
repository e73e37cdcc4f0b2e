"""Checks of everything a request carries, before anything is queued: a refused request changes
nothing. Plain values in, plain values out, a BadInput naming what to fix otherwise."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from cellstream.errors import BadInput, TooLarge, quoted
from cellstream.ids import first_id_problem, id_problem
from cellstream.model import CellModel

# A state given in a request: its declared shape (may be empty: then it is taken as flat) and values.
TensorValue = tuple[Sequence[int], np.ndarray]
# The highest step a stream may be set to: steps are u64, and the next reading must still fit.
MAX_STEP = 2**64 - 2


def stream_id(value: str) -> None:
    problem = id_problem(value)
    if problem is not None:
        raise BadInput(problem)


def first_bad_id(stream_ids: Sequence[str], positions: Sequence[int]) -> tuple[int, BadInput] | None:
    """The first bad id among `stream_ids` (at request indexes `positions`), as an error."""
    found = first_id_problem(stream_ids, positions)
    return None if found is None else (found[0], BadInput(found[1]))


def reading(x: np.ndarray, model: CellModel) -> np.ndarray:
    """One reading: the model's input size, finite values."""
    if x.shape != (model.input_size,):
        raise BadInput(f"input has {x.size} values, model {model.name!r} expects {model.input_size}")
    if not np.isfinite(x).all():
        raise BadInput(f"input value {int(np.flatnonzero(~np.isfinite(x))[0])} is NaN or infinite")
    return x


def states(given: Mapping[str, TensorValue], model: CellModel) -> list[np.ndarray | None]:
    """Given states by name and shape, in the model's state order; None where one is not given."""
    specs = {spec.name: spec for spec in model.states}
    unknown = set(given) - set(specs)
    if unknown:
        shown = ", ".join(quoted(name) for name in sorted(unknown)[:5])
        raise BadInput(f"model {model.name!r} has no state [{shown}]; its states are {sorted(specs)}")
    result: list[np.ndarray | None] = []
    for spec in model.states:
        if spec.name not in given:
            result.append(None)
            continue
        shape, data = given[spec.name]
        shape = tuple(int(d) for d in shape) or (len(data),)
        if shape not in (spec.shape, (spec.size,)) or len(data) != math.prod(shape):
            raise BadInput(
                f"state {spec.name!r} has shape {list(shape)} with {len(data)} values; model "
                f"{model.name!r} expects shape {list(spec.shape)}"
            )
        value = np.asarray(data, np.float32).reshape(spec.shape)
        if not np.isfinite(value).all():
            raise BadInput(f"state {spec.name!r} holds NaN or infinite values")
        result.append(value)
    return result


def batch_inputs(n: int, inputs: bytes, model: CellModel, limit: int) -> np.ndarray:
    """A StepBatch's readings as an (n, input_size) array, or the reason they are not."""
    if n == 0:
        raise BadInput("stream_ids is empty")
    if n > limit:
        raise BadInput(f"{n} readings in one StepBatch; the limit is {limit}")
    expected = n * model.input_size * 4
    if len(inputs) != expected:
        raise BadInput(
            f"inputs holds {len(inputs)} bytes; {n} readings of model {model.name!r} need "
            f"{n} x {model.input_size} float32 = {expected} bytes"
        )
    return np.frombuffer(inputs, "<f4").reshape(n, model.input_size)


def first_bad_row(x: np.ndarray) -> tuple[int, BadInput] | None:
    finite = np.isfinite(x).all(axis=1)
    if finite.all():
        return None
    index = int(np.flatnonzero(~finite)[0])
    return index, BadInput(f"stream_ids[{index}]: input holds NaN or infinity")


def step(value: int) -> int:
    if not 0 <= value <= MAX_STEP:
        raise BadInput(f"step {value} is out of range: a stream's step is 0 to {MAX_STEP}")
    return value


def _varint_bytes(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def batch_reply_fits(n: int, model: CellModel, *, want_state: bool, highest_step: int, limit: int) -> None:
    """Refuse a StepBatch whose reply could not be sent (--max-message-bytes) before it is applied:
    otherwise its steps would run and the caller, seeing an error, would send them again."""
    size = 16 + 4 * n * model.output_size + n * _varint_bytes(highest_step + n)
    if want_state:
        size += sum(24 + len(spec.name.encode()) + 4 * n * spec.size for spec in model.states)
    if size > limit:
        raise TooLarge(
            f"the reply to {n} readings of model {model.name!r} would be about {size} bytes, over "
            f"--max-message-bytes {limit}: send fewer readings per StepBatch, or set omit_state"
        )
