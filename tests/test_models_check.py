"""`cellstream models check`: the contract it prints, the fix it names, and rows that must not mix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from test_model_contract import write_cell

REPO = Path(__file__).resolve().parent.parent


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cellstream", "models", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_bundled_gru_directory_passes_and_prints_its_contract() -> None:
    result = check(REPO / "models" / "gru")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "model   gru version 1" in out
    assert "reading 'x' [8]" in out
    assert "state   'h' [64] -> next value in 'h_out'" in out
    assert "answer  'y' [1]" in out
    assert "opset   17" in out
    assert "ok: one step at batch 1 and 7" in out


def test_bundled_lstm_file_passes_with_its_config_pairs() -> None:
    result = check(REPO / "models" / "lstm" / "model.onnx")
    assert result.returncode == 0, result.stderr
    assert "state   'hidden' [32] -> next value in 'hidden_next'" in result.stdout
    assert "state   'cell' [32] -> next value in 'cell_next'" in result.stdout
    assert "answer  'prediction' [1]" in result.stdout


def test_versioned_directory_is_checked_at_its_highest_version(tmp_path: Path) -> None:
    write_cell(tmp_path / "cell" / "2")
    write_cell(tmp_path / "cell" / "10")
    result = check(tmp_path / "cell")
    assert result.returncode == 0, result.stderr
    assert "model   cell version 10" in result.stdout


@pytest.mark.parametrize(
    ("broken", "fix"),
    [
        (
            {"outputs": ("y", "h_next")},
            ["no state pair found", "'<state>_out'", '"states": {"h": "h_next"}'],
        ),
        ({"batch": 1}, ["fixed batch axis of 1", "dynamic_axes"]),
        ({"dtype": TensorProto.DOUBLE}, ["tensor(double)", "cast it to float"]),
        ({"extra_input": "z"}, ["cannot tell which input is the reading", "['x', 'z']", '"reading"']),
    ],
    ids=["missing-pair", "static-batch", "wrong-dtype", "two-readings"],
)
def test_unservable_model_exits_2_and_says_what_to_change(
    tmp_path: Path, broken: dict[str, object], fix: list[str]
) -> None:
    result = check(write_cell(tmp_path / "m", **broken))
    assert result.returncode == 2
    assert result.stderr.startswith("cannot be served: ")
    for phrase in fix:
        assert phrase in result.stderr
    assert result.stdout == ""


def test_missing_path_exits_2(tmp_path: Path) -> None:
    result = check(tmp_path / "nowhere")
    assert result.returncode == 2
    assert "no such file or directory" in result.stderr


def write_mixing_cell(path: Path) -> Path:
    """A cell whose answer adds the mean of the whole batch's readings: rows leak into each other."""
    rng = np.random.default_rng(0)
    f, h = 4, 3
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("MatMul", ["h", "U"], ["hu"]),
            helper.make_node("Add", ["xw", "hu"], ["pre"]),
            helper.make_node("Tanh", ["pre"], ["h_out"]),
            helper.make_node("MatMul", ["h_out", "V"], ["own"]),
            helper.make_node("ReduceMean", ["x"], ["batch_mean"], axes=[0, 1], keepdims=1),
            helper.make_node("Add", ["own", "batch_mean"], ["y"]),
        ],
        "mixing",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", f]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", h]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["batch", h]),
        ],
        [
            numpy_helper.from_array(rng.normal(size=(f, h)).astype(np.float32), "W"),
            numpy_helper.from_array(rng.normal(size=(h, h)).astype(np.float32), "U"),
            numpy_helper.from_array(rng.normal(size=(h, 1)).astype(np.float32), "V"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.mkdir(parents=True)
    onnx.save(model, path / "model.onnx")
    return path / "model.onnx"


def test_model_mixing_batch_rows_loads_but_fails_the_check(tmp_path: Path) -> None:
    result = check(write_mixing_cell(tmp_path / "mixing"))
    assert result.returncode == 1, result.stderr
    assert "answer  'y' [1]" in result.stdout  # the contract itself is fine...
    assert "FAILED: batch rows are not independent" in result.stdout  # ...the batch is not
    assert "output 'y'" in result.stdout
    assert "remove every operation across the batch axis 0" in result.stdout
