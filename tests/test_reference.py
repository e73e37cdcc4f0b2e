"""Self-test of the bundled models and of tests/reference.py.

If these pass, the three references (ONNX sequence operators, float64 numpy, and the cell
``model.onnx`` stepped by onnxruntime) agree, so the models are correct cells and the server's
tests can trust ``reference_sequence``.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from reference import load_cell, numpy_sequence, reference_sequence, state_names

MODELS = Path(__file__).resolve().parent.parent / "models"
NAMES = ["gru", "lstm", "gru2"]
STEPS = 300
TOL = 1e-5


def _readings(seed: int, steps: int = STEPS) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).standard_normal((steps, 8)).astype(np.float32)


def _max_err(a: tuple[Any, list[dict[str, Any]]], b: tuple[Any, list[dict[str, Any]]]) -> float:
    err = float(np.max(np.abs(a[0] - b[0])))
    for sa, sb in zip(a[1], b[1], strict=True):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].shape == sb[k].shape and sa[k].dtype == np.float32 and sb[k].dtype == np.float32
            err = max(err, float(np.max(np.abs(sa[k] - sb[k]))))
    return err


def _pairing(model_dir: Path, sess: ort.InferenceSession) -> tuple[str, dict[str, str], str]:
    """(reading, state input -> state output, answer) per the server contract: config.json or `_out`."""
    cfg_path = model_dir / "config.json"
    cfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    ins = [i.name for i in sess.get_inputs()]
    outs = [o.name for o in sess.get_outputs()]
    states: dict[str, str] = cfg.get("states") or {i: f"{i}_out" for i in ins if f"{i}_out" in outs}
    reading = cfg.get("reading") or next(i for i in ins if i not in states)
    output = cfg.get("output") or next(o for o in outs if o not in states.values())
    return reading, states, output


def _step_cell(
    model_dir: Path, xs: npt.NDArray[np.float32], start: dict[str, npt.NDArray[np.float32]]
) -> tuple[Any, list[dict[str, Any]]]:
    """Step the cell model.onnx over readings [T, B, F] for B streams at once, feeding state back."""
    sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    reading, pairs, output = _pairing(model_dir, sess)
    state = {k: v.astype(np.float32) for k, v in start.items()}
    out_names = [o.name for o in sess.get_outputs()]
    ys, hist = [], []
    for x in xs:
        res = dict(zip(out_names, sess.run(None, {reading: x, **state}), strict=True))
        state = {s: res[o] for s, o in pairs.items()}
        ys.append(res[output])
        hist.append(state)
    return np.stack(ys), hist


@pytest.mark.parametrize("name", NAMES)
def test_operator_reference_matches_numpy(name: str) -> None:
    xs = _readings(1)
    err = _max_err(reference_sequence(MODELS / name, xs), numpy_sequence(MODELS / name, xs))
    print(f"{name}: |onnx-op - numpy| = {err:.2e}", file=sys.stderr)
    assert err < TOL


@pytest.mark.parametrize("name", NAMES)
def test_cell_model_matches_reference(name: str) -> None:
    """Three streams through the cell together (batch 3): each must match its own reference."""
    model_dir = MODELS / name
    cell = load_cell(model_dir)
    rng = np.random.default_rng(2)
    xs = np.stack([_readings(10 + b) for b in range(3)], axis=1)  # [T, 3, F]
    # Stream 0 starts from the default state, streams 1-2 from random ones.
    starts = [dict(cell.initial)] + [
        {s: rng.uniform(-0.5, 0.5, cell.initial[s].shape).astype(np.float32) for s in state_names(cell)}
        for _ in range(2)
    ]
    ys, hist = _step_cell(model_dir, xs, {s: np.stack([st[s] for st in starts]) for s in state_names(cell)})
    worst = 0.0
    for b, start in enumerate(starts):
        got = (ys[:, b, :], [{s: h[s][b] for s in h} for h in hist])
        worst = max(worst, _max_err(got, reference_sequence(model_dir, xs[:, b, :], start)))
    print(f"{name}: |cell model - onnx-op| = {worst:.2e}", file=sys.stderr)
    assert worst < TOL


@pytest.mark.parametrize("name", NAMES)
def test_state_matters_and_outputs_are_not_saturated(name: str) -> None:
    """Guards the test value of the models: a server that dropped or mixed up state must fail."""
    model_dir = MODELS / name
    cell = load_cell(model_dir)
    xs = _readings(3, 100)
    ys, states = reference_sequence(model_dir, xs)
    assert ys.shape == (100, 1) and ys.dtype == np.float32
    assert float(np.std(ys)) > 0.05
    for s in state_names(cell):
        assert states[-1][s].shape == cell.state_shape(s)
        assert float(np.mean(np.abs(np.stack([st[s] for st in states])) > 0.99)) < 0.05
    # Stepping each reading from the start state (state dropped) must change outputs visibly.
    fresh = np.concatenate([reference_sequence(model_dir, xs[t : t + 1])[0] for t in range(20)])
    assert float(np.max(np.abs(fresh - ys[:20]))) > 1e-2


def test_initial_state_from_config(tmp_path: Path) -> None:
    """The reference honours config.json initial_state (scalar fill and nested list)."""
    model_dir = tmp_path / "lstm"
    model_dir.mkdir()
    (model_dir / "model.onnx").write_bytes((MODELS / "lstm" / "model.onnx").read_bytes())
    cfg = json.loads((MODELS / "lstm" / "config.json").read_text())
    cfg["initial_state"] = {"hidden": 0.25, "cell": [[0.1 * (i % 3)] for i in range(32)]}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="initial_state"):
        load_cell(model_dir)  # [32, 1] is not the per-stream shape [32]
    cfg["initial_state"]["cell"] = [0.1 * (i % 3) for i in range(32)]
    (model_dir / "config.json").write_text(json.dumps(cfg))
    start = load_cell(model_dir).initial
    assert np.all(start["hidden"] == np.float32(0.25)) and start["cell"][1] == np.float32(0.1)
    xs = _readings(4, 50)
    explicit = reference_sequence(MODELS / "lstm", xs, start)
    assert _max_err(reference_sequence(model_dir, xs), explicit) == 0.0
    assert _max_err(numpy_sequence(model_dir, xs), explicit) < TOL


def test_generator_is_deterministic(tmp_path: Path) -> None:
    """The checked-in models are exactly what models/make_models.py writes."""
    # run_path, not import: an import would leave models/__pycache__/ in the model repository.
    make_models = runpy.run_path(str(MODELS / "make_models.py"), run_name="make_models")
    make_models["write_all"](tmp_path)
    for name in NAMES:
        assert (tmp_path / name / "model.onnx").read_bytes() == (MODELS / name / "model.onnx").read_bytes()
    assert (tmp_path / "lstm" / "config.json").read_text() == (MODELS / "lstm" / "config.json").read_text()
