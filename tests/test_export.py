"""Tests for cellstream.export: PyTorch recurrent modules -> one-step ONNX cells.

Besides export_torch's own self-check, every round trip here loads the written model.onnx and
config.json with onnxruntime, steps it the way the server does (state fed back, batch first,
initial state from config.json) and compares with PyTorch, so a bug in the self-check cannot
hide a bug in the export.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip(
    "torch",
    reason="exporting needs PyTorch, an optional extra (pip install 'cellstream[torch]'); serving does not",
)
pytest.importorskip("onnx", reason="torch's ONNX exporter needs onnx (pip install 'cellstream[torch]')")

import torch
from torch import nn

from cellstream.export import ExportCheckError, ExportReport, export_torch
from cellstream.model import ModelRepository

SERVICE_DIR = Path(__file__).resolve().parents[1] / "service"
TOL = 1e-5  # what we expect in practice; export_torch's own limit is 1e-4


# --------------------------------------------------------------------------------------------
# an independent runner for the written files, as the server would use them


def load_model(directory: Path) -> tuple[ort.InferenceSession, dict[str, Any]]:
    config = json.loads((directory / "config.json").read_text())
    sess = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess, config


def initial_states(sess: ort.InferenceSession, config: dict[str, Any], batch: int) -> dict[str, np.ndarray]:
    shapes = {i.name: i.shape[1:] for i in sess.get_inputs()}
    out = {}
    for name in config["states"]:
        value = np.asarray(config["initial_state"].get(name, 0.0), dtype=np.float32)
        per_stream = np.full(shapes[name], float(value), np.float32) if value.ndim == 0 else value
        out[name] = np.broadcast_to(per_stream, (batch, *per_stream.shape)).copy()
    return out


def run_onnx(directory: Path, xs: np.ndarray) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """Step the written model over xs [T, B, F]; return every answer and the final states."""
    sess, config = load_model(directory)
    states = initial_states(sess, config, xs.shape[1])
    state_in = list(config["states"])
    outputs = [config["output"], *(config["states"][n] for n in state_in)]
    ys = []
    for x in xs:
        y, *new = sess.run(outputs, {config["reading"]: x, **states})
        ys.append(y)
        states = dict(zip(state_in, new, strict=True))
    return ys, states


def assert_contract(directory: Path, report: ExportReport) -> None:
    """Every input/output float32 with symbolic batch axis 0; config pairs states with outputs."""
    sess, config = load_model(directory)
    assert config["reading"] == report.reading
    assert config["output"] == report.output
    assert config["states"] == {s: f"{s}_out" for s in report.state_shapes}
    inputs = {i.name: i for i in sess.get_inputs()}
    outputs = {o.name: o for o in sess.get_outputs()}
    assert set(inputs) == {config["reading"], *config["states"]}
    assert set(outputs) == {config["output"], *config["states"].values()}
    for arg in [*inputs.values(), *outputs.values()]:
        assert arg.type == "tensor(float)", arg
        assert arg.shape[0] == "batch", arg
    assert inputs[config["reading"]].shape[1:] == [report.input_size]
    for s, shape in report.state_shapes.items():
        assert tuple(inputs[s].shape[1:]) == shape
        assert tuple(outputs[config["states"][s]].shape[1:]) == shape


def readings(steps: int, batch: int, features: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((steps, batch, features)).astype(np.float32)


def torch_sequence(module: nn.RNNBase, head: nn.Module | None, xs: np.ndarray) -> tuple[np.ndarray, Any]:
    """The module's own sequence forward from zero state; answers as [T, B, ...]."""
    with torch.no_grad():
        seq = torch.from_numpy(xs)
        if module.batch_first:
            seq = seq.transpose(0, 1)
        out, state = module(seq)
        if module.batch_first:
            out = out.transpose(0, 1)
        ys = head(out) if head is not None else out
    return ys.numpy(), state


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


