"""Settings: one frozen object built at start from flags and CELLSTREAM_* variables.

Each field carries its rule in its metadata: how its text becomes a value and which values it
allows. A new setting brings its check with it, and a bad value is refused, naming the flag or the
variable it came from, before anything starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "CELLSTREAM_"
C_INT_MAX = 2**31 - 1  # gRPC channel arguments are C ints ...
C_INT_SECONDS = C_INT_MAX // 1000  # ... and its timeouts are milliseconds
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SWITCH_WORDS = {
    **dict.fromkeys(("true", "1", "yes", "on"), True),
    **dict.fromkeys(("false", "0", "no", "off"), False),
}


class SettingError(ValueError):
    """A setting the server cannot use; the message is one line naming the flag and variable to change."""


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_of(name: str) -> str:
    return ENV_PREFIX + name.upper()


def names_of(name: str) -> str:
    """How a user changes a setting, for a message: `--metrics-address (CELLSTREAM_METRICS_ADDRESS)`."""
    return f"{flag_of(name)} ({env_of(name)})"


def quoted(raw: str) -> str:
    """A value as the user gave it, on one line (repr escapes newlines); a runaway one is cut."""
    return repr(raw) if len(raw) <= 256 else f"{raw[:256]!r}... ({len(raw)} characters)"


def _any_value(value: object) -> None:
    pass


@dataclass(frozen=True)
class Rule:
    """A setting's text to its value (`parse`) and the values it allows (`check`, run on defaults
    too); both raise ValueError whose text says what is allowed."""

    metavar: str
    parse: Callable[[str], object]
    check: Callable[[Any], None] = _any_value
    switch: bool = False  # a boolean: `--name` alone is true, `--no-name` false


def integer(least: int, most: int | None = None) -> Rule:
    allowed = f"must be an integer >= {least}" if most is None else f"must be an integer {least}-{most}"

    def parse(raw: str) -> int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(allowed) from None

    def check(value: object) -> None:
        if type(value) is not int or value < least or (most is not None and value > most):
            raise ValueError(allowed)

    return Rule("N", parse, check)


def seconds(*, most: int | None = None, positive: bool = False) -> Rule:
    """A duration; `positive` for the ones where 0 has no meaning (a handshake timeout)."""
    allowed = "must be a number of seconds " + ("> 0" if positive else ">= 0")
    allowed += "" if most is None else f" and <= {most}"

    def parse(raw: str) -> float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(allowed) from None

    def check(value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(allowed)
        if value < 0 or (positive and value == 0) or (most is not None and value > most):
            raise ValueError(allowed)

    return Rule("SECONDS", parse, check)


def _listed(options: tuple[str, ...]) -> str:
    return options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}"


def choice(*options: str, needs: Callable[[str], None] = _any_value) -> Rule:
    """One of a few words; `needs` checks what the chosen one requires (e.g. its package)."""

    def check(value: object) -> None:
        if value not in options:
            raise ValueError(f"choose {_listed(options)}")
        needs(str(value))

    return Rule("{" + ",".join(options) + "}", str, check)


def _uvloop_installed(loop: str) -> None:
    if loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ValueError("uvloop is not installed (pip install 'cellstream[uvloop]'); or choose asyncio")


def _check_otlp_endpoint(value: object) -> None:
    _check_text(value)
    if value and importlib.util.find_spec("opentelemetry.exporter.otlp") is None:
        raise ValueError("tracing needs the [otel] extra: pip install 'cellstream[otel]'")


def _check_log_level(value: object) -> None:
    if not isinstance(value, str) or value.upper() not in LOG_LEVELS:
        raise ValueError(f"choose {_listed(LOG_LEVELS)}, in any case")


def _switch(raw: str) -> bool:
    try:
        return SWITCH_WORDS[raw.strip().lower()]
    except KeyError:
        raise ValueError("must be true/false, yes/no, on/off or 1/0") from None


def _check_switch(value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")


def _check_text(value: object) -> None:
    if not isinstance(value, str):
        raise ValueError("must be text")


def host_port(*, optional: bool) -> Rule:
    """HOST:PORT with an IPv6 host in brackets; `optional`: '' turns that listener off."""
    allowed = "must be HOST:PORT with a port 0-65535" + (", or '' for off" if optional else "")

    def check(value: object) -> None:
        if optional and value == "":
            return
        if not isinstance(value, str):
            raise ValueError(allowed)
        host, _, port = value.rpartition(":")
        if not host or any(c.isspace() for c in host):
            raise ValueError(allowed)
        if ":" in host and not (host.startswith("[") and host.endswith("]")):
            raise ValueError(allowed + "; an IPv6 host goes in brackets, [::1]:50051")
        if not (port.isascii() and port.isdigit()) or int(port) > 65535:
            raise ValueError(allowed)

    return Rule("HOST:PORT", str, check)


def _path(raw: str) -> Path:
    if not raw:
        raise ValueError("must name a directory")
    return Path(raw)


def _path_or_none(raw: str) -> Path | None:
    return Path(raw) if raw else None


def _check_readable_dir(value: object) -> None:
    if not isinstance(value, Path):
        raise ValueError("must be a directory")
    if not value.exists():
        raise ValueError("no such directory")
    if not value.is_dir():
        raise ValueError("is not a directory")
    if not os.access(value, os.R_OK | os.X_OK):
        raise ValueError("cannot be read by this user")


def _check_writable_dir(value: object) -> None:
    """The directory, or the nearest existing one above it that it would be created in, is writable."""
    if value is None:
        return
    if not isinstance(value, Path):
        raise ValueError("must be a directory")
    found = next(p for p in (value, *value.parents) if p.exists() or p == p.parent)
    if not found.is_dir():
        raise ValueError("is not a directory" if found == value else f"cannot be created: {found} is a file")
    if not os.access(found, os.W_OK | os.X_OK):
        raise ValueError(
            "cannot be written by this user" if found == value else f"cannot be created in {found}"
        )


def _check_file_to_write(value: object) -> None:
    if value is None:
        return
    if not isinstance(value, Path):
        raise ValueError("must be a file name")
    if value.is_dir():
        raise ValueError("is a directory")
    if not value.parent.is_dir():
        raise ValueError(f"its directory {value.parent} does not exist")
    if not os.access(value.parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot be written in {value.parent} by this user")


COUNT = integer(1)  # sizes and counts where 0 would mean nothing works
LIMIT = integer(0)  # 0 means no limit (for --inline-batch: never inline)
C_INT_COUNT = integer(1, C_INT_MAX)
INTERVAL = seconds()  # the README gives 0 a meaning: off, never, no wait
GRPC_TIMEOUT = seconds(most=C_INT_SECONDS)
SWITCH = Rule("BOOL", _switch, _check_switch, switch=True)
TEXT = Rule("TEXT", str, _check_text)
READABLE_DIR = Rule("DIR", _path, _check_readable_dir)
WRITABLE_DIR = Rule("DIR", _path_or_none, _check_writable_dir)
FILE_TO_WRITE = Rule("FILE", _path_or_none, _check_file_to_write)


def bundled_models_dir() -> Path:
    """The models shipped with cellstream: inside the wheel, or the repository's models/ in a checkout."""
    package_dir = Path(__file__).resolve().parent
    installed = package_dir / "models"
    return installed if installed.is_dir() else package_dir.parent.parent / "models"


