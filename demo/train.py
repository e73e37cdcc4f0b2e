"""Train the demo model: a small GRU that forecasts next week's CO2 at Mauna Loa, one reading at a time.

    python demo/train.py [--out models/demo] [--seconds-report]   # needs torch (the [torch] extra)

The served model takes the RAW reading (ppm) and answers ``[forecast, expected_abs_error]``,
both in ppm: the forecast of the next week's reading, and the typical size of that forecast's
error (the median of |actual - forecast| the model expects in this season and regime). A client
flags an anomaly when ``|reading - forecast made one step earlier| > 4 * expected_abs_error``.

Everything a stream needs is in the model's states, so a client sends nothing but readings:
``h`` [32] is the GRU's memory; ``mem`` [3] holds the previous reading, a one-year exponential
average (so the model sees where in the seasonal cycle the reading sits) and a "seen" flag.
The normalisation constants are computed on the training part and baked into the graph.

Training is seeded and single-process (torch.set_num_threads(2)); on 2 CPU cores it takes about
a minute. The weights are fitted on the first 70 % of the series (to November 1988), the
checkpoint is picked on the next 10 % (to March 1993), and the last 20 % (April 1993 - December
2001, 457 weeks) is held out: the script reports MAE and RMSE
of the exported ONNX model (run step by step with onnxruntime, as the server runs it) against
the naive forecast "next week = this week" on that tail.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "models" / "demo" / "co2_weekly.csv"
OUT = ROOT / "models" / "demo"

SEED = 0
HIDDEN = 32
TEST_FRACTION = 0.2
EMA_ALPHA = 1.0 / 52.0  # one-year time constant: the weekly series' seasonal cycle
WINDOW = 208  # four years per training window
WARMUP = 52  # steps per window that settle the GRU before the loss counts
BATCH = 32
ITERATIONS = 600
VALIDATE_EVERY = 25
VALIDATION_FRACTION = 0.1  # the last 10 % before the test tail picks the checkpoint
ANOMALY_FACTOR = 4.0


def read_series(path: Path = DATA) -> np.ndarray:
    with path.open(newline="") as handle:
        return np.array([float(row["co2"]) for row in csv.DictReader(handle)], np.float32)


@dataclass(frozen=True)
class Scales:
    """Normalisation constants from the training part; baked into the exported graph."""

    diff: float  # std of week-to-week changes (ppm)
    dev: float  # std of (reading - one-year average) (ppm)


class Forecaster(nn.Module):
    """One step: raw reading + states -> [forecast, expected |error|] in ppm + next states.

    The features are computed inside forward(), so the served graph takes raw readings. The
    head sees the GRU's new state and the features themselves (a shortcut for the linear part
    of the forecast). Training runs the same maths over whole windows (see `train`).
    """

    diff_scale: torch.Tensor
    dev_scale: torch.Tensor

    def __init__(self, scales: Scales, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.cell = nn.GRUCell(2, hidden)
        self.head = nn.Linear(hidden + 2, 2)
        self.register_buffer("diff_scale", torch.tensor(scales.diff))
        self.register_buffer("dev_scale", torch.tensor(scales.dev))

    def features(self, x: torch.Tensor, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised [last change, deviation from the one-year average], and the next `mem`."""
        prev, ema, seen = mem[:, 0:1], mem[:, 1:2], mem[:, 2:3]
        # On a stream's first reading there is no previous one: the change is 0 and the
        # average starts at the reading itself.
        change = seen * (x - prev)
        ema_next = seen * (ema + EMA_ALPHA * (x - ema)) + (1.0 - seen) * x
        feats = torch.cat([change / self.diff_scale, (x - ema_next) / self.dev_scale], dim=1)
        mem_next = torch.cat([x, ema_next, torch.ones_like(x)], dim=1)
        return feats, mem_next

    def answer(self, x: torch.Tensor, feats: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        raw = self.head(torch.cat([h, feats], dim=1))
        forecast = x + raw[:, 0:1] * self.diff_scale
        expected = nn.functional.softplus(raw[:, 1:2]) * self.diff_scale
        return torch.cat([forecast, expected], dim=1)

    def forward(
        self, x: torch.Tensor, h: torch.Tensor, mem: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats, mem_next = self.features(x, mem)
        h_next = self.cell(feats, h)
        return self.answer(x, feats, h_next), h_next, mem_next


def scales_of(train: np.ndarray) -> Scales:
    ema = np.empty_like(train)
    ema[0] = train[0]
    for t in range(1, len(train)):
        ema[t] = ema[t - 1] + EMA_ALPHA * (train[t] - ema[t - 1])
    return Scales(diff=float(np.diff(train).std()), dev=float((train - ema).std()))


def stream_features(model: Forecaster, series: np.ndarray) -> torch.Tensor:
    """The GRU's inputs for the whole series, exactly as forward() computes them step by step."""
    mem = torch.zeros(1, 3)
    rows = []
    with torch.no_grad():
        for value in series:
            feats, mem = model.features(torch.tensor([[value]]), mem)
            rows.append(feats[0])
    return torch.stack(rows)


def train(series: np.ndarray, fit_end: int, split: int) -> tuple[Forecaster, float]:
    """Fit on windows of rows [0, fit_end); keep the weights that forecast rows [fit_end, split) best.

    Loss: squared error of the forecast plus |error| of the error head (so that head learns the
    median absolute error). The features do not depend on the weights, so they are computed
    once, and the recurrence runs through `nn.GRU` (one fused call per batch of windows); the
    chosen weights are then copied into the GRUCell that is exported. Returns the model and its
    validation RMSE (ppm).
    """
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    model = Forecaster(scales_of(series[:fit_end]))
    sequence = nn.GRU(2, HIDDEN, batch_first=True)
    params = [*sequence.parameters(), *model.head.parameters()]
    optimiser = torch.optim.Adam(params, lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, ITERATIONS)
    values = torch.from_numpy(series[:split])
    feats = stream_features(model, series[:split])
    best: tuple[float, dict[str, torch.Tensor]] = (math.inf, {})
    for iteration in range(1, ITERATIONS + 1):
        starts = torch.from_numpy(rng.integers(0, fit_end - WINDOW - 1, BATCH))
        index = starts[:, None] + torch.arange(WINDOW)[None, :]  # [B, W]
        x, target, f = values[index], values[index + 1], feats[index]  # [B, W], [B, W], [B, W, 2]
        h, _ = sequence(f)  # [B, W, H], from a zero state like a new stream
        answer = model.answer(x.reshape(-1, 1), f.reshape(-1, 2), h.reshape(-1, HIDDEN))
        answer = answer.reshape(BATCH, WINDOW, 2)[:, WARMUP:]
        error = (target[:, WARMUP:] - answer[..., 0]) / model.diff_scale
        spread = answer[..., 1] / model.diff_scale
        loss = error.pow(2).mean() + (spread - error.detach().abs()).abs().mean()
        optimiser.zero_grad()
        torch.autograd.backward(loss)
        nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        schedule.step()
        if iteration % VALIDATE_EVERY == 0:
            with torch.no_grad():  # one stream over every row so far, as the server would run it
                h_all, _ = sequence(feats[None, : split - 1])
                answer = model.answer(values[: split - 1, None], feats[: split - 1], h_all[0])
                rmse = float((values[fit_end:] - answer[fit_end - 1 :, 0]).pow(2).mean().sqrt())
            if rmse < best[0]:
                state = {
                    **sequence.state_dict(),
                    **{f"head.{k}": v for k, v in model.head.state_dict().items()},
                }
                best = (rmse, {k: v.clone() for k, v in state.items()})
            print(
                f"iteration {iteration:4d}  loss {loss.item():.4f}  validation RMSE {rmse:.4f} ppm",
                flush=True,
            )
    rmse, state = best
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(model.cell, name).copy_(state[f"{name}_l0"])
        model.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
    return model.eval(), rmse


def onnx_forecasts(model_path: Path, series: np.ndarray) -> np.ndarray:
    """Step the exported model over the whole series as the server would: answers [N, 2]."""
    from cellstream.model import CellModel  # noqa: PLC0415

    cell = CellModel(model_path)
    states = [s.initial[None] for s in cell.states]
    answers = []
    for value in series:
        y, states = cell.run(np.array([[value]], np.float32), states)
        answers.append(y[0])
    return np.array(answers)


def report(series: np.ndarray, answers: np.ndarray, split: int) -> dict[str, float]:
    """Errors on the held-out tail: the forecast made at row t is for row t + 1."""
    actual = series[split:].astype(np.float64)
    forecast = answers[split - 1 : -1, 0].astype(np.float64)
    expected = answers[split - 1 : -1, 1].astype(np.float64)
    naive = series[split - 1 : -1].astype(np.float64)
    model_err, naive_err = actual - forecast, actual - naive
    out = {
        "test_weeks": float(len(actual)),
        "model_mae": float(np.abs(model_err).mean()),
        "model_rmse": float(math.sqrt((model_err**2).mean())),
        "naive_mae": float(np.abs(naive_err).mean()),
        "naive_rmse": float(math.sqrt((naive_err**2).mean())),
        "median_abs_error": float(np.median(np.abs(model_err))),
        "median_expected_abs_error": float(np.median(expected)),
        "flagged_fraction": float((np.abs(model_err) > ANOMALY_FACTOR * expected).mean()),
    }
    out["mae_gain"] = 1.0 - out["model_mae"] / out["naive_mae"]
    out["rmse_gain"] = 1.0 - out["model_rmse"] / out["naive_rmse"]
    return out


DESCRIPTION = (
    "Weekly CO2 at Mauna Loa, one step per reading. Input [1]: this week's CO2 in ppm, raw "
    "(normalisation is inside the model: week-to-week change / {diff:.4f} ppm, deviation from a "
    "one-year exponential average / {dev:.4f} ppm). Output [2]: [forecast of next week's CO2 in "
    "ppm, expected absolute error of that forecast in ppm]; flag a reading as unusual when "
    "|reading - forecast made one step earlier| > 4 x the expected error made with it. States: "
    "h [32] GRU memory; mem [3] = previous reading, one-year average, seen flag. Trained by "
    "demo/train.py on March 1958 - March 1993; April 1993 - December 2001 held out (Keeling & "
    "Whorf, Scripps/CDIAC, public domain)."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="model directory to write")
    args = parser.parse_args()

    from cellstream.export import export_torch  # noqa: PLC0415

    torch.set_num_threads(2)
    started = time.perf_counter()
    series = read_series()
    split = round(len(series) * (1 - TEST_FRACTION))
    fit_end = round(len(series) * (1 - TEST_FRACTION - VALIDATION_FRACTION))
    model, validation_rmse = train(series, fit_end, split)
    scales = Scales(float(model.diff_scale), float(model.dev_scale))
    export = export_torch(
        model,
        args.out,
        input_size=1,
        state_shapes={"h": (HIDDEN,), "mem": (3,)},
        reading_name="co2_ppm",
        output_name="forecast",
        version="1",
        description=DESCRIPTION.format(diff=scales.diff, dev=scales.dev),
    )
    answers = onnx_forecasts(export.model_path, series)
    figures = report(series, answers, split)
    figures["validation_rmse"] = validation_rmse
    figures["train_seconds"] = time.perf_counter() - started
    figures["export_max_abs_error"] = export.max_abs_error
    print(json.dumps({k: round(v, 4) for k, v in figures.items()}))
    print(
        f"held-out tail ({int(figures['test_weeks'])} weeks): MAE {figures['model_mae']:.3f} ppm vs naive "
        f"{figures['naive_mae']:.3f} ({figures['mae_gain']:.1%} lower); RMSE {figures['model_rmse']:.3f} "
        f"vs {figures['naive_rmse']:.3f} ({figures['rmse_gain']:.1%} lower)"
    )


if __name__ == "__main__":
    main()