# --------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("batch_first", [False, True])
def test_gru_round_trip(tmp_path: Path, batch_first: bool) -> None:
    gru = nn.GRU(5, 8, batch_first=batch_first)
    report = export_torch(gru, tmp_path / "m", max_batch=64, version="3", description="test gru")

    assert report.model_path == tmp_path / "m" / "model.onnx"
    assert report.config_path == tmp_path / "m" / "config.json"
    assert report.kind == "GRU"
    assert report.state_shapes == {"h": (1, 8)}
    assert report.output_shape == (8,)
    assert report.max_abs_error < TOL
    assert set(report.errors) == {"y", "h_out"}
    config = json.loads(report.config_path.read_text())
    assert config == {
        "reading": "x",
        "states": {"h": "h_out"},
        "output": "y",
        "initial_state": {"h": 0.0},
        "max_batch": 64,
        "version": "3",
        "description": "test gru",
    }
    assert config == report.config
    assert_contract(tmp_path / "m", report)

    xs = readings(30, 4, 5)
    ys, states = run_onnx(tmp_path / "m", xs)
    want_ys, h_n = torch_sequence(gru, None, xs)
    np.testing.assert_allclose(np.stack(ys), want_ys, atol=TOL)
    np.testing.assert_allclose(states["h"], h_n.transpose(0, 1).numpy(), atol=TOL)


@pytest.mark.parametrize("batch_first", [False, True])
def test_lstm_round_trip(tmp_path: Path, batch_first: bool) -> None:
    lstm = nn.LSTM(4, 6, num_layers=2, batch_first=batch_first)
    report = export_torch(lstm, tmp_path)
    assert report.state_shapes == {"h": (2, 6), "c": (2, 6)}
    assert report.states == {"h": "h_out", "c": "c_out"}
    assert report.max_abs_error < TOL
    assert_contract(tmp_path, report)

    xs = readings(25, 3, 4)
    ys, states = run_onnx(tmp_path, xs)
    want_ys, (h_n, c_n) = torch_sequence(lstm, None, xs)
    np.testing.assert_allclose(np.stack(ys), want_ys, atol=TOL)
    # cellstream layout [B, num_layers, H] vs PyTorch's [num_layers, B, H], layer by layer
    for layer in range(2):
        np.testing.assert_allclose(states["h"][:, layer], h_n[layer].numpy(), atol=TOL)
        np.testing.assert_allclose(states["c"][:, layer], c_n[layer].numpy(), atol=TOL)


@pytest.mark.parametrize("batch_first", [False, True])
def test_two_layer_gru_with_linear_head(tmp_path: Path, batch_first: bool) -> None:
    gru = nn.GRU(3, 16, num_layers=2, batch_first=batch_first, dropout=0.5)
    head = nn.Linear(16, 2)
    gru.train()  # dropout on: the export must still run in eval mode, then restore this
    report = export_torch(gru, tmp_path / "model.onnx", head=head)

    assert gru.training and head.training
    assert report.model_path == tmp_path / "model.onnx"
    assert report.config_path == tmp_path / "config.json"
    assert report.state_shapes == {"h": (2, 16)}
    assert report.output_shape == (2,)
    assert report.max_abs_error < TOL
    assert "GRU(input_size=3, hidden_size=16, num_layers=2) + Linear head" in report.config["description"]
    assert_contract(tmp_path, report)

    gru.eval()
    xs = readings(40, 1, 3)  # batch 1: neither the trace's nor the self-check's batch size
    ys, states = run_onnx(tmp_path, xs)
    want_ys, h_n = torch_sequence(gru, head, xs)
    np.testing.assert_allclose(np.stack(ys), want_ys, atol=TOL)
    np.testing.assert_allclose(states["h"], h_n.transpose(0, 1).numpy(), atol=TOL)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_rnn_round_trip(tmp_path: Path, nonlinearity: str) -> None:
    rnn = nn.RNN(4, 7, num_layers=3, nonlinearity=nonlinearity)
    report = export_torch(rnn, tmp_path, head=nn.Sequential(nn.Linear(7, 3), nn.Tanh()))
    assert report.kind == "RNN"
    assert report.state_shapes == {"h": (3, 7)}
    assert report.max_abs_error < TOL
    assert_contract(tmp_path, report)


