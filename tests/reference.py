"""Independent references for the bundled cell models; the tests compare the server against these.

Nothing here imports ``cellstream``. Two references, built from the weights read out of a
``model.onnx`` written by ``models/make_models.py``:

* ``reference_sequence`` rebuilds the recurrence with the official ONNX ``GRU`` / ``LSTM``
  *sequence* operators over the whole sequence and runs it with onnxruntime, so it shares no
  graph and no step-by-step state feeding with the cell model or the server.
* ``numpy_sequence`` is the same recurrence in plain float64 numpy.

Which input is the reading and which state is h or c comes from the JSON in the model's
``cellstream.reference_spec`` metadata; the default start state follows ``config.json``'s
``initial_state`` when present, else zeros, as the server's contract says.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SPEC_KEY = "cellstream.reference_spec"
OPSET = 17
# Chunk length for recovering LSTM cell states with the LSTM operator (see _lstm_cells).
LSTM_CHUNK = 64

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
States = dict[str, F32]


@dataclass(frozen=True)
class Layer:
    """One recurrent layer in ONNX-operator layout: W [1, G*H, in], R [1, G*H, H], Wb/Rb [G*H]."""

    W: F32
    R: F32
    Wb: F32
    Rb: F32

    @property
    def hidden(self) -> int:
        return int(self.R.shape[2])

    @property
    def B(self) -> F32:  # the ONNX operator's name for concat(Wb, Rb)
        return np.concatenate([self.Wb, self.Rb])[None, :]


@dataclass(frozen=True)
class Cell:
    """Everything a reference needs to know about a bundled model."""

    kind: str  # "gru" | "lstm"
    reading: str
    h: str  # state input holding h; [H] per stream, or [layers, H] for stacked GRUs
    c: str | None  # LSTM only
    layers: tuple[Layer, ...]
    head_W: F32  # [1, H]
    head_b: F32  # [1]
    initial: States  # per-stream start state from config.json, else zeros

    def state_shape(self, name: str) -> tuple[int, ...]:
        hid = self.layers[-1].hidden
        if name == self.h and len(self.layers) > 1:
            return (len(self.layers), hid)
        return (hid,)


def load_cell(model_dir: Path) -> Cell:
    """Read the weights, the names and the start state of the model in ``model_dir``."""
    model = onnx.load(str(Path(model_dir) / "model.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    spec: dict[str, Any] = json.loads(meta[SPEC_KEY])
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    n_layers = int(spec["layers"])
    sfx = [""] if n_layers == 1 else [f"_{i}" for i in range(n_layers)]
    layers = tuple(
        Layer(*(np.asarray(inits[f"{k}{s}"], dtype=np.float32) for k in ("W", "R", "Wb", "Rb"))) for s in sfx
    )
    gates = {"gru": 3, "lstm": 4}[spec["cell"]]
    for layer in layers:
        if layer.W.shape[1] != gates * layer.hidden:
            raise ValueError(f"{model_dir}: W has {layer.W.shape[1]} rows, expected {gates}*H")
    cell = Cell(
        kind=spec["cell"],
        reading=spec["reading"],
        h=spec["h"],
        c=spec.get("c"),
        layers=layers,
        head_W=np.asarray(inits["head_W"], dtype=np.float32),
        head_b=np.asarray(inits["head_b"], dtype=np.float32),
        initial={},
    )
    config_path = Path(model_dir) / "config.json"
    config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.exists() else {}
    init_cfg: dict[str, Any] = config.get("initial_state", {})
    initial: States = {}
    for name in state_names(cell):
        shape = cell.state_shape(name)
        value = np.asarray(init_cfg.get(name, 0.0), dtype=np.float32)
        if value.ndim == 0:
            value = np.full(shape, value, dtype=np.float32)
        if value.shape != shape:
            raise ValueError(f"initial_state[{name!r}] has shape {value.shape}, expected {shape}")
        initial[name] = value
    return replace(cell, initial=initial)


def state_names(cell: Cell) -> list[str]:
    return [cell.h] if cell.c is None else [cell.h, cell.c]


def _start(cell: Cell, initial: dict[str, npt.NDArray[Any]] | None) -> States:
    start = dict(cell.initial)
    for name, value in (initial or {}).items():
        if name not in start:
            raise KeyError(f"unknown state {name!r}; states are {sorted(start)}")
        arr = np.asarray(value, dtype=np.float32)
        if arr.shape != start[name].shape:
            raise ValueError(f"state {name!r} has shape {arr.shape}, expected {start[name].shape}")
        start[name] = arr
    return start


def _check_inputs(cell: Cell, inputs: npt.NDArray[Any]) -> F32:
    x = np.asarray(inputs, dtype=np.float32)
    features = int(cell.layers[0].W.shape[2])
    if x.ndim != 2 or x.shape[1] != features:
        raise ValueError(f"inputs must be [T, {features}], got {x.shape}")
    return x


def _head(cell: Cell, h_top: F32) -> F32:
    return (h_top @ cell.head_W.T + cell.head_b).astype(np.float32)


# --------------------------------------------------------------------------- ONNX operator reference


def _session(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: list[onnx.TensorProto],
) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "reference", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _vi(name: str, dims: list[int | str], elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, dims)


def _layer_inits(layer: Layer, i: int) -> list[onnx.TensorProto]:
    weights = (("W", layer.W), ("R", layer.R), ("B", layer.B))
    return [numpy_helper.from_array(v, f"{k}{i}") for k, v in weights]


def _gru_stack(cell: Cell, x: F32, h0: F32) -> list[F32]:
    """Run chained ONNX GRU operators (layer i+1 eats layer i's Y); return each layer's Y [T, H]."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = [numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1")]
    outputs: list[onnx.ValueInfoProto] = []
    layer_in = "X"
    for i, layer in enumerate(cell.layers):
        inits += _layer_inits(layer, i)
        nodes.append(
            helper.make_node(
                "GRU",
                [layer_in, f"W{i}", f"R{i}", f"B{i}", "", f"h0_{i}"],
                [f"Y{i}"],
                hidden_size=layer.hidden,
                linear_before_reset=1,
            )
        )
        # Y is [T, num_directions=1, batch=1, H]; the next layer wants [T, batch=1, H].
        nodes.append(helper.make_node("Squeeze", [f"Y{i}", "axis1"], [f"Ysq{i}"]))
        layer_in = f"Ysq{i}"
        outputs.append(_vi(f"Ysq{i}", ["T", 1, layer.hidden]))
    features = int(cell.layers[0].W.shape[2])
    graph_inputs = [_vi("X", ["T", 1, features])]
    graph_inputs += [_vi(f"h0_{i}", [1, 1, layer.hidden]) for i, layer in enumerate(cell.layers)]
    sess = _session(nodes, graph_inputs, outputs, inits)
    feeds: dict[str, F32] = {"X": x[:, None, :]}
    for i in range(len(cell.layers)):
        feeds[f"h0_{i}"] = h0.reshape(len(cell.layers), -1)[i][None, None, :]
    return [np.asarray(y, dtype=np.float32)[:, 0, :] for y in sess.run(None, feeds)]


