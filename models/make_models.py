"""Build the bundled recurrent-cell models that cellstream serves and tests against.

Run ``python models/make_models.py [OUT_DIR]`` (default: this file's directory). The output is
byte-for-byte deterministic, so regenerating leaves ``git status`` clean.

Each ``model.onnx`` is ONE cell step written with primitive ops (Gemm, Split, Sigmoid, Tanh, ...),
the way a PyTorch export of ``nn.GRUCell`` / ``nn.LSTMCell`` looks. The weights are stored as
initializers in the layout of the ONNX ``GRU`` / ``LSTM`` sequence operators and the gate maths
follows those operators exactly, so ``tests/reference.py`` can rebuild an independent reference
from the same weights with the official sequence operators.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# IR 8 is what opset 17 shipped with; onnxruntime >= 1.18 loads it.
IR_VERSION = 8
PRODUCER = "cellstream/models/make_models.py"
# metadata_props key holding a JSON description of the cell, read by tests/reference.py so the
# reference knows which input is the reading and which state is h or c without guessing.
SPEC_KEY = "cellstream.reference_spec"
# Weights ~ U(-scale, scale). With readings ~ N(0, 1) these keep |h| around 0.1-0.3 (never
# saturated) and the recurrence contractive: a state perturbation dies out within ~50 steps, so
# float32 rounding does not accumulate and long streams stay comparable at 1e-5. The larger head
# scale just spreads the answers out (std 0.2-0.7) so wrong state is plainly visible.
CELL_SCALE = 0.3
HEAD_SCALE = 0.5

F32 = npt.NDArray[np.float32]


@dataclass
class GraphBuilder:
    """Accumulates nodes and initializers; unique node names keep the graph readable in Netron."""

    rng: np.random.RandomState
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    _names: set[str] = field(default_factory=set)

    def weight(self, name: str, shape: tuple[int, ...], scale: float) -> F32:
        """Draw U(-scale, scale) into initializer ``name``; RandomState's stream is frozen across numpy."""
        value = self.rng.uniform(-scale, scale, size=shape).astype(np.float32)
        self.const(name, value)
        return value

    def const(self, name: str, value: npt.NDArray[np.generic]) -> str:
        if name in self._names:
            return name
        self._names.add(name)
        self.inits.append(numpy_helper.from_array(value, name=name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs: Any) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))

    def linear(self, x: str, w: str, b: str, out: str, name: str) -> None:
        """``out = x @ w.T + b``, i.e. PyTorch's Linear export (Gemm with transB=1)."""
        self.node("Gemm", [x, w, b], [out], name=name, transB=1)


def _input_projections(
    g: GraphBuilder, x: str, h: str, *, gates: int, in_size: int, hidden: int, sfx: str
) -> tuple[list[str], list[str]]:
    """Create W/R/Wb/Rb (ONNX-operator layout) and emit the two gate projections, split per gate.

    W is [1, gates*H, in] and R is [1, gates*H, H] exactly as the ONNX GRU/LSTM ``W``/``R`` inputs;
    ``B`` of those operators is ``concat(Wb, Rb)[None]``. The cell squeezes the direction axis
    away at run time, so only one copy of each weight is stored.
    """
    g.weight(f"W{sfx}", (1, gates * hidden, in_size), CELL_SCALE)
    g.weight(f"R{sfx}", (1, gates * hidden, hidden), CELL_SCALE)
    g.weight(f"Wb{sfx}", (gates * hidden,), CELL_SCALE)
    g.weight(f"Rb{sfx}", (gates * hidden,), CELL_SCALE)
    g.const("axes_0", np.array([0], dtype=np.int64))
    split = g.const(f"split_{gates}x{hidden}", np.full((gates,), hidden, dtype=np.int64))
    p = f"cell{sfx}"
    g.node("Squeeze", [f"W{sfx}", "axes_0"], [f"{p}/W2d"], name=f"{p}/squeeze_W")
    g.node("Squeeze", [f"R{sfx}", "axes_0"], [f"{p}/R2d"], name=f"{p}/squeeze_R")
    g.linear(x, f"{p}/W2d", f"Wb{sfx}", f"{p}/gx", name=f"{p}/gemm_x")
    g.linear(h, f"{p}/R2d", f"Rb{sfx}", f"{p}/gh", name=f"{p}/gemm_h")
    gx = [f"{p}/gx_{i}" for i in range(gates)]
    gh = [f"{p}/gh_{i}" for i in range(gates)]
    g.node("Split", [f"{p}/gx", split], gx, name=f"{p}/split_x", axis=1)
    g.node("Split", [f"{p}/gh", split], gh, name=f"{p}/split_h", axis=1)
    return gx, gh


