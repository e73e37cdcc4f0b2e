"""What the client checks before sending: shapes in values, against the sizes ListModels gives.

The sizes are learned once per model name (any ListModels call refreshes them) and asked again
only before a refusal, so a model reloaded with another input size is not refused from a stale
cache. A model the server does not list is left to the server to refuse.
"""

from __future__ import annotations

from collections.abc import Iterable

from cellstream._proto.cellstream.v1 import cellstream_pb2 as pb


class InputSizes:
    """Values per reading of each served model name ('' is the default model), from ListModels.

    A name can map to several sizes while versions of different contracts are loaded side by
    side; a shape fitting any of them is left to the server, which knows each stream's version.
    """

    def __init__(self) -> None:
        self._sizes: dict[str, frozenset[int]] = {}
        self._default = ""

    def learn(self, models: Iterable[pb.ModelInfo]) -> None:
        sizes: dict[str, set[int]] = {}
        default = ""
        for info in models:
            sizes.setdefault(info.name, set()).add(int(info.input_size))
            if info.is_default:
                default = info.name
        self._sizes = {name: frozenset(values) for name, values in sizes.items()}
        self._default = default

    def knows(self, model: str) -> bool:
        return (model or self._default) in self._sizes

    def of(self, model: str) -> frozenset[int] | None:
        """The sizes of `model` (None: not listed, the server decides)."""
        return self._sizes.get(model or self._default)

    def label(self, model: str) -> str:
        if model:
            return f"model {model!r}"
        return f"the default model {self._default!r}" if self._default else "the default model"

    def batch_problem(self, n: int, shape: tuple[int, ...], model: str) -> str | None:
        """Why StepBatch inputs of `shape` do not fit `n` stream ids; None when they may."""
        sizes = self.of(model)
        if len(shape) == 2 and shape[0] == n and (sizes is None or shape[1] in sizes):
            return None  # the common case, before any message is made
        return _batch_message(n, shape, self.label(model), sizes)


def _width(sizes: frozenset[int]) -> str:
    return " or ".join(str(size) for size in sorted(sizes))


def _batch_message(n: int, shape: tuple[int, ...], label: str, sizes: frozenset[int] | None) -> str:
    width = "input_size" if sizes is None else _width(sizes)
    expected = f"expected shape ({n}, {width}), one row per stream id"
    if len(shape) != 2:
        return f"inputs have shape {shape}: StepBatch takes an (N, F) array, {expected} of {label}"
    if shape[0] != n:
        return f"inputs have {shape[0]} rows (shape {shape}) for {n} stream ids: {expected}"
    return f"inputs have shape {shape}, but {label} takes {width} values per reading: {expected}"


def reading_problem(shape: tuple[int, ...], label: str, sizes: frozenset[int] | None) -> str:
    """Why a reading of more than one dimension is not one reading."""
    wanted = f"shape ({_width(sizes)},) for {label}" if sizes is not None else "shape (input_size,)"
    return (
        f"reading has shape {shape}, but a step takes one reading, a vector: {wanted}; "
        "send several readings with step_batch or step_stream"
    )
