"""Cell-step models: load an ONNX file, discover its contract, run batched steps.

Nothing here knows about streams or gRPC; a CellModel maps a batch of readings and states
to a batch of answers and next states.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import onnxruntime as ort

from cellstream.errors import ModelLoadError
from cellstream.model_config import ModelConfig, one_line
from cellstream.model_files import data_files, read_within

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.json"
DEFAULT_FILE = "DEFAULT"
FLOAT = "tensor(float)"
MAX_MODEL_BYTES = 1 << 30  # the default --max-model-bytes: far above any cell model, below a memory blow-up

ModelFile: TypeAlias = tuple[Path, str | None]
"""A model's file to load and its version directory's name (None for `<name>/model.onnx`)."""


@dataclass(frozen=True)
class StateSpec:
    """One per-stream state: the model input that takes it and the output that carries its next value."""

    name: str
    output: str
    shape: tuple[int, ...]
    initial: np.ndarray

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: a cheap cache key per model
class ReplyLayout:
    """The shape of a model's replies: what a protocol's reply encoder needs, made once per model."""

    output_size: int
    states: tuple[tuple[str, tuple[int, ...]], ...]


@contextmanager
def _refusing(path: Path) -> Iterator[None]:
    """Turn anything a hostile file still provokes (onnxruntime, numpy) into a ModelLoadError naming it."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: cannot be loaded ({type(exc).__name__}: {one_line(exc)}): fix the model or its "
            f"{CONFIG_FILE}, or move it out of the model repository"
        ) from exc