def gru_cell(
    g: GraphBuilder, x: str, h: str, h_new: str, *, in_size: int, hidden: int, sfx: str = ""
) -> None:
    """ONNX GRU semantics with linear_before_reset=1 (== torch.nn.GRUCell), gate order z, r, h.

    z = s(Wz x + Wbz + Rz h + Rbz); r = s(Wr x + Wbr + Rr h + Rbr)
    n = tanh(Wh x + Wbh + r * (Rh h + Rbh)); h' = (1 - z) * n + z * h
    """
    (xz, xr, xn), (hz, hr, hn) = _input_projections(g, x, h, gates=3, in_size=in_size, hidden=hidden, sfx=sfx)
    p = f"cell{sfx}"
    g.const("one", np.array(1.0, dtype=np.float32))
    g.node("Add", [xz, hz], [f"{p}/z_pre"], name=f"{p}/add_z")
    g.node("Sigmoid", [f"{p}/z_pre"], [f"{p}/z"], name=f"{p}/sigmoid_z")
    g.node("Add", [xr, hr], [f"{p}/r_pre"], name=f"{p}/add_r")
    g.node("Sigmoid", [f"{p}/r_pre"], [f"{p}/r"], name=f"{p}/sigmoid_r")
    g.node("Mul", [f"{p}/r", hn], [f"{p}/r_hn"], name=f"{p}/mul_r_hn")
    g.node("Add", [xn, f"{p}/r_hn"], [f"{p}/n_pre"], name=f"{p}/add_n")
    g.node("Tanh", [f"{p}/n_pre"], [f"{p}/n"], name=f"{p}/tanh_n")
    g.node("Sub", ["one", f"{p}/z"], [f"{p}/one_minus_z"], name=f"{p}/sub_one_z")
    g.node("Mul", [f"{p}/one_minus_z", f"{p}/n"], [f"{p}/keep_n"], name=f"{p}/mul_n")
    g.node("Mul", [f"{p}/z", h], [f"{p}/keep_h"], name=f"{p}/mul_h")
    g.node("Add", [f"{p}/keep_n", f"{p}/keep_h"], [h_new], name=f"{p}/add_h_new")


def lstm_cell(
    g: GraphBuilder,
    x: str,
    h: str,
    c: str,
    *,
    h_new: str,
    c_new: str,
    in_size: int,
    hidden: int,
    sfx: str = "",
) -> None:
    """ONNX LSTM semantics, gate order i, o, f, c, no peepholes, no clipping.

    i, o, f = s(W. x + Wb. + R. h + Rb.); g = tanh(Wc x + Wbc + Rc h + Rbc)
    c' = f * c + i * g; h' = o * tanh(c')
    """
    gx, gh = _input_projections(g, x, h, gates=4, in_size=in_size, hidden=hidden, sfx=sfx)
    p = f"cell{sfx}"
    act = {"i": "Sigmoid", "o": "Sigmoid", "f": "Sigmoid", "g": "Tanh"}
    for (gate, op), a, b in zip(act.items(), gx, gh, strict=True):
        g.node("Add", [a, b], [f"{p}/{gate}_pre"], name=f"{p}/add_{gate}")
        g.node(op, [f"{p}/{gate}_pre"], [f"{p}/{gate}"], name=f"{p}/act_{gate}")
    g.node("Mul", [f"{p}/f", c], [f"{p}/f_c"], name=f"{p}/mul_f_c")
    g.node("Mul", [f"{p}/i", f"{p}/g"], [f"{p}/i_g"], name=f"{p}/mul_i_g")
    g.node("Add", [f"{p}/f_c", f"{p}/i_g"], [c_new], name=f"{p}/add_c_new")
    g.node("Tanh", [c_new], [f"{p}/tanh_c"], name=f"{p}/tanh_c")
    g.node("Mul", [f"{p}/o", f"{p}/tanh_c"], [h_new], name=f"{p}/mul_h_new")


def head(g: GraphBuilder, h: str, out: str, hidden: int) -> None:
    """Answer = Linear(hidden -> 1) on the (top layer's) new hidden state; head_W is [1, H]."""
    g.weight("head_W", (1, hidden), HEAD_SCALE)
    g.weight("head_b", (1,), HEAD_SCALE)
    g.linear(h, "head_W", "head_b", out, name="head/gemm")


def _io(name: str, *dims: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *dims])


def _finish(
    g: GraphBuilder,
    name: str,
    doc: str,
    *,
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    spec: dict[str, object],
) -> onnx.ModelProto:
    graph = helper.make_graph(g.nodes, name, inputs, outputs, initializer=g.inits, doc_string=doc)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER,
        producer_version="1",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {SPEC_KEY: json.dumps(spec, sort_keys=True)})
    onnx.checker.check_model(model, full_check=True)
    # Strict inference fails if a declared output shape disagrees with what the graph computes.
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    return model


