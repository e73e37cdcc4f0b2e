"""The shipped demo: the model loads, and on the shipped readings it beats the naive forecast.

The claim in docs/demo.md is checked here without torch and without retraining: the ONNX model
is stepped with onnxruntime directly, one reading at a time, as the server steps one stream.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cellstream.model import CellModel

DEMO = Path(__file__).resolve().parent.parent / "models" / "demo"
# demo/train.py fits on the first 70 %, picks its checkpoint on the next 10 %, and holds out the
# last 20 %: rows 1827.. (the week ending 1993-04-03 onwards).
TEST_START = 1827


def readings() -> np.ndarray:
    with (DEMO / "co2_weekly.csv").open(newline="") as handle:
        return np.array([float(row["co2"]) for row in csv.DictReader(handle)], np.float32)


def step_through(series: np.ndarray) -> np.ndarray:
    """Answer [N, 2] for one stream fed the whole series, via onnxruntime and the config's names."""
    config = json.loads((DEMO / "config.json").read_text())
    session = ort.InferenceSession(str(DEMO / "model.onnx"), providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape[1:] for i in session.get_inputs()}
    states = {name: np.zeros([1, *shapes[name]], np.float32) for name in config["states"]}
    outputs = [config["output"], *config["states"].values()]
    answers = []
    for value in series:
        y, *next_states = session.run(outputs, {config["reading"]: np.array([[value]], np.float32), **states})
        states = dict(zip(config["states"], next_states, strict=True))
        answers.append(y[0])
    return np.array(answers, np.float64)


def test_demo_data_is_the_weekly_mauna_loa_series() -> None:
    series = readings()
    assert len(series) == 2284
    assert np.isfinite(series).all()
    assert series.min() > 310 and series.max() < 380  # ppm, 1958-2001
    assert (DEMO / "co2_weekly.csv").read_text().splitlines()[TEST_START + 1].startswith("1993-04-03,")


def test_demo_model_loads_with_raw_ppm_in_and_forecast_plus_expected_error_out() -> None:
    model = CellModel(DEMO / "model.onnx")
    assert (model.name, model.reading, model.input_size) == ("demo", "co2_ppm", 1)
    assert (model.output, model.output_size) == ("forecast", 2)
    assert {s.name: s.shape for s in model.states} == {"h": (32,), "mem": (3,)}
    assert "raw" in model.description and "ppm" in model.description


def test_demo_beats_the_naive_forecast_on_the_held_out_tail() -> None:
    series = readings().astype(np.float64)
    answers = step_through(series)
    actual = series[TEST_START:]
    forecast, expected = answers[TEST_START - 1 : -1, 0], answers[TEST_START - 1 : -1, 1]
    naive = series[TEST_START - 1 : -1]
    mae, naive_mae = np.abs(actual - forecast).mean(), np.abs(actual - naive).mean()
    rmse = math.sqrt(((actual - forecast) ** 2).mean())
    naive_rmse = math.sqrt(((actual - naive) ** 2).mean())
    # The figures docs/demo.md quotes.
    assert round(mae, 3) == 0.296 and round(naive_mae, 3) == 0.405
    assert round(rmse, 3) == 0.388 and round(naive_rmse, 3) == 0.513
    assert mae < 0.8 * naive_mae and rmse < 0.8 * naive_rmse
    # The second answer is a usable error scale: close to the typical error, rarely exceeded 4x.
    assert 0.6 < np.median(expected) / np.median(np.abs(actual - forecast)) < 1.5
    assert (np.abs(actual - forecast) > 4 * expected).mean() < 0.05


def test_demo_data_command_writes_the_shipped_csv(tmp_path: Path) -> None:
    out = tmp_path / "co2.csv"
    result = subprocess.run(
        [sys.executable, "-m", "cellstream", "demo", "data", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == (DEMO / "co2_weekly.csv").read_bytes()
    assert "2284 weekly CO2 readings" in result.stdout