def test_nonzero_initial_state_is_written_and_used(tmp_path: Path) -> None:
    gru = nn.GRU(2, 3, num_layers=2)
    h0 = [[0.5, -0.25, 0.0], [1.0, 0.0, -1.0]]
    report = export_torch(gru, tmp_path, initial_state={"h": h0})
    assert report.config["initial_state"] == {"h": h0}
    assert report.max_abs_error < TOL

    xs = readings(10, 2, 2)
    ys, _ = run_onnx(tmp_path, xs)  # starts from config.json's initial_state
    with torch.no_grad():
        start = torch.tensor(h0).unsqueeze(1).expand(2, 2, 3).contiguous()  # [layers, B, H]
        out, _ = gru(torch.from_numpy(xs), start)
    np.testing.assert_allclose(np.stack(ys), out.numpy(), atol=TOL)


@pytest.mark.parametrize(
    ("cell", "states"),
    [
        (lambda: nn.GRUCell(5, 6), ["h"]),
        (lambda: nn.LSTMCell(5, 6), ["h", "c"]),
        (lambda: nn.RNNCell(5, 6, nonlinearity="relu"), ["h"]),
    ],
    ids=["GRUCell", "LSTMCell", "RNNCell"],
)
def test_cells_round_trip(tmp_path: Path, cell: Callable[[], nn.Module], states: list[str]) -> None:
    module = cell()
    head = nn.Linear(6, 1)
    report = export_torch(module, tmp_path, head=head, initial_state=0.1)
    assert report.kind == type(module).__name__
    assert report.state_shapes == dict.fromkeys(states, (6,))
    assert report.config["initial_state"] == dict.fromkeys(states, pytest.approx(0.1))
    assert report.max_abs_error < TOL
    assert_contract(tmp_path, report)

    xs = readings(20, 3, 5)
    ys, got = run_onnx(tmp_path, xs)
    with torch.no_grad():
        current = [torch.full((3, 6), 0.1) for _ in states]
        for t, x in enumerate(xs):
            if len(states) == 2:
                current = list(module(torch.from_numpy(x), tuple(current)))
            else:
                current = [module(torch.from_numpy(x), current[0])]
            np.testing.assert_allclose(ys[t], head(current[0]).numpy(), atol=TOL)
    for name, value in zip(states, current, strict=True):
        np.testing.assert_allclose(got[name], value.numpy(), atol=TOL)


