"""The compute ceiling: the model run in-process with onnxruntime, state fed back, no gRPC.

Same model file and session settings as the server (cellstream.model.CellModel: one intra-op
thread, no spinning), so the gap to cellstream is serving overhead, not a different kernel.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from cellstream.model import CellModel, find_model_file


def load(models: Path, name: str) -> CellModel:
    path, version = find_model_file(models / name)
    return CellModel(path, name=name, version=version)


def steps_per_second(model: CellModel, batch: int, seconds: float) -> float:
    """Readings per second at one batch size, each run feeding its new state into the next."""
    rng = np.random.default_rng(batch)
    xs = [rng.standard_normal((batch, model.input_size)).astype(np.float32) for _ in range(4)]
    states = [np.broadcast_to(spec.initial, (batch, *spec.shape)).copy() for spec in model.states]
    _, states = model.run(xs[0], states)  # first run at a new size allocates; keep it out
    runs = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or runs < 3:
        _, states = model.run(xs[runs & 3], states)
        runs += 1
    return runs * batch / elapsed


def ceiling(model: CellModel, batches: list[int], seconds: float) -> dict[str, float]:
    return {str(b): round(steps_per_second(model, b, seconds), 1) for b in batches}
