"""A PyTorch recurrent module seen as one cellstream step: its state layout and its wrapper.

nn.GRU / nn.LSTM / nn.RNN, their cells and user modules each keep state their own way. The
:class:`StepPlan` fixes the one-step graph's inputs, outputs and per-stream state shapes, and
:func:`step_wrapper` makes the module speak that contract, so that the exporter and the
self-check in :mod:`cellstream.tools.export` agree on it.

torch is imported inside the functions, so importing this module costs no torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "SEQUENCE_KINDS",
    "USER_KIND",
    "StepPlan",
    "check_names",
    "example_inputs",
    "plan_step",
    "probe",
    "step_wrapper",
]

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:/-]*$")
#: Built-ins with a sequence forward, whose state is ``[num_layers, B, H]``.
SEQUENCE_KINDS = ("GRU", "LSTM", "RNN")
_CELL_KINDS = ("GRUCell", "LSTMCell", "RNNCell")
#: The kind of any other module: ``forward(x, *states) -> (y, *new_states)``.
USER_KIND = "module"


@dataclass
class StepPlan:
    """What the wrapper, the exporter and the self-check must agree on."""

    kind: str
    input_size: int
    state_shapes: dict[str, tuple[int, ...]]
    reading: str = "x"
    output: str = "y"
    batch_first: bool = False

    @property
    def state_names(self) -> list[str]:
        return list(self.state_shapes)

    @property
    def states_map(self) -> dict[str, str]:
        return {n: f"{n}_out" for n in self.state_shapes}

    @property
    def input_names(self) -> list[str]:
        return [self.reading, *self.state_names]

    @property
    def output_names(self) -> list[str]:
        return [self.output, *self.states_map.values()]


def _kind(th: ModuleType, module: nn.Module) -> str:
    """Which built-in this is; a subclass counts only if it keeps the built-in forward()."""
    for name in (*SEQUENCE_KINDS, *_CELL_KINDS):
        cls = getattr(th.nn, name)
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return name
    return USER_KIND


def plan_step(
    th: ModuleType,
    module: nn.Module,
    input_size: int | None,
    state_shapes: Mapping[str, Sequence[int]] | None,
    head: nn.Module | None,
) -> StepPlan:
    """Work out the state layout, rejecting what a one-step cell cannot express."""
    kind = _kind(th, module)
    if kind == USER_KIND:
        if state_shapes is None:
            raise ValueError(
                f"{type(module).__name__} is not a built-in recurrent module: pass "
                "state_shapes={name: per_stream_shape, ...} in the order forward(x, *states) takes them"
            )
        if not state_shapes:
            raise ValueError("state_shapes is empty: a cellstream model carries at least one state")
        if input_size is None:
            raise ValueError("a user module needs input_size (the reading's feature count F)")
        if head is not None:
            raise ValueError("head is for built-in recurrent modules; apply it inside your forward()")
        shapes = {str(k): tuple(int(d) for d in v) for k, v in state_shapes.items()}
        if any(d < 1 for s in shapes.values() for d in s):
            raise ValueError(f"state shapes must have positive dimensions, got {shapes}")
        return StepPlan(kind, int(input_size), shapes)

    if state_shapes is not None:
        raise ValueError(f"state_shapes comes from the {kind} itself; pass it only for a user module")
    own_input = int(getattr(module, "input_size"))  # noqa: B009  (attributes of nn.Module type as Tensor)
    hidden = int(getattr(module, "hidden_size"))  # noqa: B009
    if input_size is not None and int(input_size) != own_input:
        raise ValueError(f"input_size={input_size} but the {kind} has input_size={own_input}")
    names = ["h", "c"] if kind.startswith("LSTM") else ["h"]
    if kind in _CELL_KINDS:
        return StepPlan(kind, own_input, dict.fromkeys(names, (hidden,)))
    if bool(getattr(module, "bidirectional", False)):
        raise ValueError(
            f"bidirectional {kind} cannot be exported as a one-step cell: its backward direction "
            "reads the stream from the end, which a live stream does not have yet"
        )
    if int(getattr(module, "proj_size", 0)) > 0:
        raise ValueError(
            "LSTM with proj_size > 0 is not supported: PyTorch's ONNX exporter cannot export "
            "LSTM projections (the ONNX LSTM operator has none)"
        )
    layers = int(getattr(module, "num_layers"))  # noqa: B009
    return StepPlan(
        kind,
        own_input,
        dict.fromkeys(names, (layers, hidden)),
        batch_first=bool(getattr(module, "batch_first", False)),
    )


def check_names(plan: StepPlan) -> None:
    names = [*plan.input_names, *plan.output_names]
    bad = [n for n in names if not _NAME_RE.match(n)]
    if bad:
        raise ValueError(f"invalid tensor names {bad}")
    if len(set(names)) != len(names):
        raise ValueError(
            f"tensor names must be distinct, got inputs {plan.input_names}, outputs {plan.output_names}"
        )


def step_wrapper(plan: StepPlan, module: nn.Module, head: nn.Module | None) -> nn.Module:
    """Build ``forward(x, *states) -> (y, *new_states)`` over batch-first states.

    nn.GRU/LSTM/RNN keep state as ``[num_layers, B, H]``; cellstream keeps it batch first
    (``[B, num_layers, H]``) so that one stream's state is one row the server can gather and
    scatter. The wrapper transposes in and out and feeds a length-1 sequence, so the exported
    graph speaks the server's layout whatever ``batch_first`` says.
    """
    from torch import nn as tnn  # noqa: PLC0415  (lazy on purpose: see the module docstring)

    kind, batch_first = plan.kind, plan.batch_first

    class Step(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module
            self.head = head

        def answer(self, h: torch.Tensor) -> torch.Tensor:
            return self.head(h) if self.head is not None else h

        def forward(self, x: torch.Tensor, *states: torch.Tensor) -> Any:
            if kind == USER_KIND:
                out = self.inner(x, *states)
                return tuple(out) if isinstance(out, tuple | list) else out
            if kind in SEQUENCE_KINDS:
                seq = x.unsqueeze(1) if batch_first else x.unsqueeze(0)
                layered = [s.transpose(0, 1).contiguous() for s in states]
                if kind == "LSTM":
                    top, (h_n, c_n) = self.inner(seq, (layered[0], layered[1]))
                    new: tuple[torch.Tensor, ...] = (h_n.transpose(0, 1), c_n.transpose(0, 1))
                else:
                    top, h_n = self.inner(seq, layered[0])
                    new = (h_n.transpose(0, 1),)
                return (self.answer(top[:, 0] if batch_first else top[0]), *new)
            if kind == "LSTMCell":
                h, c = self.inner(x, (states[0], states[1]))
                return (self.answer(h), h, c)
            h = self.inner(x, states[0])  # GRUCell / RNNCell
            return (self.answer(h), h)

    step: nn.Module = Step()
    return step.eval()


def example_inputs(th: ModuleType, plan: StepPlan, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = th.Generator().manual_seed(seed + 1)
    x = th.randn(batch, plan.input_size, generator=gen)
    states = [th.randn(batch, *shape, generator=gen) * 0.1 for shape in plan.state_shapes.values()]
    return (x, *states)


def probe(plan: StepPlan, step: nn.Module, example: tuple[torch.Tensor, ...]) -> tuple[int, ...]:
    """Run one eager step, to give clear errors before the tracer gives obscure ones."""
    batch = int(example[0].shape[0])
    try:
        out = step(*example)
    except TypeError as exc:
        if plan.kind != USER_KIND:
            raise
        raise ValueError(
            f"calling forward(x, {', '.join(plan.state_names)}) failed: {exc}; "
            "state_shapes must list every state forward() takes, in order"
        ) from exc
    if not isinstance(out, tuple) or len(out) != 1 + len(plan.state_names):
        got = f"{len(out)} values" if isinstance(out, tuple) else type(out).__name__
        raise ValueError(
            f"forward(x, *states) must return (y, {', '.join(plan.state_names)}): "
            f"{1 + len(plan.state_names)} tensors, got {got}"
        )
    for name, t in zip(plan.output_names, out, strict=True):
        if not hasattr(t, "dim") or t.dim() < 1 or t.shape[0] != batch:
            raise ValueError(
                f"{name}: expected a tensor with batch axis 0 of size {batch}, got {getattr(t, 'shape', t)!r}"
            )
    for name, t in zip(plan.state_names, out[1:], strict=True):
        if tuple(t.shape[1:]) != plan.state_shapes[name]:
            raise ValueError(
                f"new state {name!r} has per-stream shape {tuple(t.shape[1:])}; "
                f"its input has {plan.state_shapes[name]}"
            )
    return tuple(int(d) for d in out[0].shape[1:])