def _lstm_session(cell: Cell) -> ort.InferenceSession:
    layer = cell.layers[0]
    node = helper.make_node(
        "LSTM", ["X", "W0", "R0", "B0", "seq_lens", "h0", "c0"], ["Y", "Y_h", "Y_c"], hidden_size=layer.hidden
    )
    hid, features = layer.hidden, int(layer.W.shape[2])
    inputs = [
        _vi("X", ["T", "N", features]),
        _vi("seq_lens", ["N"], TensorProto.INT32),
        _vi("h0", [1, "N", hid]),
        _vi("c0", [1, "N", hid]),
    ]
    outputs = [_vi("Y", ["T", 1, "N", hid]), _vi("Y_h", [1, "N", hid]), _vi("Y_c", [1, "N", hid])]
    return _session([node], inputs, outputs, _layer_inits(layer, 0))


def _lstm_cells(sess: ort.InferenceSession, x: F32, h0: F32, c0: F32) -> F32:
    """Cell state after every step, from the LSTM operator alone.

    The operator only returns the *last* c (Y_c), so each chunk of K steps is run as a batch of K
    copies of the chunk with sequence_lens 1..K: copy k's Y_c is c after step k. The next chunk
    starts from the longest copy's Y_h / Y_c, which keeps the cost O(T * K) rather than O(T^2).
    """
    steps = x.shape[0]
    cells = np.empty((steps, c0.shape[0]), dtype=np.float32)
    h, c = h0, c0
    for s in range(0, steps, LSTM_CHUNK):
        k = min(LSTM_CHUNK, steps - s)
        feeds = {
            "X": np.ascontiguousarray(np.broadcast_to(x[s : s + k, None, :], (k, k, x.shape[1]))),
            "seq_lens": np.arange(1, k + 1, dtype=np.int32),
            "h0": np.ascontiguousarray(np.broadcast_to(h, (1, k, h.shape[0]))),
            "c0": np.ascontiguousarray(np.broadcast_to(c, (1, k, c.shape[0]))),
        }
        _, y_h, y_c = sess.run(None, feeds)
        cells[s : s + k] = y_c[0]
        h, c = y_h[0, -1], y_c[0, -1]
    return cells


