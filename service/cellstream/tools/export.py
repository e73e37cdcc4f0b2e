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

torch, onnx and onnxruntime are imported inside the functions, so ``import cellstream.export``
works (and costs little) on a server that has no torch.
"""

from __future__ import annotations

import importlib
import json
import os
import re
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
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:/-]*$")
_SEQUENCE_KINDS = ("GRU", "LSTM", "RNN")
_CELL_KINDS = ("GRUCell", "LSTMCell", "RNNCell")
_USER = "module"

#: A scalar fill, or a nested list / array of the per-stream state shape.
InitialState = float | Sequence[Any] | np.ndarray


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


@dataclass
class _Plan:
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


# --------------------------------------------------------------------------------------------
# public entry point


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

    plan = _plan(th, module, input_size, state_shapes, head)
    plan.reading, plan.output = reading_name, output_name
    _check_names(plan)
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
        step = _step_wrapper(plan, module, head)
        # Trace with one batch size and check with another, so a batch size baked into the
        # graph by accident fails here rather than in production.
        trace_batch = 2 if check_batch != 2 else 4
        example = _example_inputs(th, plan, trace_batch, seed)
        output_shape = _probe(plan, step, example)

        xs = np.random.default_rng(seed).standard_normal((check_steps, check_batch, plan.input_size))
        xs = xs.astype(np.float32)
        ref = _torch_reference(th, plan=plan, module=module, head=head, step=step, xs=xs, init=init)

        created = not model_path.parent.exists()
        model_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with tempfile.TemporaryDirectory(dir=model_path.parent, prefix=".cellstream-export-") as tmp:
                tmp_model, tmp_config = Path(tmp) / MODEL_FILENAME, Path(tmp) / CONFIG_FILENAME
                _torch_onnx_export(th, step=step, example=example, target=tmp_model, plan=plan, opset=opset)
                errors = _onnx_check(tmp_model, plan, xs, init, ref)
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


# --------------------------------------------------------------------------------------------
# imports and argument checks


def _import_torch() -> ModuleType:
    """Import torch (and check onnx) only when exporting, with an install hint if missing."""
    try:
        th = importlib.import_module("torch")
        importlib.import_module("onnx")  # torch's TorchScript exporter serializes through it
    except ImportError as exc:
        raise ImportError(f"{_TORCH_HINT} ({exc})") from exc
    return th


def _kind(th: ModuleType, module: nn.Module) -> str:
    """Which built-in this is; a subclass counts only if it keeps the built-in forward()."""
    for name in (*_SEQUENCE_KINDS, *_CELL_KINDS):
        cls = getattr(th.nn, name)
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return name
    return _USER


def _plan(
    th: ModuleType,
    module: nn.Module,
    input_size: int | None,
    state_shapes: Mapping[str, Sequence[int]] | None,
    head: nn.Module | None,
) -> _Plan:
    """Work out the state layout, rejecting what a one-step cell cannot express."""
    kind = _kind(th, module)
    if kind == _USER:
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
        return _Plan(kind, int(input_size), shapes)

    if state_shapes is not None:
        raise ValueError(f"state_shapes comes from the {kind} itself; pass it only for a user module")
    own_input = int(getattr(module, "input_size"))  # noqa: B009  (attributes of nn.Module type as Tensor)
    hidden = int(getattr(module, "hidden_size"))  # noqa: B009
    if input_size is not None and int(input_size) != own_input:
        raise ValueError(f"input_size={input_size} but the {kind} has input_size={own_input}")
    names = ["h", "c"] if kind.startswith("LSTM") else ["h"]
    if kind in _CELL_KINDS:
        return _Plan(kind, own_input, dict.fromkeys(names, (hidden,)))
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
    return _Plan(
        kind,
        own_input,
        dict.fromkeys(names, (layers, hidden)),
        batch_first=bool(getattr(module, "batch_first", False)),
    )


def _check_names(plan: _Plan) -> None:
    names = [*plan.input_names, *plan.output_names]
    bad = [n for n in names if not _NAME_RE.match(n)]
    if bad:
        raise ValueError(f"invalid tensor names {bad}")
    if len(set(names)) != len(names):
        raise ValueError(
            f"tensor names must be distinct, got inputs {plan.input_names}, outputs {plan.output_names}"
        )


def _initial_states(
    plan: _Plan, initial_state: float | Mapping[str, InitialState] | None
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


def _describe(plan: _Plan, module: nn.Module, head: nn.Module | None) -> str:
    if plan.kind == _USER:
        what = type(module).__name__
    else:
        what = f"{plan.kind}(input_size={plan.input_size}, hidden_size={getattr(module, 'hidden_size', '?')}"
        if plan.kind in _SEQUENCE_KINDS:
            what += f", num_layers={getattr(module, 'num_layers', '?')}"
        what += ")"
    if head is not None:
        what += f" + {type(head).__name__} head"
    return f"{what}, one step per reading; exported by cellstream.export"


# --------------------------------------------------------------------------------------------
# the one-step wrapper and the export


def _step_wrapper(plan: _Plan, module: nn.Module, head: nn.Module | None) -> nn.Module:
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
            if kind == _USER:
                out = self.inner(x, *states)
                return tuple(out) if isinstance(out, tuple | list) else out
            if kind in _SEQUENCE_KINDS:
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


def _example_inputs(th: ModuleType, plan: _Plan, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = th.Generator().manual_seed(seed + 1)
    x = th.randn(batch, plan.input_size, generator=gen)
    states = [th.randn(batch, *shape, generator=gen) * 0.1 for shape in plan.state_shapes.values()]
    return (x, *states)


def _probe(plan: _Plan, step: nn.Module, example: tuple[torch.Tensor, ...]) -> tuple[int, ...]:
    """Run one eager step, to give clear errors before the tracer gives obscure ones."""
    batch = int(example[0].shape[0])
    try:
        out = step(*example)
    except TypeError as exc:
        if plan.kind != _USER:
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


def _torch_onnx_export(
    th: ModuleType,
    *,
    step: nn.Module,
    example: tuple[torch.Tensor, ...],
    target: Path,
    plan: _Plan,
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


# --------------------------------------------------------------------------------------------
# the self-check


@dataclass
class _Reference:
    ys: list[np.ndarray]
    """The answer at each step."""
    states: dict[str, np.ndarray]
    """Per state: ``[T, B, ...]`` when ``per_step``, else the final ``[B, ...]``."""
    per_step: bool


def _torch_reference(
    th: ModuleType,
    *,
    plan: _Plan,
    module: nn.Module,
    head: nn.Module | None,
    step: nn.Module,
    xs: np.ndarray,
    init: dict[str, np.ndarray],
) -> _Reference:
    """Run PyTorch over the whole check sequence.

    nn.GRU/LSTM/RNN run their OWN sequence forward over all steps at once, in their own layout
    (not through the wrapper), so the check also covers the wrapper's layout conversions; the
    sequence forward yields only the final states. Cells and user modules have no sequence
    forward, so they are stepped eagerly and every step's states are compared.
    """
    steps, batch = xs.shape[0], xs.shape[1]
    states0 = [th.from_numpy(np.broadcast_to(a, (batch, *a.shape)).copy()) for a in init.values()]
    if plan.kind in _SEQUENCE_KINDS:
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
        return _Reference(ys, {k: v.transpose(0, 1).numpy().copy() for k, v in final.items()}, per_step=False)

    ys = []
    per_step: dict[str, list[np.ndarray]] = {n: [] for n in plan.state_names}
    current = states0
    for t in range(steps):
        y, *current = step(th.from_numpy(xs[t]), *current)
        ys.append(y.numpy().copy())
        for name, s in zip(plan.state_names, current, strict=True):
            per_step[name].append(s.numpy().copy())
    return _Reference(ys, {n: np.stack(v) for n, v in per_step.items()}, per_step=True)


def _onnx_check(
    model: Path, plan: _Plan, xs: np.ndarray, init: dict[str, np.ndarray], ref: _Reference
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


def _check_graph_io(sess: Any, plan: _Plan) -> None:
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
