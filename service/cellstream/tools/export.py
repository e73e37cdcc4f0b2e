"""Export trained PyTorch recurrent models as one-step cellstream models.

A cellstream model is an ONNX graph that advances a recurrent model by ONE step: it takes a
reading ``[B, F]`` plus each state ``[B, ...]`` and returns the answer ``[B, ...]`` plus each
next state, batch axis 0 dynamic (named ``"batch"``), float32. The server keeps the state per
stream and batches many streams into one call, so the graph itself must hold no state.

:func:`export_torch` turns a trained ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` (any ``num_layers``,
either ``batch_first``), an ``nn.GRUCell`` / ``nn.LSTMCell`` / ``nn.RNNCell``, or a user module
with ``forward(x, *states) -> (y, *new_states)`` into ``model.onnx`` plus ``config.json``, then
runs the ONNX file with onnxruntime step by step and compares it with PyTorch. A model that
does not reproduce PyTorch is never left behind: :class:`ExportCheckError` is raised instead.
The wrapping of the module into one step lives in :mod:`cellstream.tools.torch_step`, the
ONNX-vs-PyTorch check in :mod:`cellstream.tools.export_check`.

torch, onnx and onnxruntime are imported inside the functions, so ``import cellstream.export``
works (and costs little) on a server that has no torch.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from cellstream.tools.export_check import ExportCheckError, onnx_check, torch_reference
from cellstream.tools.torch_step import (
    SEQUENCE_KINDS,
    USER_KIND,
    StepPlan,
    check_names,
    example_inputs,
    plan_step,
    probe,
    step_wrapper,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "CONFIG_FILENAME",
    "DEFAULT_OPSET",
    "MODEL_FILENAME",
    "ExportCheckError",
    "ExportReport",
    "export_torch",
]

#: The model's file name when ``path`` is a directory.
MODEL_FILENAME = "model.onnx"
#: The config written beside the model.
CONFIG_FILENAME = "config.json"
#: ONNX opset used by default: served by every onnxruntime the package supports (>= 1.18).
DEFAULT_OPSET = 17

_TORCH_HINT = "cellstream.export needs PyTorch and onnx: pip install 'cellstream[torch]'"

#: A scalar fill, or a nested list / array of the per-stream state shape.
InitialState = float | Sequence[Any] | np.ndarray


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_torch` wrote, and how closely the ONNX model matched PyTorch."""

    model_path: Path
    config_path: Path
    kind: str
    """What was exported: ``"GRU"``, ``"LSTM"``, ``"RNN"``, a cell class name, or ``"module"``."""
    reading: str
    states: dict[str, str]
    """State input name -> the output carrying its next value."""
    output: str
    input_size: int
    state_shapes: dict[str, tuple[int, ...]]
    """Per-stream state shapes, without the batch axis."""
    output_shape: tuple[int, ...]
    """Per-stream answer shape, without the batch axis."""
    config: dict[str, Any]
    """Exactly what was written to ``config.json``."""
    max_abs_error: float
    """Largest |onnx - torch| over every checked step and output."""
    errors: dict[str, float] = field(default_factory=dict)
    """Largest |onnx - torch| per output name."""
    check_steps: int = 0
    check_batch: int = 0
    tolerance: float = 0.0
    opset: int = DEFAULT_OPSET
    exporter: str = "torchscript"
    """``torch.onnx.export(..., dynamo=False)``: needs onnx but not onnxscript."""