class TwoStateModel(nn.Module):
    """A user cell with a rank-2 state and a rank-1 state and a 2-d answer."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.GRUCell(4, 6)
        self.mix = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, mem: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.cell(x, mem[:, 0])
        mem = torch.stack([h, torch.tanh(self.mix(mem[:, 1]) + h)], dim=1)  # [B, 2, 6]
        count = count + 1.0
        y = mem * count[:, :1, None]  # [B, 2, 6]
        return y, mem, count


def test_user_module_round_trip(tmp_path: Path) -> None:
    model = TwoStateModel()
    report = export_torch(
        model,
        tmp_path,
        input_size=4,
        state_shapes={"mem": (2, 6), "count": (1,)},
        reading_name="reading",
        output_name="answer",
    )
    assert report.kind == "module"
    assert report.states == {"mem": "mem_out", "count": "count_out"}
    assert report.output_shape == (2, 6)
    assert report.max_abs_error < TOL
    assert_contract(tmp_path, report)

    xs = readings(15, 2, 4)
    ys, states = run_onnx(tmp_path, xs)
    with torch.no_grad():
        mem, count = torch.zeros(2, 2, 6), torch.zeros(2, 1)
        for t, x in enumerate(xs):
            y, mem, count = model(torch.from_numpy(x), mem, count)
            np.testing.assert_allclose(ys[t], y.numpy(), atol=TOL)
    np.testing.assert_allclose(states["count"], np.full((2, 1), 15.0))
    np.testing.assert_allclose(states["mem"], mem.numpy(), atol=TOL)


def test_existing_files_are_replaced(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"stale")
    (tmp_path / "config.json").write_text("{}")
    export_torch(nn.GRUCell(2, 2), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["states"] == {"h": "h_out"}
    assert_contract(tmp_path, export_torch(nn.GRUCell(2, 2), tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.onnx"]


# --------------------------------------------------------------------------------------------
# rejections and failed checks


@pytest.mark.parametrize(
    ("module", "match"),
    [
        (lambda: nn.GRU(3, 4, bidirectional=True), "bidirectional"),
        (lambda: nn.LSTM(3, 4, bidirectional=True, num_layers=2), "bidirectional"),
        (lambda: nn.LSTM(3, 4, proj_size=2), "proj_size"),
    ],
    ids=["bi-GRU", "bi-LSTM", "proj-LSTM"],
)
def test_unsupported_modules_are_rejected(
    tmp_path: Path, module: Callable[[], nn.Module], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        export_torch(module(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


class GrowsState(nn.Module):
    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, torch.cat([h, x], dim=1)


class ReturnsOne(nn.Module):
    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return x + h


def test_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="input_size=4 but"):
        export_torch(nn.GRU(3, 4), tmp_path, input_size=4)
    with pytest.raises(ValueError, match="state_shapes"):
        export_torch(TwoStateModel(), tmp_path, input_size=4)
    with pytest.raises(ValueError, match="head"):
        export_torch(
            TwoStateModel(),
            tmp_path,
            input_size=4,
            state_shapes={"mem": (2, 6), "count": (1,)},
            head=nn.Identity(),
        )
    with pytest.raises(ValueError, match=r"new state 'h' has per-stream shape \(6,\); its input has \(3,\)"):
        export_torch(GrowsState(), tmp_path, input_size=3, state_shapes={"h": (3,)})
    with pytest.raises(ValueError, match="state_shapes must list every state"):
        export_torch(TwoStateModel(), tmp_path, input_size=4, state_shapes={"mem": (2, 6)})
    with pytest.raises(ValueError, match=r"must return \(y, h\): 2 tensors, got Tensor"):
        export_torch(ReturnsOne(), tmp_path, input_size=3, state_shapes={"h": (3,)})
    with pytest.raises(ValueError, match="shape"):
        export_torch(nn.GRU(3, 4, num_layers=2), tmp_path, initial_state={"h": [0.0] * 4})
    with pytest.raises(ValueError, match="unknown states"):
        export_torch(nn.GRU(3, 4), tmp_path, initial_state={"c": 0.0})
    with pytest.raises(ValueError, match="float32"):
        export_torch(nn.GRU(3, 4).double(), tmp_path)
    with pytest.raises(ValueError, match="distinct"):
        export_torch(nn.GRU(3, 4), tmp_path, output_name="h")
    assert list(tmp_path.iterdir()) == []


class ValueBranching(nn.Module):
    """Branches in Python on a tensor value: tracing records one branch, eager takes both."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.lin(x) + h) if float(x.sum()) > 0 else torch.tanh(self.lin(x) - h)
        return h.sum(dim=1, keepdim=True), h


class Noisy(nn.Module):
    """Draws random numbers: onnxruntime's draws are not torch's."""

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = 0.5 * h + x[:, :4] + torch.rand_like(h)
        return h, h


