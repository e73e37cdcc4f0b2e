"""`cellstream models check PATH`: load a model as the server would, say what it found or what to fix.

Loading proves the contract (names, float32, dynamic batch axis, state pairs). It does not prove
that batch rows are independent, which the server relies on when it runs many streams in one
call: a model that mixes rows (a mean over the batch axis, a batch-norm in training mode) gives
each stream answers that depend on which other streams happened to share its batch. So the check
also runs one step at batch 1 and at batch 7 and compares each row with the same row alone.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellstream.config import Settings

if TYPE_CHECKING:
    import numpy as np

    from cellstream.model import CellModel

CHECK_BATCH = 7
TOLERANCE = 1e-5
EXIT_UNSERVABLE = 2
EXIT_ROWS_MIX = 1


def register(commands: Any) -> None:
    """Add `check` to the `cellstream models` sub-commands (argparse's sub-parsers object)."""
    parser = commands.add_parser(
        "check",
        help="check that a model can be served: its contract, and that batch rows are independent",
        description="Load a model.onnx (or a model directory) as the server would, print the contract "
        "it found, then run one step at batch 1 and batch 7 and check each row is independent of "
        "the others. Exit 0: servable; 1: rows are not independent; 2: it cannot be served.",
    )
    parser.add_argument("path", type=Path, help="a model.onnx file, or a model directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random readings and states")
    parser.add_argument(
        "--max-batch",
        type=_positive,
        default=Settings.max_batch,
        help="the server's --max-batch, which caps a config.json max_batch above it "
        f"(default {Settings.max_batch}, the server's default)",
    )
    parser.add_argument(
        "--max-model-bytes",
        type=_positive,
        default=Settings.max_model_bytes,
        help="the server's --max-model-bytes: a bigger model (model.onnx and its external data files) "
        f"is refused before it is read (default {Settings.max_model_bytes})",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from cellstream.errors import ModelLoadError  # noqa: PLC0415 - keep `cellstream --help` fast

    try:
        model = load(args.path, max_model_bytes=args.max_model_bytes)
    except ModelLoadError as exc:
        print(f"cannot be served: {exc}", file=sys.stderr)
        return EXIT_UNSERVABLE
    print(describe(model, max_batch=args.max_batch))
    try:
        result = check_rows(model, seed=args.seed)
    except Exception as exc:  # onnxruntime raises its own types; any of them means "not servable"
        print(
            f"cannot be served: {model.path}: a step at batch 1 or {CHECK_BATCH} failed: {exc}",
            file=sys.stderr,
        )
        return EXIT_UNSERVABLE
    print(result.summary())
    return 0 if result.independent else EXIT_ROWS_MIX


def load(path: Path, *, max_model_bytes: int = Settings.max_model_bytes) -> CellModel:
    """The model the server would load from `path` (a model.onnx, or a directory holding one)."""
    from cellstream.errors import ModelLoadError  # noqa: PLC0415
    from cellstream.model import MODEL_FILE, CellModel, find_model_file  # noqa: PLC0415

    if path.is_dir():
        model_file, version = find_model_file(path)
        return CellModel(model_file, name=path.name, version=version, max_model_bytes=max_model_bytes)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file or directory")
    version_dir = path.parent.name
    if version_dir.isascii() and version_dir.isdigit():  # <repo>/<name>/<version>/model.onnx
        return CellModel(
            path, name=path.parent.parent.name, version=version_dir, max_model_bytes=max_model_bytes
        )
    if path.name == MODEL_FILE:
        find_model_file(path.parent)  # refuses a model.onnx beside version directories, as the server does
    return CellModel(path, max_model_bytes=max_model_bytes)


def opset_of(path: Path) -> str:
    """The default-domain opset, read with onnx when it is installed (the server does not need it)."""
    try:
        import onnx  # noqa: PLC0415
    except ImportError:
        return "unknown (install onnx to read it)"
    proto = onnx.load(str(path), load_external_data=False)
    versions = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    return f"{versions[0]} (IR version {proto.ir_version})" if versions else "unknown"


def _relative(data_file: Path, model_file: Path) -> str:
    """A data file as the model names it: under the model's directory (checked when it loaded)."""
    return data_file.relative_to(model_file.parent.resolve()).as_posix()


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def describe(model: CellModel, *, max_batch: int = Settings.max_batch) -> str:
    """The contract the server would serve; `max_batch` is the server's, which caps the config's."""
    states = "\n".join(
        f"  state   {s.name!r} {list(s.shape)} -> next value in {s.output!r}" for s in model.states
    )
    lines = [
        f"model   {model.name} version {model.version}  ({model.path})",
        f"  reading {model.reading!r} [{model.input_size}]",
        states,
        f"  answer  {model.output!r} [{model.output_size}]",
        f"  opset   {opset_of(model.path)}",
        f"  sha256  {model.sha256[:16]}",
        *(f"  data    {_relative(p, model.path)!r} (external data)" for p in model.data_files),
    ]
    if model.config_max_batch is not None and model.config_max_batch > max_batch:
        lines.append(
            f"  max_batch {model.config_max_batch} in config.json is capped at the server's --max-batch "
            f"{max_batch}: at most {max_batch} streams run at once"
        )
    elif model.config_max_batch is not None:
        lines.append(f"  max_batch {model.config_max_batch}")
    if model.description:
        lines.append(f"  description: {model.description}")
    return "\n".join(lines)


@dataclass(frozen=True)
class RowCheck:
    """How far each row of a batch strays from the same row run alone."""

    batch: int
    worst: float
    """Largest |batch row - single row| over every row and output, relative to max(1, |single|)."""
    where: str
    """The output and row where that happened."""

    @property
    def independent(self) -> bool:
        return self.worst <= TOLERANCE

    def summary(self) -> str:
        if self.independent:
            return (
                f"ok: one step at batch 1 and {self.batch}: each row equals the same row run alone "
                f"(max difference {self.worst:.1e} <= {TOLERANCE:g})"
            )
        return (
            f"FAILED: batch rows are not independent: at batch {self.batch}, {self.where} differs from "
            f"the same row run alone by {self.worst:.3g} (tolerance {TOLERANCE:g}). The server runs many "
            "streams in one batch, so each stream's answer would depend on the others: remove every "
            "operation across the batch axis 0 (a reduction, a batch-norm in training mode, a reshape "
            "that folds the batch into another axis)."
        )


def check_rows(model: CellModel, *, seed: int = 0, batch: int = CHECK_BATCH) -> RowCheck:
    """Run random readings and states at `batch` and row by row at batch 1; compare every output."""
    import numpy as np  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, model.input_size)).astype(np.float32)
    states = [rng.standard_normal((batch, *s.shape)).astype(np.float32) for s in model.states]
    y, next_states = model.run(x, states)
    names = [model.output, *(s.output for s in model.states)]
    together = [y, *next_states]
    worst, where = 0.0, "nothing"
    for row in range(batch):
        y1, next1 = model.run(x[row : row + 1], [s[row : row + 1] for s in states])
        for name, many, alone in zip(names, together, [y1, *next1], strict=True):
            diff = _relative_difference(many[row], alone[0])
            if diff > worst:
                worst, where = diff, f"output {name!r} row {row}"
    return RowCheck(batch, worst, where)


def _relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    import numpy as np  # noqa: PLC0415

    if a.shape != b.shape:
        return float("inf")
    scale = np.maximum(1.0, np.abs(b))
    diff = float(np.max(np.abs(a - b) / scale)) if a.size else 0.0
    return float("inf") if math.isnan(diff) else diff  # NaN anywhere counts as the worst