def export_torch(
    module: nn.Module,
    path: str | os.PathLike[str],
    *,
    input_size: int | None = None,
    head: nn.Module | None = None,
    state_shapes: Mapping[str, Sequence[int]] | None = None,
    initial_state: float | Mapping[str, InitialState] | None = None,
    reading_name: str = "x",
    output_name: str = "y",
    max_batch: int | None = None,
    version: str | None = None,
    description: str | None = None,
    opset: int = DEFAULT_OPSET,
    check_steps: int = 50,
    check_batch: int = 3,
    tolerance: float = 1e-4,
    seed: int = 0,
) -> ExportReport:
    """Export ``module`` (+ ``head``) as a one-step cellstream model, then prove it matches.

    Args:
        module: ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` (unidirectional, no ``proj_size``),
            ``nn.GRUCell`` / ``nn.LSTMCell`` / ``nn.RNNCell``, or any module with
            ``forward(x, *states) -> (y, *new_states)`` over batch-first tensors. Float32, CPU.
        path: ``.../something.onnx`` (config.json goes beside it), or a directory that gets
            ``model.onnx`` and ``config.json`` (created if missing). Existing files are
            replaced only once the check has passed.
        input_size: the reading's feature count F; required for a user module, checked
            against the module otherwise.
        head: built-in modules only: applied to the top layer's new hidden state to give the
            answer. Without it the answer is that hidden state.
        state_shapes: user modules only: ``{name: per_stream_shape}`` in the order forward()
            takes the states. Built-ins use ``h`` (and ``c`` for LSTM) of per-stream shape
            ``[num_layers, H]``, or ``[H]`` for cells.
        initial_state: a scalar fill for every state, or ``{name: scalar | nested list}``.
            Written to config.json and used as the check's starting state. Default 0.0.
        reading_name, output_name: ONNX names of the reading and the answer. A state ``S`` is
            always paired with the output ``S_out``.
        max_batch, version: copied into config.json when given.
        description: copied into config.json; defaults to a summary of what was exported.
        opset: ONNX opset for the exporter.
        check_steps, check_batch, seed: the self-check steps the ONNX model with onnxruntime
            ``check_steps`` times over a seeded random ``[check_batch, F]`` reading.
        tolerance: the largest accepted |onnx - torch|.

    Returns:
        An :class:`ExportReport` with the paths, names, shapes and ``max_abs_error``.

    Raises:
        ImportError: torch or onnx is not installed.
        ValueError: the module cannot be a one-step cell (e.g. bidirectional) or an argument
            does not fit it.
        ExportCheckError: the ONNX model disagrees with PyTorch by more than ``tolerance``.
    """
    th = _import_torch()
    if check_steps < 1 or check_batch < 1:
        raise ValueError("check_steps and check_batch must be >= 1: every export is checked")
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")

    plan = plan_step(th, module, input_size, state_shapes, head)
    plan.reading, plan.output = reading_name, output_name
    check_names(plan)
    init, init_config = _initial_states(plan, initial_state)
    _check_float32_cpu(th, module, head)
    model_path, config_path = _resolve_paths(path)

    config: dict[str, Any] = {
        "reading": plan.reading,
        "states": plan.states_map,
        "output": plan.output,
        "initial_state": init_config,
    }
    if max_batch is not None:
        config["max_batch"] = int(max_batch)
    if version is not None:
        config["version"] = str(version)
    config["description"] = description if description is not None else _describe(plan, module, head)

    with _eval_mode(module, head), th.no_grad():
        step = step_wrapper(plan, module, head)
        # Trace with one batch size and check with another, so a batch size baked into the
        # graph by accident fails here rather than in production.
        trace_batch = 2 if check_batch != 2 else 4
        example = example_inputs(th, plan, trace_batch, seed)
        output_shape = probe(plan, step, example)

        xs = np.random.default_rng(seed).standard_normal((check_steps, check_batch, plan.input_size))
        xs = xs.astype(np.float32)
        ref = torch_reference(th, plan=plan, module=module, head=head, step=step, xs=xs, init=init)

        created = not model_path.parent.exists()
        model_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with tempfile.TemporaryDirectory(dir=model_path.parent, prefix=".cellstream-export-") as tmp:
                tmp_model, tmp_config = Path(tmp) / MODEL_FILENAME, Path(tmp) / CONFIG_FILENAME
                _torch_onnx_export(th, step=step, example=example, target=tmp_model, plan=plan, opset=opset)
                errors = onnx_check(tmp_model, plan, xs, init, ref)
                where = max(errors, key=lambda k: errors[k])
                worst = errors[where]
                if worst > tolerance:
                    raise ExportCheckError(
                        f"exported ONNX model disagrees with PyTorch: max |onnx - torch| = {worst:.3g} "
                        f"on {where!r} over {check_steps} steps (tolerance {tolerance:g}); nothing was "
                        "written. Does forward() branch on tensor values in Python, or draw random "
                        "numbers? The exporter records one traced path.",
                        max_abs_error=worst,
                        where=where,
                    )
                tmp_config.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
                # Same filesystem, so each rename is atomic: neither file is ever seen half written.
                os.replace(tmp_model, model_path)
                os.replace(tmp_config, config_path)
        except BaseException:
            if created:
                shutil.rmtree(model_path.parent, ignore_errors=True)
            raise

    return ExportReport(
        model_path=model_path,
        config_path=config_path,
        kind=plan.kind,
        reading=plan.reading,
        states=plan.states_map,
        output=plan.output,
        input_size=plan.input_size,
        state_shapes=dict(plan.state_shapes),
        output_shape=output_shape,
        config=config,
        max_abs_error=worst,
        errors=errors,
        check_steps=check_steps,
        check_batch=check_batch,
        tolerance=tolerance,
        opset=opset,
    )


