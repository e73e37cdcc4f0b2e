"""The picture `cellstream replay --plot` draws: each stream's readings against the forecasts made
one step earlier, and the forecast's actual error against the error the model expected.

It reads the answer the way the demo model gives it: answer[0] forecasts the stream's next reading
and answer[1], where there is one, is the expected absolute error of that forecast (same unit).
matplotlib is imported inside `plot`: it is the optional `[plot]` extra.
"""

from __future__ import annotations

import csv
import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from cellstream.tools.replay_table import Row, Table, Time

PLOT_WIDTH_PX = 1200
PLOT_STREAM_HEIGHT_PX = 500
PLOT_DPI = 100
PLOT_MAX_STREAMS = 6

# "co2 (ppm)", "co2 [ppm]": the unit a CSV header gives its column.
_UNIT = re.compile(r"^\s*(?P<name>.*?)\s*[(\[](?P<unit>[^()\[\]]+)[)\]]\s*$")


@dataclass(frozen=True)
class Answered:
    """One applied reading and the answer the server gave to it."""

    stream: str
    step: int
    time: Time | None
    """The row's --time-col value; None without --time-col (the x axis is then the step)."""
    reading: float
    answer: tuple[float, ...]


@dataclass(frozen=True)
class Labels:
    """What the axes say: the reading column, the time column (empty: the step) and their units."""

    value_col: str
    time_col: str = ""
    unit: str = ""
    """The readings' unit (given, or from a header like `co2 (ppm)`); the errors share it."""


def split_unit(column: str) -> tuple[str, str]:
    """`co2 (ppm)` -> (`co2`, `ppm`); a header without a unit -> (column, "")."""
    found = _UNIT.match(column)
    if found is None or not found["name"]:
        return column, ""
    return found["name"], found["unit"].strip()


def answered_by(row: Row, step: int, answer: Iterable[float]) -> Answered:
    return Answered(row.stream, step, row.time, row.values[0], tuple(float(v) for v in answer))


def answers_in(path: Path, table: Table) -> list[Answered]:
    """The answers an --out file holds (of this run and the ones it continues), joined with the
    CSV's rows by their row number; rows refused, or no longer in the CSV, are left out."""
    with path.open(newline="") as handle:
        records = list(csv.DictReader(handle))
    outputs = [c for c in records[0] if c.startswith("output_")] if records else []
    answered = []
    for record in records:
        index = int(record["row"])
        if record["error"] or index >= len(table.rows) or table.rows[index].stream != record["stream"]:
            continue
        # Through float32: the server's values exactly, as a run's own replies give them.
        answer = [float(np.float32(record[c])) for c in outputs]
        answered.append(answered_by(table.rows[index], int(record["step"]), answer))
    return answered


def _axis_label(column: str, unit: str) -> str:
    name, own_unit = split_unit(column)
    unit = unit or own_unit
    return f"{name} ({unit})" if unit else name


def plot(answered: Sequence[Answered], labels: Labels, path: Path, *, model: str = "", last: int = 0) -> None:
    """Two panels per stream: readings and forecasts on top, actual and expected error below.

    The forecast made at step t is drawn at step t + 1, beside the reading it forecast (only across
    consecutive steps). At most PLOT_MAX_STREAMS streams are drawn; the image is always
    PLOT_WIDTH_PX wide and PLOT_STREAM_HEIGHT_PX high per stream drawn.
    """
    if not answered:
        raise ValueError("nothing to plot: no reading was answered")
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    by_stream: dict[str, list[Answered]] = {}
    for point in answered:
        by_stream.setdefault(point.stream, []).append(point)
    streams = list(by_stream)[:PLOT_MAX_STREAMS]
    size = (PLOT_WIDTH_PX / PLOT_DPI, PLOT_STREAM_HEIGHT_PX * len(streams) / PLOT_DPI)
    figure = plt.figure(figsize=size, dpi=PLOT_DPI, layout="constrained")
    grid = figure.add_gridspec(2 * len(streams), 1, height_ratios=[3, 1] * len(streams))
    name, own_unit = split_unit(labels.value_col)
    unit = labels.unit or own_unit
    x_label = _axis_label(labels.time_col, "") if labels.time_col else "step"
    for k, stream in enumerate(streams):
        top = figure.add_subplot(grid[2 * k])
        bottom = figure.add_subplot(grid[2 * k + 1], sharex=top)
        points = sorted(by_stream[stream], key=lambda p: p.step)
        points = points[-last:] if last > 0 else points

        top.plot(_xs(points), [p.reading for p in points], color="0.25", lw=1.0, label="reading")
        pairs = [(a, b) for a, b in itertools.pairwise(points) if b.step == a.step + 1]
        if pairs:
            xs = _xs([b for _, b in pairs])
            forecast = [a.answer[0] for a, _ in pairs]
            top.plot(xs, forecast, color="tab:orange", lw=1.0, label="forecast made one step earlier")
            actual = [abs(b.reading - f) for (_, b), f in zip(pairs, forecast, strict=True)]
            bottom.plot(xs, actual, color="tab:red", lw=0.8, label="actual error |reading - forecast|")
            if len(pairs[0][0].answer) > 1:
                expected = [a.answer[1] for a, _ in pairs]
                bottom.plot(xs, expected, color="tab:blue", lw=1.0, label="expected error")
            bottom.legend(loc="upper left", fontsize="small")
        top.set_title(f"stream {stream}" + (f", model {model}" if model else ""))
        top.set_ylabel(_axis_label(name, unit))
        top.legend(loc="upper left", fontsize="small")
        bottom.set_ylabel(f"error ({unit})" if unit else "error")
        bottom.set_xlabel(x_label)
    # An SVG (by the path's suffix) keeps its text as text: searchable, editable.
    with plt.rc_context({"svg.fonttype": "none"}):
        figure.savefig(path, dpi=PLOT_DPI)
    plt.close(figure)


def _xs(points: Sequence[Answered]) -> np.ndarray[Any, Any]:
    """Where the points go on the x axis: their time (numbers, or dates matplotlib lays out as
    dates), or their step without --time-col."""
    times: list[Time] = [p.step if p.time is None else p.time for p in points]
    if times and isinstance(times[0], datetime):
        return np.array(times, dtype=object)
    return np.array(times, dtype=np.float64)