def reference_sequence(
    model_dir: Path, inputs: npt.NDArray[Any], initial: dict[str, npt.NDArray[Any]] | None = None
) -> tuple[F32, list[States]]:
    """Outputs [T, 1] and per-step states of one stream, via the ONNX GRU/LSTM sequence operators.

    ``initial`` overrides the start state per state name (per-stream shapes, no batch axis);
    missing names start from config.json's ``initial_state`` or zeros.
    """
    cell = load_cell(model_dir)
    x = _check_inputs(cell, inputs)
    start = _start(cell, initial)
    if cell.kind == "gru":
        ys = _gru_stack(cell, x, start[cell.h])
        h_all = ys[0] if len(ys) == 1 else np.stack(ys, axis=1)  # [T, H] or [T, layers, H]
        states = [{cell.h: h_all[t].copy()} for t in range(x.shape[0])]
        return _head(cell, ys[-1]), states
    assert cell.c is not None
    sess = _lstm_session(cell)
    # The whole sequence in one operator call gives every h (Y) and hence every output.
    y, _, _ = sess.run(
        None,
        {
            "X": x[:, None, :],
            "seq_lens": np.array([x.shape[0]], dtype=np.int32),
            "h0": start[cell.h][None, None, :],
            "c0": start[cell.c][None, None, :],
        },
    )
    h_all = np.asarray(y, dtype=np.float32)[:, 0, 0, :]
    c_all = _lstm_cells(sess, x, start[cell.h], start[cell.c])
    states = [{cell.h: h_all[t].copy(), cell.c: c_all[t].copy()} for t in range(x.shape[0])]
    return _head(cell, h_all), states


# --------------------------------------------------------------------------- plain numpy reference


def _sigmoid(v: F64) -> F64:
    return np.asarray(1.0 / (1.0 + np.exp(-v)), dtype=np.float64)


def _gates(layer: Layer, x: F64, h: F64) -> tuple[list[F64], list[F64]]:
    gx = layer.W[0].astype(np.float64) @ x + layer.Wb
    gh = layer.R[0].astype(np.float64) @ h + layer.Rb
    n = layer.hidden
    count = gx.shape[0] // n
    return [gx[i * n : (i + 1) * n] for i in range(count)], [gh[i * n : (i + 1) * n] for i in range(count)]


def _gru_step(layer: Layer, x: F64, h: F64) -> F64:
    (xz, xr, xn), (hz, hr, hn) = _gates(layer, x, h)
    z, r = _sigmoid(xz + hz), _sigmoid(xr + hr)
    n = np.tanh(xn + r * hn)  # linear_before_reset=1
    return np.asarray((1.0 - z) * n + z * h, dtype=np.float64)


def _lstm_step(layer: Layer, x: F64, h: F64, c: F64) -> tuple[F64, F64]:
    (xi, xo, xf, xc), (hi, ho, hf, hc) = _gates(layer, x, h)
    i, o, f = _sigmoid(xi + hi), _sigmoid(xo + ho), _sigmoid(xf + hf)
    c_new = f * c + i * np.tanh(xc + hc)
    return np.asarray(o * np.tanh(c_new), dtype=np.float64), np.asarray(c_new, dtype=np.float64)


def numpy_sequence(
    model_dir: Path, inputs: npt.NDArray[Any], initial: dict[str, npt.NDArray[Any]] | None = None
) -> tuple[F32, list[States]]:
    """Same contract as ``reference_sequence``, computed step by step in float64 numpy."""
    cell = load_cell(model_dir)
    x = _check_inputs(cell, inputs).astype(np.float64)
    start = _start(cell, initial)
    head_w = cell.head_W.astype(np.float64)
    outputs = np.empty((x.shape[0], 1), dtype=np.float32)
    states: list[States] = []
    if cell.kind == "gru":
        h = start[cell.h].astype(np.float64).reshape(len(cell.layers), -1)
        for t in range(x.shape[0]):
            layer_in = x[t]
            for li, layer in enumerate(cell.layers):
                h[li] = _gru_step(layer, layer_in, h[li])
                layer_in = h[li]
            outputs[t] = head_w @ layer_in + cell.head_b
            states.append({cell.h: h.reshape(start[cell.h].shape).astype(np.float32)})
        return outputs, states
    assert cell.c is not None
    hv, cv = start[cell.h].astype(np.float64), start[cell.c].astype(np.float64)
    for t in range(x.shape[0]):
        hv, cv = _lstm_step(cell.layers[0], x[t], hv, cv)
        outputs[t] = head_w @ hv + cell.head_b
        states.append({cell.h: hv.astype(np.float32), cell.c: cv.astype(np.float32)})
    return outputs, states


# Signature shared by both references, for tests parametrized over them.
SequenceFn = Callable[[Path, npt.NDArray[Any], dict[str, npt.NDArray[Any]] | None], tuple[F32, list[States]]]
