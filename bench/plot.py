"""Plot the `sweep` of a bench run: steps/s and p99 latency against concurrency.

python -m bench.plot bench/results/latest.json -o docs/performance.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .servers import REPO

STYLE = {"cellstream": ("tab:blue", "o"), "echo": ("tab:gray", "s"), "naive": ("tab:red", "^")}
LABEL = {"cellstream": "cellstream", "echo": "echo (transport ceiling)", "naive": "naive baseline"}
AXES = {"unary": "Step calls in flight (streams)", "stream": "readings in flight over 8 StepStream calls"}


def plot(document: dict[str, Any], output: Path) -> None:
    sweep = next((s for s in document["scenarios"] if s["scenario"] == "sweep"), None)
    if sweep is None:
        raise SystemExit("this run has no sweep scenario: run `python -m bench --scenarios sweep`")
    figure = Figure(figsize=(11, 7.5))
    axes = figure.subplots(2, 2, sharex="col", squeeze=False)
    for column, mode in enumerate(("unary", "stream")):
        for target, series in sweep[mode].items():
            color, marker = STYLE.get(target, ("tab:green", "x"))
            x = [p["concurrency"] for p in series]
            axes[0][column].plot(
                x,
                [p["steps_per_s"] for p in series],
                color=color,
                marker=marker,
                label=LABEL.get(target, target),
            )
            axes[1][column].plot(
                x, [p["p99_ms"] for p in series], color=color, marker=marker, label=LABEL.get(target, target)
            )
        axes[0][column].set_title(f"{mode}: throughput")
        axes[1][column].set_title(f"{mode}: p99 latency")
        axes[0][column].set_ylabel("steps/s")
        axes[1][column].set_ylabel("p99 ms")
        axes[1][column].set_xlabel(AXES[mode])
        for row in (0, 1):
            axes[row][column].set_xscale("log", base=2)
            axes[row][column].grid(True, alpha=0.3)
        axes[1][column].set_yscale("log")
    axes[0][0].legend()
    machine = document["machine"]
    busy = document["load_before"]["other"]
    figure.suptitle(
        f"cellstream sweep ({document['config']['model']}, {machine['cores']} cores {machine['cpu']}, "
        f"{sweep['duration_s']} s per point; other load before the run: {busy} cores)",
        fontsize=10,
    )
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__)
    parser.add_argument("results", type=Path, nargs="?", default=REPO / "bench" / "results" / "latest.json")
    parser.add_argument("-o", "--output", type=Path, default=REPO / "docs" / "performance.png")
    args = parser.parse_args()
    plot(json.loads(args.results.read_text()), args.output)
    print(args.output)


if __name__ == "__main__":
    main()
