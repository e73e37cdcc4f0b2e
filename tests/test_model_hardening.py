"""Hostile model files: one too big is refused by its size before it is read, and one whose nodes
need a custom-op library (never loaded) is refused with one line naming the op and its domain."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from test_model_contract import write_cell

REPO = Path(__file__).resolve().parent.parent


def cellstream(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cellstream", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("CELLSTREAM_")},
    )


def serve(repo: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return cellstream(
        "serve",
        "--models",
        str(repo),
        "--address",
        "127.0.0.1:0",
        "--metrics-address",
        "127.0.0.1:0",
        "--ready-file",
        str(tmp_path / "ready.json"),
        *extra,
    )


def one_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("cellstream: cannot serve: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def write_custom_op(directory: Path) -> Path:
    """y = h_out = MyOp(x, h) in domain evil.ops: runnable only with a custom-op library."""
    node = helper.make_node("MyOp", ["x", "h"], ["h_out"], domain="evil.ops")
    copy = helper.make_node("Identity", ["h_out"], ["y"])
    graph = helper.make_graph(
        [node, copy],
        "cell",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", 4]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["batch", 4]),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("evil.ops", 1)]
    )
    directory.mkdir(parents=True)
    path = directory / "model.onnx"
    onnx.save(model, str(path))
    return path


def test_check_refuses_a_model_over_max_model_bytes_naming_size_and_limit(tmp_path: Path) -> None:
    path = write_cell(tmp_path / "cell")
    size = path.stat().st_size
    result = cellstream("models", "check", "--max-model-bytes", "100", str(path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("cannot be served: ")
    assert f"is {size} bytes, over the limit of 100 bytes" in result.stderr
    assert "--max-model-bytes" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stdout == ""


def test_check_takes_a_model_within_max_model_bytes(tmp_path: Path) -> None:
    path = write_cell(tmp_path / "cell")
    result = cellstream("models", "check", "--max-model-bytes", str(path.stat().st_size), str(path))
    assert result.returncode == 0, result.stderr


def test_serve_refuses_a_model_over_max_model_bytes_in_one_line(tmp_path: Path) -> None:
    path = write_cell(tmp_path / "repo" / "cell")
    error = one_error(serve(tmp_path / "repo", tmp_path, "--max-model-bytes", "100"))
    assert f"{path}: is {path.stat().st_size} bytes, over the limit of 100 bytes" in error


def test_the_limit_also_comes_from_the_environment(tmp_path: Path) -> None:
    write_cell(tmp_path / "repo" / "cell")
    result = subprocess.run(
        [sys.executable, "-m", "cellstream", "serve", "--models", str(tmp_path / "repo")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "CELLSTREAM_MAX_MODEL_BYTES": "0"},
    )
    assert result.returncode == 2
    assert "CELLSTREAM_MAX_MODEL_BYTES" in result.stderr


def test_custom_domain_op_is_refused_naming_op_and_domain(tmp_path: Path) -> None:
    path = write_custom_op(tmp_path / "repo" / "evil")
    result = cellstream("models", "check", str(path))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert "onnxruntime cannot load it" in result.stderr
    assert "MyOp" in result.stderr and "evil.ops" in result.stderr
    error = one_error(serve(tmp_path / "repo", tmp_path))
    assert "MyOp" in error and "evil.ops" in error


def test_readme_documents_max_model_bytes() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "| `--max-model-bytes` | `CELLSTREAM_MAX_MODEL_BYTES` | `1073741824` |" in readme