def setting(default: Any, rule: Rule, about: str) -> Any:
    """A Settings field: its default, the rule its values obey, and its --help text."""
    return field(default=default, metadata={"help": about, "rule": rule})


@dataclass(frozen=True)
class Settings:
    """Every tunable of the server; each field is a flag `--name-with-dashes` and `CELLSTREAM_NAME`."""

    address: str = setting("127.0.0.1:50051", host_port(optional=False), "gRPC listen address")
    metrics_address: str = setting(
        "127.0.0.1:9095", host_port(optional=True), "Prometheus /metrics HTTP address ('' = off)"
    )
    models: Path = field(
        default_factory=bundled_models_dir, metadata={"help": "model repository dir", "rule": READABLE_DIR}
    )
    default_model: str = setting(
        "", TEXT, "model for requests naming none ('' = the repository's DEFAULT file, or its only model)"
    )
    max_batch: int = setting(2048, COUNT, "most streams in one onnxruntime run")
    max_queue: int = setting(
        100_000, LIMIT, "readings waiting per model before RESOURCE_EXHAUSTED (0 = no limit)"
    )
    max_streams: int = setting(0, LIMIT, "streams per server (0 = no limit)")
    evict: str = setting(
        "none", choice("none", "lru"), "at --max-streams: 'none' refuses new streams, 'lru' evicts the idlest"
    )
    stream_ttl: float = setting(0.0, INTERVAL, "drop streams idle this many seconds (0 = never)")
    state_dir: Path | None = field(
        default=None,
        metadata={
            "help": "snapshot streams here and restore them at start (off if unset)",
            "rule": WRITABLE_DIR,
        },
    )
    model_poll_interval: float = setting(
        5.0, INTERVAL, "seconds between checks of the model repository for new versions (0 = off)"
    )
    migrate_streams: bool = setting(
        False, SWITCH, "move live streams to a new model version that has the same states"
    )
    snapshot_interval: float = setting(30.0, INTERVAL, "seconds between snapshots (0 = only the final one)")
    snapshot_keep: int = setting(3, COUNT, "snapshot files kept (older ones are fallbacks)")
    snapshot_chunk_rows: int = setting(16_384, COUNT, "rows a snapshot copies per pause of a model's traffic")
    max_batch_request: int = setting(100_000, COUNT, "most readings in one StepBatch request")
    max_message_bytes: int = setting(64 * 1024 * 1024, C_INT_COUNT, "largest gRPC message accepted or sent")
    stream_window: int = setting(1024, COUNT, "unanswered readings per StepStream call before reading pauses")
    max_import_bytes: int = setting(
        1 << 30, COUNT, "largest snapshot file ImportStates takes (bytes, in all)"
    )
    max_connections: int = setting(4096, C_INT_COUNT, "open client connections before new ones are refused")
    handshake_timeout: float = setting(
        10.0,
        seconds(most=C_INT_SECONDS, positive=True),
        "seconds a new connection has to finish its handshake",
    )
    connection_idle_timeout: float = setting(
        600.0, GRPC_TIMEOUT, "close a connection with no call for this many seconds (0 = never)"
    )
    intra_op_threads: int = setting(1, COUNT, "onnxruntime threads per model run")
    compute_threads: int = setting(
        2, COUNT, "threads running the session.run calls of one large plan in parallel"
    )
    inline_batch: int = setting(
        256, LIMIT, "runs of at most this many readings stay on the event loop (no thread hop; 0 = none)"
    )
    drain_seconds: float = setting(10.0, INTERVAL, "on SIGTERM, how long in-flight work may take to finish")
    event_loop: str = setting(
        "asyncio",
        choice("asyncio", "uvloop", needs=_uvloop_installed),
        "'asyncio', or 'uvloop' (the [uvloop] extra)",
    )
    tune_malloc: bool = setting(
        True, SWITCH, "keep freed memory for reuse (glibc mallopt): faster large messages"
    )
    ready_file: Path | None = field(
        default=None,
        metadata={
            "help": "write {address, metrics_address, pid} JSON here once SERVING",
            "rule": FILE_TO_WRITE,
        },
    )
    log_level: str = setting(
        "INFO",
        Rule("LEVEL", str.upper, _check_log_level),
        "DEBUG, INFO, WARNING, ERROR or CRITICAL (any case)",
    )
    log_format: str = setting(
        "text", choice("text", "json"), "log lines as text, or one JSON object per line"
    )
    access_log: bool = setting(
        False, SWITCH, "log one line per RPC, and one per StepStream call at its end with its counts"
    )
    otlp_endpoint: str = setting(
        "",
        Rule("HOST:PORT", str, _check_otlp_endpoint),
        "send traces over OTLP/gRPC to this collector ('' = no tracing; the [otel] extra)",
    )


