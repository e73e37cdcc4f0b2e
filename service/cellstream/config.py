"""Settings: one frozen object built at start from flags and CELLSTREAM_* variables.

Each field carries its rule in its metadata: how its text becomes a value and which values it
allows. A new setting brings its check with it, and a bad value is refused, naming the flag or the
variable it came from, before anything starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellstream.config_rules import (
    AUTH_FILE,
    C_INT_COUNT,
    CERTIFICATES,
    CLUSTER_MAP,
    COUNT,
    EVENT_LOOP,
    EVICT,
    FILE_TO_WRITE,
    GRPC_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    INTERVAL,
    LIMIT,
    LOG_FORMAT,
    LOG_LEVEL,
    OTLP_ENDPOINT,
    PRIVATE_KEY,
    READABLE_DIR,
    SWITCH,
    TEXT,
    WRITABLE_DIR,
    Rule,
    check_key_pair,
    host_port,
)
from cellstream.errors import quoted

ENV_PREFIX = "CELLSTREAM_"
SHOWN_SETTING = 256  # characters of a bad setting's value repeated in its message


class SettingError(ValueError):
    """A setting the server cannot use; the message is one line naming the flag and variable to change."""


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_of(name: str) -> str:
    return ENV_PREFIX + name.upper()


def names_of(name: str) -> str:
    """How a user changes a setting, for a message: `--metrics-address (CELLSTREAM_METRICS_ADDRESS)`."""
    return f"{flag_of(name)} ({env_of(name)})"


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
    tls_cert: Path | None = field(
        default=None,
        metadata={
            "help": "serve gRPC over TLS with this PEM certificate (chain); with --tls-key",
            "rule": CERTIFICATES,
        },
    )
    tls_key: Path | None = field(
        default=None,
        metadata={"help": "the PEM private key of --tls-cert (unencrypted)", "rule": PRIVATE_KEY},
    )
    tls_client_ca: Path | None = field(
        default=None,
        metadata={
            "help": "require client certificates signed by the CA(s) in this PEM file (mTLS)",
            "rule": CERTIFICATES,
        },
    )
    metrics_tls_cert: Path | None = field(
        default=None,
        metadata={
            "help": "serve /metrics over https with this PEM certificate; with --metrics-tls-key",
            "rule": CERTIFICATES,
        },
    )
    metrics_tls_key: Path | None = field(
        default=None, metadata={"help": "the PEM private key of --metrics-tls-cert", "rule": PRIVATE_KEY}
    )
    auth_file: Path | None = field(
        default=None,
        metadata={
            "help": "require a token on every call: the tenants, their token digests and limits "
            "(JSON, see docs/security.md); read again when it changes",
            "rule": AUTH_FILE,
        },
    )
    auth_poll_seconds: float = setting(
        2.0, INTERVAL, "look at --auth-file this often: a revoked token is refused within it (0 = never)"
    )
    cluster_map: Path | None = field(
        default=None,
        metadata={
            "help": "serve only the shards this map gives --replica-name; others are refused, naming "
            "their owner (docs/scaling.md). Unset: a cluster of one",
            "rule": CLUSTER_MAP,
        },
    )
    cluster_peer_timeout: float = setting(
        0.5,
        INTERVAL,
        "at start, ask each peer of --cluster-map for a newer map, waiting this long (0 = do not ask)",
    )
    replica_name: str = setting(
        "", TEXT, "this replica's name in --cluster-map ('' = the host name, a pod's name)"
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
        "none", EVICT, "at --max-streams: 'none' refuses new streams, 'lru' evicts the idlest"
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
    max_model_bytes: int = setting(
        1 << 30,
        COUNT,
        "largest model loaded (bytes): model.onnx plus the external data files it names; a bigger "
        "one is refused before it is read",
    )
    max_connections: int = setting(4096, C_INT_COUNT, "open client connections before new ones are refused")
    handshake_timeout: float = setting(
        10.0,
        HANDSHAKE_TIMEOUT,
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
        EVENT_LOOP,
        "'asyncio', or 'uvloop' (the [uvloop] extra)",
    )
    tune_malloc: bool = setting(
        True, SWITCH, "keep freed memory for reuse (glibc mallopt): faster large messages"
    )
    ready_file: Path | None = field(
        default=None,
        metadata={
            "help": "write {address, metrics_address, pid, tls, mtls, metrics_tls} JSON here once SERVING",
            "rule": FILE_TO_WRITE,
        },
    )
    log_level: str = setting(
        "INFO",
        LOG_LEVEL,
        "DEBUG, INFO, WARNING, ERROR or CRITICAL (any case)",
    )
    log_format: str = setting("text", LOG_FORMAT, "log lines as text, or one JSON object per line")
    access_log: bool = setting(
        False, SWITCH, "log one line per RPC, and one per StepStream call at its end with its counts"
    )
    otlp_endpoint: str = setting(
        "",
        OTLP_ENDPOINT,
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
    included, must pass its rule, and settings that go together must fit (a TLS key and its
    certificate). Raises SettingError naming where the bad value came from."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    origins: dict[str, tuple[str, str]] = {}  # where each value came from, for a message about two
    for spec in dataclasses.fields(Settings):
        rule, flag, var = rule_of(spec), flag_of(spec.name), env_of(spec.name)
        given = getattr(args, spec.name, None)
        try:
            if given is not None:
                origin, other = f"{flag} {quoted(str(given), SHOWN_SETTING)}", var
                value = rule.parse(str(given))
            elif var in env:
                origin, other = f"{var}={quoted(env[var], SHOWN_SETTING)}", flag
                value = rule.parse(env[var])
            else:  # a default can fail too: a models directory missing from an install
                value = default_of(spec)
                origin, other = f"the default {flag} {quoted(_shown(value), SHOWN_SETTING)}", var
            rule.check(value)
        except ValueError as exc:
            raise SettingError(f"{origin}: {exc} ({other})") from None
        values[spec.name] = value
        origins[spec.name] = origin, other
    mismatch = _mismatch(values)
    if mismatch is not None:
        name, why = mismatch
        origin, other = origins[name]
        raise SettingError(f"{origin}: {why} ({other})")
    return Settings(**values)


# A certificate and its key: one is no use without the other.
KEY_PAIRS = (("tls_cert", "tls_key"), ("metrics_tls_cert", "metrics_tls_key"))


def _mismatch(values: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first setting that does not fit with the others (to name in the message), and why."""
    for cert, key in KEY_PAIRS:
        if (values[cert] is None) != (values[key] is None):
            given, missing = (cert, key) if values[key] is None else (key, cert)
            return given, f"needs {names_of(missing)} as well: give both, or neither"
        if values[cert] is not None:
            try:
                check_key_pair(values[cert], values[key])
            except ValueError as exc:
                return key, str(exc)
    if values["tls_client_ca"] is not None and values["tls_cert"] is None:
        return "tls_client_ca", (
            f"client certificates need TLS: give {names_of('tls_cert')} and {names_of('tls_key')} too"
        )
    return None