def _import_torch() -> ModuleType:
    """Import torch (and check onnx) only when exporting, with an install hint if missing."""
    try:
        th = importlib.import_module("torch")
        importlib.import_module("onnx")  # torch's TorchScript exporter serializes through it
    except ImportError as exc:
        raise ImportError(f"{_TORCH_HINT} ({exc})") from exc
    return th


def _initial_states(
    plan: StepPlan, initial_state: float | Mapping[str, InitialState] | None
) -> tuple[dict[str, np.ndarray], dict[str, float | list[Any]]]:
    """Resolve ``initial_state`` to a per-stream float32 array per state, and its config form.

    A scalar stays a scalar in config.json (the server fills it), so configs stay small.
    """
    if initial_state is None:
        given: Mapping[str, InitialState] = {}
    elif isinstance(initial_state, Mapping):
        given = initial_state
        unknown = sorted(set(given) - set(plan.state_names))
        if unknown:
            raise ValueError(
                f"initial_state names unknown states {unknown}; the states are {plan.state_names}"
            )
    else:
        given = dict.fromkeys(plan.state_names, float(initial_state))
    arrays: dict[str, np.ndarray] = {}
    config: dict[str, float | list[Any]] = {}
    for name, shape in plan.state_shapes.items():
        arr = np.asarray(given.get(name, 0.0), dtype=np.float32)
        if arr.ndim == 0:
            config[name] = float(arr)
            arr = np.full(shape, float(arr), dtype=np.float32)
        elif arr.shape != shape:
            raise ValueError(f"initial_state[{name!r}] has shape {arr.shape}; the state's is {shape}")
        else:
            config[name] = arr.tolist()
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"initial_state[{name!r}] is not finite")
        arrays[name] = arr
    return arrays, config


def _check_float32_cpu(th: ModuleType, *modules: nn.Module | None) -> None:
    """The server feeds float32 from CPU memory; say so early instead of failing in the tracer."""
    for m in modules:
        if m is None:
            continue
        for name, p in [*m.named_parameters(), *m.named_buffers()]:
            if p.is_floating_point() and p.dtype != th.float32:
                raise ValueError(
                    f"{type(m).__name__}.{name} is {p.dtype}; cellstream models are float32 "
                    "(export a .float() copy)"
                )
            if p.device.type != "cpu":
                raise ValueError(f"{type(m).__name__}.{name} is on {p.device}; export a .cpu() copy")


def _resolve_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``*.onnx`` is the model file itself; anything else is a directory for ``model.onnx``."""
    p = Path(path)
    if p.suffix.lower() == ".onnx":
        return p, p.parent / CONFIG_FILENAME
    return p / MODEL_FILENAME, p / CONFIG_FILENAME


@contextmanager
def _eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    """Export in eval mode (dropout off), then hand the caller's modules back as they were."""
    saved = [(m, m.training) for m in modules if m is not None]
    try:
        for m, _ in saved:
            m.eval()
        yield
    finally:
        for m, was_training in saved:
            m.train(was_training)


def _describe(plan: StepPlan, module: nn.Module, head: nn.Module | None) -> str:
    if plan.kind == USER_KIND:
        what = type(module).__name__
    else:
        what = f"{plan.kind}(input_size={plan.input_size}, hidden_size={getattr(module, 'hidden_size', '?')}"
        if plan.kind in SEQUENCE_KINDS:
            what += f", num_layers={getattr(module, 'num_layers', '?')}"
        what += ")"
    if head is not None:
        what += f" + {type(head).__name__} head"
    return f"{what}, one step per reading; exported by cellstream.export"


def _torch_onnx_export(
    th: ModuleType,
    *,
    step: nn.Module,
    example: tuple[torch.Tensor, ...],
    target: Path,
    plan: StepPlan,
    opset: int,
) -> None:
    """Export with the TorchScript exporter: it needs onnx, not the heavier onnxscript."""
    dynamic = {n: {0: "batch"} for n in (*plan.input_names, *plan.output_names)}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo (which pulls in
        # onnxscript); its deprecation and tracer warnings are noise here, because the check
        # that follows decides whether the export is right.
        warnings.simplefilter("ignore")
        th.onnx.export(
            step,
            example,
            str(target),
            input_names=plan.input_names,
            output_names=plan.output_names,
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
