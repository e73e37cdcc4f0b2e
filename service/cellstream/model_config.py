"""A model's config.json: every key optional, every value type-checked, every problem a
ModelLoadError that names the file and says what to change (the file is untrusted input)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellstream.errors import ModelLoadError

# What each config.json key must hold (null is "not given"), as an error message says it.
_CONFIG_VALUES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "reading": (lambda v: isinstance(v, str), "a string naming the model input that takes the reading"),
    "output": (lambda v: isinstance(v, str), "a string naming the model output that carries the answer"),
    "states": (
        lambda v: isinstance(v, dict) and bool(v),
        'a map of each state input to its next-value output, e.g. {"h": "h_out"}',
    ),
    "initial_state": (
        lambda v: isinstance(v, dict),
        'a map of state names to a number or a nested list of numbers, e.g. {"h": 0.0}',
    ),
    "max_batch": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer"),
    "version": (
        lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and v != ""),
        "a non-empty string or an integer",
    ),
    "description": (lambda v: isinstance(v, str), "a string"),
}
CONFIG_KEYS = set(_CONFIG_VALUES)


@dataclass(frozen=True)
class ModelConfig:
    """The optional config.json beside model.onnx; every field may be left out (or null)."""

    reading: str | None = None
    states: dict[str, str] | None = None
    output: str | None = None
    initial_state: dict[str, Any] | None = None
    max_batch: int | None = None
    version: str | None = None
    description: str = ""

    @classmethod
    def read(cls, path: Path) -> ModelConfig:
        """Parse and type-check every value, so a bad one is refused here, by name, not deep in numpy."""
        raw = _read_json(path)
        if raw is None:
            return cls()
        unknown = set(raw) - CONFIG_KEYS
        if unknown:
            raise ModelLoadError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(CONFIG_KEYS)}")
        for key, value in raw.items():
            valid, expected = _CONFIG_VALUES[key]
            if value is not None and not valid(value):
                raise ModelLoadError(f"{path}: {key!r} must be {expected}, not {_json_kind(value)}")
        states = raw.get("states") or {}
        for state_name, out_name in states.items():
            if not isinstance(out_name, str):
                raise ModelLoadError(
                    f"{path}: 'states' maps {state_name!r} to {_json_kind(out_name)}: map it to the name of "
                    f"the output that carries its next value"
                )
        outputs = list(states.values())
        shared = sorted({o for o in outputs if outputs.count(o) > 1})
        if shared:
            raise ModelLoadError(
                f"{path}: 'states' pairs several states with output {shared}: give each its own"
            )
        for state_name, value in (raw.get("initial_state") or {}).items():
            bad = _non_number(value)
            if bad is not None:
                raise ModelLoadError(
                    f"{path}: initial_state {state_name!r} must be a number or a nested list of numbers, "
                    f"but holds {bad}"
                )
        version = raw.get("version")
        return cls(
            reading=raw.get("reading"),
            states=raw.get("states"),
            output=raw.get("output"),
            initial_state=raw.get("initial_state"),
            max_batch=raw.get("max_batch"),
            version=None if version is None else str(version),
            description=raw.get("description") or "",
        )


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when there is no such file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeError) as exc:
        raise ModelLoadError(
            f"{path}: cannot read it ({one_line(exc)}): make it a readable UTF-8 file"
        ) from exc
    try:
        raw = json.loads(text)
    except RecursionError as exc:  # json recurses once per nesting level
        raise ModelLoadError(f"{path}: JSON nested too deeply: no config value needs that depth") from exc
    except ValueError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({one_line(exc)})") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, not {_json_kind(raw)}")
    return raw


def _json_kind(value: object) -> str:
    """How a JSON value reads in an error message."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int | float | str):
        return f"the {'string' if isinstance(value, str) else 'number'} {repr(value)[:40]}"
    if isinstance(value, dict):
        return "an object" if value else "an empty object"
    return "a list" if value else "an empty list"


def _non_number(value: object) -> str | None:
    """What the first leaf of a JSON value that is not a number is (walked with a stack: any depth)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, list):
            pending.extend(reversed(item))
        elif isinstance(item, bool) or not isinstance(item, int | float):
            return _json_kind(item)
    return None


def one_line(exc: BaseException) -> str:
    """An exception's text on one line: onnxruntime's span several, the CLI prints one."""
    return " ".join(str(exc).split()) or type(exc).__name__