def rule_of(spec: dataclasses.Field[Any]) -> Rule:
    rule: Rule = spec.metadata["rule"]
    return rule


def default_of(spec: dataclasses.Field[Any]) -> object:
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return spec.default


def _shown(value: object) -> str:
    """A default as a user would type it."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return "''" if value == "" else str(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; argparse defaults stay None so variables and defaults fill in,
    and every value is parsed and checked by its rule in settings_from (one message format)."""
    for spec in dataclasses.fields(Settings):
        rule, flag = rule_of(spec), flag_of(spec.name)
        about = f"{spec.metadata['help']}; default {_shown(default_of(spec))} [{env_of(spec.name)}]"
        about = about.replace("%", "%%")  # argparse %-formats help texts
        if rule.switch:
            parser.add_argument(flag, dest=spec.name, nargs="?", const="true", metavar="BOOL", help=about)
            parser.add_argument(
                "--no-" + flag[2:], dest=spec.name, action="store_const", const="false", help=f"{flag} false"
            )
        else:
            parser.add_argument(flag, dest=spec.name, metavar=rule.metavar, help=about)


def settings_from(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Flags win over CELLSTREAM_* variables, which win over the defaults; every value, defaults
    included, must pass its rule. Raises SettingError naming where the bad value came from."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for spec in dataclasses.fields(Settings):
        rule, flag, var = rule_of(spec), flag_of(spec.name), env_of(spec.name)
        given = getattr(args, spec.name, None)
        try:
            if given is not None:
                origin, other = f"{flag} {quoted(str(given))}", var
                value = rule.parse(str(given))
            elif var in env:
                origin, other = f"{var}={quoted(env[var])}", flag
                value = rule.parse(env[var])
            else:  # a default can fail too: a models directory missing from an install
                value = default_of(spec)
                origin, other = f"the default {flag} {quoted(_shown(value))}", var
            rule.check(value)
        except ValueError as exc:
            raise SettingError(f"{origin}: {exc} ({other})") from None
        values[spec.name] = value
    return Settings(**values)