def build_gru() -> onnx.ModelProto:
    g = GraphBuilder(np.random.RandomState(1001))
    gru_cell(g, "x", "h", "h_out", in_size=8, hidden=64)
    head(g, "h_out", "y", 64)
    spec = {"cell": "gru", "layers": 1, "reading": "x", "h": "h", "output": "y"}
    doc = "GRU cell step, F=8, H=64, y = Linear(h_new). Pairing by naming convention (no config)."
    return _finish(
        g,
        "gru_cell",
        doc,
        inputs=[_io("x", 8), _io("h", 64)],
        outputs=[_io("y", 1), _io("h_out", 64)],
        spec=spec,
    )


def build_lstm() -> onnx.ModelProto:
    g = GraphBuilder(np.random.RandomState(2002))
    lstm_cell(g, "reading", "hidden", "cell", h_new="hidden_next", c_new="cell_next", in_size=8, hidden=32)
    head(g, "hidden_next", "prediction", 32)
    spec = {
        "cell": "lstm",
        "layers": 1,
        "reading": "reading",
        "h": "hidden",
        "c": "cell",
        "output": "prediction",
    }
    return _finish(
        g,
        "lstm_cell",
        "LSTM cell step, F=8, H=32, prediction = Linear(hidden_next).",
        inputs=[_io("reading", 8), _io("hidden", 32), _io("cell", 32)],
        outputs=[_io("prediction", 1), _io("hidden_next", 32), _io("cell_next", 32)],
        spec=spec,
    )


def build_gru2() -> onnx.ModelProto:
    """Two stacked GRU cells sharing one state tensor h [B, 2, 32] (layer on axis 1)."""
    g = GraphBuilder(np.random.RandomState(3003))
    g.const("layer_0", np.array(0, dtype=np.int64))
    g.const("layer_1", np.array(1, dtype=np.int64))
    g.const("axes_1", np.array([1], dtype=np.int64))
    g.node("Gather", ["h", "layer_0"], ["h_0"], name="state/gather_0", axis=1)
    g.node("Gather", ["h", "layer_1"], ["h_1"], name="state/gather_1", axis=1)
    gru_cell(g, "x", "h_0", "h_0_new", in_size=8, hidden=32, sfx="_0")
    gru_cell(g, "h_0_new", "h_1", "h_1_new", in_size=32, hidden=32, sfx="_1")
    g.node("Unsqueeze", ["h_0_new", "axes_1"], ["h_0_new_3d"], name="state/unsqueeze_0")
    g.node("Unsqueeze", ["h_1_new", "axes_1"], ["h_1_new_3d"], name="state/unsqueeze_1")
    g.node("Concat", ["h_0_new_3d", "h_1_new_3d"], ["h_out"], name="state/concat", axis=1)
    head(g, "h_1_new", "y", 32)
    spec = {"cell": "gru", "layers": 2, "reading": "x", "h": "h", "output": "y"}
    doc = "2-layer GRU cell stack, F=8, H=32, h is [B, 2, 32] (layer axis 1), y = Linear(top layer's h)."
    return _finish(
        g,
        "gru2_cell",
        doc,
        inputs=[_io("x", 8), _io("h", 2, 32)],
        outputs=[_io("y", 1), _io("h_out", 2, 32)],
        spec=spec,
    )


LSTM_CONFIG: dict[str, object] = {
    "reading": "reading",
    "states": {"hidden": "hidden_next", "cell": "cell_next"},
    "output": "prediction",
    "version": "1",
    "description": "LSTM cell, F=8, H=32; unconventional names, so the pairing comes from this file.",
}


def write_all(out_dir: Path) -> dict[str, int]:
    """Write every model (and the LSTM's config.json); return each model.onnx size in bytes."""
    sizes: dict[str, int] = {}
    for name, build in (("gru", build_gru), ("lstm", build_lstm), ("gru2", build_gru2)):
        d = out_dir / name
        d.mkdir(parents=True, exist_ok=True)
        data = build().SerializeToString(deterministic=True)
        (d / "model.onnx").write_bytes(data)
        sizes[name] = len(data)
    (out_dir / "lstm" / "config.json").write_text(json.dumps(LSTM_CONFIG, indent=2) + "\n")
    return sizes


def main(argv: list[str]) -> int:
    out_dir = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent
    for name, size in write_all(out_dir).items():
        print(f"{out_dir / name / 'model.onnx'}: {size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
