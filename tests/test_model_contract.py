"""Model discovery: the naming convention, config.json, versions, and load errors that say what to fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cellstream.errors import ModelLoadError
from cellstream.model import CellModel, ModelRepository

F, H = 4, 3


def write_cell(
    directory: Path,
    *,
    inputs: tuple[str, ...] = ("x", "h"),
    outputs: tuple[str, ...] = ("y", "h_out"),
    batch: int | str = "batch",
    dtype: int = TensorProto.FLOAT,
    extra_input: str | None = None,
    config: dict[str, object] | None = None,
) -> Path:
    """h' = tanh(x W + h U), y = h' V: a tiny real cell with names and types under the test's control."""
    rng = np.random.default_rng(0)
    x_name, h_name = inputs
    y_name, h_out_name = outputs
    np_type = np.float64 if dtype == TensorProto.DOUBLE else np.float32
    inits = [
        numpy_helper.from_array(rng.normal(size=(F, H)).astype(np_type), "W"),
        numpy_helper.from_array(rng.normal(size=(H, H)).astype(np_type), "U"),
        numpy_helper.from_array(rng.normal(size=(H, 1)).astype(np_type), "V"),
    ]
    nodes = [
        helper.make_node("MatMul", [x_name, "W"], ["xw"]),
        helper.make_node("MatMul", [h_name, "U"], ["hu"]),
        helper.make_node("Add", ["xw", "hu"], ["pre"]),
        helper.make_node("Tanh", ["pre"], [h_out_name]),
        helper.make_node("MatMul", [h_out_name, "V"], [y_name]),
    ]
    graph_inputs = [
        helper.make_tensor_value_info(x_name, dtype, [batch, F]),
        helper.make_tensor_value_info(h_name, dtype, [batch, H]),
    ]
    if extra_input:
        graph_inputs.append(helper.make_tensor_value_info(extra_input, dtype, [batch, F]))
        nodes.append(helper.make_node("Identity", [extra_input], ["unused"]))
    graph = helper.make_graph(
        nodes,
        "cell",
        graph_inputs,
        [
            helper.make_tensor_value_info(y_name, dtype, [batch, 1]),
            helper.make_tensor_value_info(h_out_name, dtype, [batch, H]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(model, directory / "model.onnx")
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory / "model.onnx"


def load_error(path: Path) -> str:
    with pytest.raises(ModelLoadError) as info:
        CellModel(path)
    return str(info.value)


def test_convention_pairs_s_with_s_out(tmp_path: Path) -> None:
    model = CellModel(write_cell(tmp_path / "m"))
    assert (model.reading, model.output, model.input_size, model.output_size) == ("x", "y", F, 1)
    assert [(s.name, s.output, s.shape) for s in model.states] == [("h", "h_out", (H,))]


def test_config_names_reading_states_output_initial_state_and_max_batch(tmp_path: Path) -> None:
    config = {
        "reading": "r",
        "states": {"mem": "mem_next"},
        "output": "answer",
        "initial_state": {"mem": 0.5},
        "max_batch": 16,
        "version": "7",
    }
    model = CellModel(
        write_cell(tmp_path / "m", inputs=("r", "mem"), outputs=("answer", "mem_next"), config=config)
    )
    assert (model.reading, model.output, model.version, model.config_max_batch) == ("r", "answer", "7", 16)
    np.testing.assert_array_equal(model.states[0].initial, np.full(H, 0.5, np.float32))


def test_missing_state_pair_says_how_to_name_it(tmp_path: Path) -> None:
    message = load_error(write_cell(tmp_path / "m", outputs=("y", "h_next")))
    assert "no state pair found" in message and "'<state>_out'" in message and "config.json" in message


def test_static_batch_axis_says_to_export_dynamic_axes(tmp_path: Path) -> None:
    message = load_error(write_cell(tmp_path / "m", batch=1))
    assert "fixed batch axis of 1" in message and "dynamic_axes" in message


def test_wrong_dtype_says_to_cast_to_float(tmp_path: Path) -> None:
    message = load_error(write_cell(tmp_path / "m", dtype=TensorProto.DOUBLE))
    assert "tensor(double)" in message and "float32" in message


def test_two_candidate_readings_are_ambiguous(tmp_path: Path) -> None:
    message = load_error(write_cell(tmp_path / "m", extra_input="z"))
    assert (
        "cannot tell which input is the reading" in message and "'x', 'z'" in message and "reading" in message
    )


def test_config_naming_a_missing_input_is_refused(tmp_path: Path) -> None:
    message = load_error(write_cell(tmp_path / "m", config={"states": {"hidden": "h_out"}}))
    assert "'hidden'" in message and "['h', 'x']" in message


def test_initial_state_of_wrong_shape_is_refused(tmp_path: Path) -> None:
    message = load_error(write_cell(tmp_path / "m", config={"initial_state": {"h": [1.0, 2.0]}}))
    assert "does not fit the state's shape [3]" in message


def test_unknown_config_key_is_refused(tmp_path: Path) -> None:
    message = load_error(write_cell(tmp_path / "m", config={"batch": 4}))
    assert "unknown keys ['batch']" in message


def test_highest_version_directory_is_served(tmp_path: Path) -> None:
    write_cell(tmp_path / "repo" / "cell" / "1")
    write_cell(tmp_path / "repo" / "cell" / "12")
    write_cell(tmp_path / "repo" / "cell" / "3")
    repository = ModelRepository(tmp_path / "repo")
    assert repository.models["cell"].version == "12" and repository.default == "cell"


def test_default_model_comes_from_setting_or_default_file(tmp_path: Path) -> None:
    for name in ("a", "b"):
        write_cell(tmp_path / "repo" / name)
    assert ModelRepository(tmp_path / "repo").default is None
    assert ModelRepository(tmp_path / "repo", default_model="b").default == "b"
    (tmp_path / "repo" / "DEFAULT").write_text("a\n")
    assert ModelRepository(tmp_path / "repo").default == "a"
    with pytest.raises(ModelLoadError, match="default model 'c' is not in"):
        ModelRepository(tmp_path / "repo", default_model="c")


def test_empty_repository_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="holds no model"):
        ModelRepository(tmp_path)


def test_batch_rows_are_independent(tmp_path: Path) -> None:
    model = CellModel(write_cell(tmp_path / "m"))
    rng = np.random.default_rng(1)
    x, h = rng.normal(size=(7, F)).astype(np.float32), rng.normal(size=(7, H)).astype(np.float32)
    y, (h_next,) = model.run(x, [h])
    for i in range(7):
        y1, (h1,) = model.run(x[i : i + 1], [h[i : i + 1]])
        np.testing.assert_allclose(y1[0], y[i], atol=1e-6)
        np.testing.assert_allclose(h1[0], h_next[i], atol=1e-6)
