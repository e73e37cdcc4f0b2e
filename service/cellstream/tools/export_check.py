"""The export's self-check: step the ONNX model with onnxruntime and compare it with PyTorch.

A model that does not reproduce PyTorch must never be served, so every export is checked here
before its files are put in place, and a mismatch is an :class:`ExportCheckError`.

onnxruntime is imported inside the functions, so importing this module costs no runtime.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from cellstream.tools.torch_step import SEQUENCE_KINDS, StepPlan

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ExportCheckError", "TorchReference", "onnx_check", "torch_reference"]


class ExportCheckError(RuntimeError):
    """The exported ONNX model does not reproduce the PyTorch module.

    Raised, never warned, because serving such a model would give wrong answers quietly. No
    file is left at the target path. ``where`` names the worst output (or the missing tensor)
    and ``max_abs_error`` says how far off it was (``inf`` for a malformed graph).
    """

    def __init__(self, message: str, *, max_abs_error: float, where: str) -> None:
        super().__init__(message)
        self.max_abs_error = max_abs_error
        self.where = where


@dataclass
class TorchReference:
    """What PyTorch computed over the check sequence, for the ONNX run to match."""

    ys: list[np.ndarray]
    """The answer at each step."""
    states: dict[str, np.ndarray]
    """Per state: ``[T, B, ...]`` when ``per_step``, else the final ``[B, ...]``."""
    per_step: bool


def torch_reference(
    th: ModuleType,
    *,
    plan: StepPlan,
    module: nn.Module,
    head: nn.Module | None,
    step: nn.Module,
    xs: np.ndarray,
    init: dict[str, np.ndarray],
) -> TorchReference:
    """Run PyTorch over the whole check sequence.

    nn.GRU/LSTM/RNN run their OWN sequence forward over all steps at once, in their own layout
    (not through the wrapper), so the check also covers the wrapper's layout conversions; the
    sequence forward yields only the final states. Cells and user modules have no sequence
    forward, so they are stepped eagerly and every step's states are compared.
    """
    steps, batch = xs.shape[0], xs.shape[1]
    states0 = [th.from_numpy(np.broadcast_to(a, (batch, *a.shape)).copy()) for a in init.values()]
    if plan.kind in SEQUENCE_KINDS:
        seq = th.from_numpy(xs)  # [T, B, F]
        if plan.batch_first:
            seq = seq.transpose(0, 1)
        layered = [s.transpose(0, 1).contiguous() for s in states0]
        if plan.kind == "LSTM":
            out, (h_n, c_n) = module(seq, (layered[0], layered[1]))
            final = {"h": h_n, "c": c_n}
        else:
            out, h_n = module(seq, layered[0])
            final = {"h": h_n}
        if plan.batch_first:
            out = out.transpose(0, 1)  # back to [T, B, H]
        ys = [(head(out[t]) if head is not None else out[t]).numpy().copy() for t in range(steps)]
        return TorchReference(
            ys, {k: v.transpose(0, 1).numpy().copy() for k, v in final.items()}, per_step=False
        )

    ys = []
    per_step: dict[str, list[np.ndarray]] = {n: [] for n in plan.state_names}
    current = states0
    for t in range(steps):
        y, *current = step(th.from_numpy(xs[t]), *current)
        ys.append(y.numpy().copy())
        for name, s in zip(plan.state_names, current, strict=True):
            per_step[name].append(s.numpy().copy())
    return TorchReference(ys, {n: np.stack(v) for n, v in per_step.items()}, per_step=True)


def onnx_check(
    model: Path, plan: StepPlan, xs: np.ndarray, init: dict[str, np.ndarray], ref: TorchReference
) -> dict[str, float]:
    """Step the ONNX model with onnxruntime, as the server will, feeding new states back in."""
    ort = importlib.import_module("onnxruntime")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
    _check_graph_io(sess, plan)
    batch = xs.shape[1]
    states = {n: np.broadcast_to(a, (batch, *a.shape)).astype(np.float32) for n, a in init.items()}
    errors = dict.fromkeys(plan.output_names, 0.0)
    for t in range(xs.shape[0]):
        y, *new = sess.run(plan.output_names, {plan.reading: xs[t], **states})
        errors[plan.output] = max(errors[plan.output], _max_err(y, ref.ys[t]))
        states = dict(zip(plan.state_names, new, strict=True))
        if ref.per_step:
            for name, out_name in plan.states_map.items():
                errors[out_name] = max(errors[out_name], _max_err(states[name], ref.states[name][t]))
    if not ref.per_step:
        for name, out_name in plan.states_map.items():
            errors[out_name] = _max_err(states[name], ref.states[name])
    return errors


def _max_err(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b|; inf for a shape mismatch or any NaN/inf, so those always fail the check."""
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(np.max(diff)) if np.all(np.isfinite(diff)) else float("inf")


def _check_graph_io(sess: Any, plan: StepPlan) -> None:
    """The graph itself must carry the contract: the names, float32, a symbolic batch axis."""
    ins = {i.name: i for i in sess.get_inputs()}
    outs = {o.name: o for o in sess.get_outputs()}
    missing = [n for n in plan.input_names if n not in ins] + [n for n in plan.output_names if n not in outs]
    if missing:
        raise ExportCheckError(
            f"exported graph lacks {missing} (it has inputs {sorted(ins)}, outputs {sorted(outs)}). "
            "The exporter drops inputs that forward() never reads: the reading and every state "
            "must be used.",
            max_abs_error=float("inf"),
            where=missing[0],
        )
    for arg in [*ins.values(), *outs.values()]:
        if arg.type != "tensor(float)" or not arg.shape or isinstance(arg.shape[0], int):
            raise ExportCheckError(
                f"{arg.name}: expected float32 with a symbolic batch axis 0, got {arg.type} {arg.shape}",
                max_abs_error=float("inf"),
                where=arg.name,
            )