@pytest.mark.parametrize("module", [ValueBranching, Noisy])
def test_mismatching_export_fails_the_check(tmp_path: Path, module: type[nn.Module]) -> None:
    target = tmp_path / "out"
    with pytest.raises(ExportCheckError, match="disagrees with PyTorch") as info:
        export_torch(
            module(), target, input_size=3 if module is ValueBranching else 4, state_shapes={"h": (4,)}
        )
    assert info.value.max_abs_error > 1e-4
    assert info.value.where in {"y", "h_out"}
    assert not target.exists()  # nothing half-checked is left for a server to pick up


def test_failed_check_keeps_previous_export(tmp_path: Path) -> None:
    export_torch(nn.GRUCell(4, 4), tmp_path)
    before = (tmp_path / "model.onnx").read_bytes()
    with pytest.raises(ExportCheckError):
        export_torch(Noisy(), tmp_path, input_size=4, state_shapes={"h": (4,)})
    assert (tmp_path / "model.onnx").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.onnx"]


def test_unused_input_fails_the_check(tmp_path: Path) -> None:
    class IgnoresReading(nn.Module):
        def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return h + 1.0, h + 1.0

    with pytest.raises(ExportCheckError, match="lacks"):
        export_torch(IgnoresReading(), tmp_path / "out", input_size=2, state_shapes={"h": (2,)})


# --------------------------------------------------------------------------------------------
# import hygiene


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SERVICE_DIR), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_import_does_not_need_torch() -> None:
    result = _python(
        """
        import sys
        sys.modules["torch"] = None  # as if torch were not installed
        import cellstream.export as ex
        try:
            ex.export_torch(object(), "unused")
        except ImportError as exc:
            print("IMPORT-ERROR:", exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "IMPORT-ERROR:" in result.stdout
    assert "pip install 'cellstream[torch]'" in result.stdout


def test_import_does_not_load_torch_or_the_server() -> None:
    result = _python(
        """
        import sys
        import cellstream.export
        print(sorted(m for m in sys.modules if m == "torch" or m.startswith("cellstream.")))
        """
    )
    assert result.returncode == 0, result.stderr
    loaded = ast.literal_eval(result.stdout.strip())
    assert "torch" not in loaded
    assert all(m == "cellstream.export" or m.startswith("cellstream.tools") for m in loaded), loaded


# --------------------------------------------------------------------------------------------
# the server's own loader accepts what export_torch writes


def test_server_loader_accepts_export(tmp_path: Path) -> None:
    gru = nn.GRU(6, 10, num_layers=2, batch_first=True)
    head = nn.Linear(10, 3)
    export_torch(gru, tmp_path / "gru2" / "4", head=head, initial_state=0.25, max_batch=32)
    export_torch(nn.LSTMCell(6, 5), tmp_path / "cell")
    repo = ModelRepository(tmp_path)

    cell = repo.models["cell"]
    assert (cell.reading, cell.output, cell.input_size, cell.output_size) == ("x", "y", 6, 5)
    assert [(s.name, s.output, s.shape) for s in cell.states] == [("c", "c_out", (5,)), ("h", "h_out", (5,))]

    model = repo.models["gru2"]
    assert (model.version, model.config_max_batch, model.output_size) == ("4", 32, 3)
    (spec,) = model.states
    assert (spec.name, spec.output, spec.shape) == ("h", "h_out", (2, 10))
    xs = readings(12, 2, 6)
    state = np.stack([spec.initial] * 2)
    ys = []
    for x in xs:
        y, (state,) = model.run(x, [state])
        ys.append(y)
    with torch.no_grad():
        out, h_n = gru(torch.from_numpy(xs).transpose(0, 1), torch.full((2, 2, 10), 0.25))
        want = head(out.transpose(0, 1))
    np.testing.assert_allclose(np.stack(ys), want.numpy(), atol=TOL)
    np.testing.assert_allclose(state, h_n.transpose(0, 1).numpy(), atol=TOL)