def _session_options(intra_op_threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads burn a core between runs; on small machines the gRPC loop needs it.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def _static_dims(where: str, shape: Sequence[Any]) -> tuple[int, ...]:
    """Check the batch axis is dynamic and every other axis fixed; return the per-stream shape."""
    if not shape:
        raise ModelLoadError(f"{where} is a scalar; it needs a batch axis first: [batch, ...]")
    if isinstance(shape[0], int):
        raise ModelLoadError(
            f"{where} has a fixed batch axis of {shape[0]}; export it with a dynamic axis 0 "
            f"(torch.onnx.export(..., dynamic_axes={{name: {{0: 'batch'}}}}))"
        )
    rest = tuple(shape[1:])
    if not all(isinstance(d, int) and d > 0 for d in rest):
        raise ModelLoadError(f"{where} has shape {list(shape)}: every axis but the batch axis must be fixed")
    return rest


class CellModel:
    """An onnxruntime session plus the contract of a cell-step model."""

    def __init__(
        self,
        path: Path,
        *,
        name: str | None = None,
        version: str | None = None,
        intra_op_threads: int = 1,
        max_model_bytes: int = MAX_MODEL_BYTES,
    ) -> None:
        self.path = path
        with _refusing(path):
            config = ModelConfig.read(path.parent / CONFIG_FILE)
            self.name = name or path.parent.name
            self.version = version or config.version or "1"
            self.description, self.config_max_batch = config.description, config.max_batch
            data = read_within(path, max_model_bytes)
            self.sha256 = hashlib.sha256(data).hexdigest()
            files = data_files(path, data, max_model_bytes)  # refused here, before onnxruntime opens any
            options = _session_options(intra_op_threads)  # never registers a custom-op library
            try:
                self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises its own types for a file it cannot take
                raise ModelLoadError(f"{path}: onnxruntime cannot load it: {one_line(exc)}") from exc
            self.data_files = files.checked(path)
            self._discover(path, config)

    def _discover(self, path: Path, config: ModelConfig) -> None:
        """Find the reading, the state pairs and the answer, check their shapes, probe one run."""
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        for kind, values in (("input", inputs), ("output", outputs)):
            for value in values.values():
                if value.type != FLOAT:
                    raise ModelLoadError(
                        f"{path}: {kind} {value.name!r} is {value.type}; cellstream feeds and reads float32 "
                        f"only: cast it to float in the model"
                    )
        pairs = self._pair_states(path, config, set(inputs), set(outputs))
        self.reading = self._pick_reading(path, config, set(inputs) - set(pairs))
        self.output = self._pick_output(path, config, set(outputs) - set(pairs.values()))
        reading_shape = _static_dims(f"{path}: reading {self.reading!r}", inputs[self.reading].shape)
        if len(reading_shape) != 1:
            raise ModelLoadError(
                f"{path}: reading {self.reading!r} has shape {inputs[self.reading].shape}; "
                f"a reading must be [batch, features]"
            )
        self.input_size = reading_shape[0]
        initial = config.initial_state or {}
        if unknown := set(initial) - set(pairs):
            raise ModelLoadError(
                f"{path.parent / CONFIG_FILE}: initial_state names {sorted(unknown)}, which are not states "
                f"(the states are {sorted(pairs)})"
            )
        states = []
        for state_name, out_name in sorted(pairs.items()):
            shape = _static_dims(f"{path}: state {state_name!r}", inputs[state_name].shape)
            states.append(
                StateSpec(state_name, out_name, shape, self._initial(path, state_name, shape, initial))
            )
        self.states: tuple[StateSpec, ...] = tuple(states)
        self._output_names = [self.output, *(s.output for s in self.states)]
        self.output_size = self._probe(path)
        self.layout = ReplyLayout(self.output_size, tuple((s.name, s.shape) for s in self.states))

    @staticmethod
    def _pair_states(path: Path, config: ModelConfig, inputs: set[str], outputs: set[str]) -> dict[str, str]:
        if config.states is not None:
            for state_name, out_name in config.states.items():
                if state_name not in inputs:
                    raise ModelLoadError(
                        f"{path}: config names state input {state_name!r}, but the model's inputs are "
                        f"{sorted(inputs)}"
                    )
                if out_name not in outputs:
                    raise ModelLoadError(
                        f"{path}: config pairs state {state_name!r} with output {out_name!r}, but the "
                        f"model's outputs are {sorted(outputs)}"
                    )
            return dict(config.states)
        pairs = {name: f"{name}_out" for name in inputs if f"{name}_out" in outputs}
        if not pairs:
            raise ModelLoadError(
                f"{path}: no state pair found (inputs {sorted(inputs)}, outputs {sorted(outputs)}): name "
                f"each state's next-value output '<state>_out', or list the pairs in {CONFIG_FILE} as "
                f'"states": {{"h": "h_next"}}'
            )
        return pairs

    @staticmethod
    def _pick_reading(path: Path, config: ModelConfig, candidates: set[str]) -> str:
        if config.reading is not None:
            if config.reading not in candidates:
                raise ModelLoadError(
                    f"{path}: config names reading {config.reading!r}, but the unpaired inputs are "
                    f"{sorted(candidates)}"
                )
            candidates = {config.reading}
        if len(candidates) != 1:
            what = "no input is left" if not candidates else f"inputs {sorted(candidates)} are all candidates"
            raise ModelLoadError(
                f"{path}: cannot tell which input is the reading ({what}): pair every state input with "
                f"an output '<state>_out', or name it in {CONFIG_FILE} as \"reading\""
            )
        return candidates.pop()

    @staticmethod
    def _pick_output(path: Path, config: ModelConfig, candidates: set[str]) -> str:
        if config.output is not None:
            if config.output not in candidates:
                raise ModelLoadError(
                    f"{path}: config names output {config.output!r}, but the unpaired outputs are "
                    f"{sorted(candidates)}"
                )
            return config.output
        if len(candidates) != 1:
            what = (
                "no output is left" if not candidates else f"outputs {sorted(candidates)} are all candidates"
            )
            raise ModelLoadError(
                f"{path}: cannot tell which output is the answer ({what}): name it in {CONFIG_FILE} "
                f'as "output"'
            )
        return candidates.pop()

    @staticmethod
    def _initial(path: Path, name: str, shape: tuple[int, ...], initial: dict[str, Any]) -> np.ndarray:
        if name not in initial:
            return np.zeros(shape, np.float32)
        config = path.parent / CONFIG_FILE
        beyond = f"{config}: initial_state {name!r} holds NaN, infinity or a number beyond float32's range"
        try:
            with np.errstate(over="ignore"):  # a float beyond float32 becomes inf, refused below
                value = np.broadcast_to(np.asarray(initial[name], np.float32), shape)
        except OverflowError as exc:  # an integer beyond any float
            raise ModelLoadError(beyond) from exc
        except ValueError as exc:  # a ragged list, or one deeper or longer than the state
            raise ModelLoadError(
                f"{config}: initial_state {name!r} does not fit the state's shape {list(shape)} "
                f"({one_line(exc)}): give one number, or a list of numbers of that shape"
            ) from exc
        if not np.isfinite(value).all():
            raise ModelLoadError(beyond)
        return np.array(value)

    def _probe(self, path: Path) -> int:
        """Run one batch of two to learn the answer's size and prove the state outputs fit the inputs."""
        try:
            x = np.zeros((2, self.input_size), np.float32)
            y, new_states = self.run(x, [np.stack([s.initial, s.initial]) for s in self.states])
        except Exception as exc:
            raise ModelLoadError(f"{path}: a test run at batch 2 failed: {one_line(exc)}") from exc
        for spec, value in zip(self.states, new_states, strict=True):
            if value.shape != (2, *spec.shape):
                raise ModelLoadError(
                    f"{path}: output {spec.output!r} has shape {list(value.shape[1:])} per stream, but its "
                    f"state {spec.name!r} has {list(spec.shape)}: they must match"
                )
        return int(y.shape[1])

    def run(self, x: np.ndarray, states: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One cell step for a batch: x [B, F], states [B, *shape] -> answer [B, output_size], next states."""
        feeds = {self.reading: x, **{s.name: v for s, v in zip(self.states, states, strict=True)}}
        y, *next_states = self._session.run(self._output_names, feeds)
        return y.reshape(len(x), -1), next_states


def find_model_file(model_dir: Path) -> ModelFile:
    """`<dir>/model.onnx`, or the highest numbered `<dir>/<version>/model.onnx` and its version."""
    found = model_files(model_dir)
    if not found:
        raise ModelLoadError(f"{model_dir}: no {MODEL_FILE} and no <version>/{MODEL_FILE} inside")
    return found[0]


def model_files(model_dir: Path) -> list[ModelFile]:
    """The files a model directory can serve, newest first: `model.onnx`, or each `<version>/model.onnx`.
    Empty where it holds no model (docs, a staging `.v2`); ModelLoadError where it looks like a broken one."""
    try:
        if not model_dir.is_dir():
            return []
        direct = model_dir / MODEL_FILE
        unversioned = direct.is_file()
        candidates = [d.name for d in model_dir.iterdir() if d.is_dir() and (d / MODEL_FILE).is_file()]
    except OSError as exc:
        raise ModelLoadError(
            f"{model_dir}: cannot read it ({one_line(exc)}): make it readable by the server's user, or "
            f"move it out of the model repository"
        ) from exc
    # str.isdigit alone takes '²' and '٣', which int() refuses; '1' sorts above '01', every scan.
    versions = sorted((n for n in candidates if n.isascii() and n.isdigit()), key=lambda n: (int(n), n))[::-1]
    if unversioned and versions:
        # Serving either would silently ignore the other (the unversioned file used to hide them all).
        free = min(set(range(1, len(versions) + 2)) - {int(v) for v in versions})
        raise ModelLoadError(
            f"{model_dir}: holds both {MODEL_FILE} and version directories {versions[::-1]}, and "
            f"{MODEL_FILE} would hide them: move {direct} into {model_dir / str(free)}/ or delete it"
        )
    if unversioned:
        return [(direct, None)]
    if versions:
        return [(model_dir / v / MODEL_FILE, v) for v in versions]
    lookalikes = sorted(name for name in candidates if name.isdigit())
    if lookalikes:
        raise ModelLoadError(
            f"{model_dir}: version directories {lookalikes} are not named with the ASCII digits 0-9: "
            f"rename each to its version number (e.g. '2')"
        )
    return []


@dataclass(frozen=True)
class Refusal:
    """A version passed over at start because it cannot be loaded, while an older one serves."""

    name: str
    path: Path
    version: str | None
    error: ModelLoadError


class ModelRepository:
    """The models of one directory, `<repo>/<name>/[<version>/]model.onnx`."""

    def __init__(
        self,
        root: Path,
        *,
        default_model: str = "",
        intra_op_threads: int = 1,
        max_model_bytes: int = MAX_MODEL_BYTES,
    ) -> None:
        if not root.is_dir():
            raise ModelLoadError(f"model repository {root} is not a directory")
        self.root = root
        self.intra_op_threads, self.max_model_bytes = intra_op_threads, max_model_bytes
        self.models: dict[str, CellModel] = {}
        self.refused: list[Refusal] = []
        for name, found in self.scan_versions().items():
            if isinstance(found, ModelLoadError):
                raise found
            self.models[name] = self._load_newest(name, found)
        if not self.models:
            raise ModelLoadError(f"model repository {root} holds no model (<name>/model.onnx)")
        self.default = self._pick_default(default_model)

    def scan(self) -> dict[str, ModelFile | ModelLoadError]:
        """Each model's highest version file now (nothing loaded), or a broken model directory's error."""
        return {n: f if isinstance(f, ModelLoadError) else f[0] for n, f in self.scan_versions().items()}

    def scan_versions(self) -> dict[str, list[ModelFile] | ModelLoadError]:
        """Like scan, with every version file of each model, newest first."""
        try:
            model_dirs = sorted(self.root.iterdir())
        except OSError as exc:
            raise ModelLoadError(
                f"cannot list model repository {self.root} ({one_line(exc)}): make it readable by the "
                f"server's user"
            ) from exc
        found: dict[str, list[ModelFile] | ModelLoadError] = {}
        for model_dir in model_dirs:
            if model_dir.name.startswith((".", "_")):
                continue
            try:
                files = model_files(model_dir)
            except ModelLoadError as exc:
                found[model_dir.name] = exc
                continue
            if files:
                found[model_dir.name] = files
        return found

    def _load_newest(self, name: str, files: list[ModelFile]) -> CellModel:
        """The newest version that loads, newer ones kept in `refused`: a broken one must not crash-loop."""
        refused: list[Refusal] = []
        for path, version in files:
            try:
                model = self.load(name, path, version)
            except ModelLoadError as exc:
                refused.append(Refusal(name, path, version, exc))
                continue
            self.refused += refused
            return model
        if len(refused) == 1:
            raise refused[0].error
        reasons = "; ".join(str(r.error) for r in refused)  # each names its file
        raise ModelLoadError(f"no version of model {name} can be loaded: {reasons}")

    def load(self, name: str, path: Path, version: str | None) -> CellModel:
        threads, limit = self.intra_op_threads, self.max_model_bytes
        return CellModel(path, name=name, version=version, intra_op_threads=threads, max_model_bytes=limit)

    def _pick_default(self, requested: str) -> str | None:
        marker = self.root / DEFAULT_FILE
        try:
            name = requested or (marker.read_text(encoding="utf-8").strip() if marker.is_file() else "")
        except (OSError, UnicodeError) as exc:
            raise ModelLoadError(
                f"{marker}: cannot read it ({one_line(exc)}): make it a readable file holding one model name"
            ) from exc
        if name:
            if name not in self.models:
                raise ModelLoadError(
                    f"default model {name!r} is not in {self.root} (models: {sorted(self.models)})"
                )
            return name
        return next(iter(self.models)) if len(self.models) == 1 else None
