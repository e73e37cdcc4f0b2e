"""Settings: one frozen object built at start from flags and CELLSTREAM_* variables."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ENV_PREFIX = "CELLSTREAM_"


def bundled_models_dir() -> Path:
    """The models shipped with cellstream: inside the wheel, or the repository's models/ in a checkout."""
    package_dir = Path(__file__).resolve().parent
    installed = package_dir / "models"
    return installed if installed.is_dir() else package_dir.parent.parent / "models"


@dataclass(frozen=True)
class Settings:
    """Every tunable of the server; each field is a flag `--name-with-dashes` and `CELLSTREAM_NAME`."""

    address: str = field(default="127.0.0.1:50051", metadata={"help": "gRPC listen address"})
    metrics_address: str = field(
        default="127.0.0.1:9095", metadata={"help": "Prometheus /metrics HTTP address ('' = off)"}
    )
    models: Path = field(default_factory=bundled_models_dir, metadata={"help": "model repository dir"})
    default_model: str = field(
        default="",
        metadata={
            "help": "model for requests naming none ('' = the repository's DEFAULT file, or its only model)"
        },
    )
    max_batch: int = field(default=2048, metadata={"help": "most streams in one onnxruntime run"})
    max_queue: int = field(
        default=100_000,
        metadata={"help": "readings waiting per model before RESOURCE_EXHAUSTED (0 = no limit)"},
    )
    max_streams: int = field(default=0, metadata={"help": "streams per server (0 = no limit)"})
    evict: str = field(
        default="none",
        metadata={"help": "at --max-streams: 'none' refuses new streams, 'lru' evicts the idlest"},
    )
    stream_ttl: float = field(
        default=0.0, metadata={"help": "drop streams idle this many seconds (0 = never)"}
    )
    state_dir: Path | None = field(
        default=None, metadata={"help": "snapshot streams here and restore them at start (off if unset)"}
    )
    model_poll_interval: float = field(
        default=5.0,
        metadata={"help": "seconds between checks of the model repository for new versions (0 = off)"},
    )
    migrate_streams: bool = field(
        default=False, metadata={"help": "move live streams to a new model version that has the same states"}
    )
    snapshot_interval: float = field(default=30.0, metadata={"help": "seconds between snapshots"})
    snapshot_keep: int = field(default=3, metadata={"help": "snapshot files kept (older ones are fallbacks)"})
    snapshot_chunk_rows: int = field(
        default=16_384, metadata={"help": "rows a snapshot copies per pause of a model's traffic"}
    )
    max_batch_request: int = field(
        default=100_000, metadata={"help": "most readings in one StepBatch request"}
    )
    max_message_bytes: int = field(
        default=64 * 1024 * 1024, metadata={"help": "largest gRPC message accepted or sent"}
    )
    stream_window: int = field(
        default=1024, metadata={"help": "unanswered readings per StepStream call before reading pauses"}
    )
    max_import_bytes: int = field(
        default=1 << 30, metadata={"help": "largest snapshot file ImportStates takes (bytes, in all)"}
    )
    max_connections: int = field(
        default=4096, metadata={"help": "open client connections before new ones are refused"}
    )
    handshake_timeout: float = field(
        default=10.0, metadata={"help": "seconds a new connection has to finish its handshake"}
    )
    connection_idle_timeout: float = field(
        default=600.0, metadata={"help": "close a connection with no call for this many seconds (0 = never)"}
    )
    intra_op_threads: int = field(default=1, metadata={"help": "onnxruntime threads per model run"})
    compute_threads: int = field(
        default=2, metadata={"help": "threads running the session.run calls of one large plan in parallel"}
    )
    inline_batch: int = field(
        default=256,
        metadata={"help": "runs of at most this many readings stay on the event loop (no thread hop)"},
    )
    drain_seconds: float = field(
        default=10.0, metadata={"help": "on SIGTERM, how long in-flight work may take to finish"}
    )
    event_loop: str = field(
        default="asyncio", metadata={"help": "'asyncio', or 'uvloop' (the [uvloop] extra)"}
    )
    tune_malloc: bool = field(
        default=True, metadata={"help": "keep freed memory for reuse (glibc mallopt): faster large messages"}
    )
    ready_file: Path | None = field(
        default=None, metadata={"help": "write {address, metrics_address, pid} JSON here once SERVING"}
    )
    log_level: str = field(default="INFO", metadata={"help": "logging level"})


def _parse(kind: object, raw: str) -> object:
    if kind in (int, "int"):
        return int(raw)
    if kind in (float, "float"):
        return float(raw)
    if kind in (bool, "bool"):
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    if kind in (Path, "Path"):
        return Path(raw)
    if kind in ("Path | None",):
        return Path(raw) if raw else None
    return raw


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare one flag per Settings field; defaults stay None so env and built-ins can fill in."""
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        env = ENV_PREFIX + f.name.upper()
        parser.add_argument(flag, dest=f.name, default=None, help=f"{f.metadata.get('help', '')} [{env}]")


def settings_from(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Flags win over CELLSTREAM_* variables, which win over the defaults."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for f in dataclasses.fields(Settings):
        raw = getattr(args, f.name, None)
        if raw is None:
            raw = env.get(ENV_PREFIX + f.name.upper())
        if raw is None:
            continue
        try:
            values[f.name] = _parse(f.type, str(raw))
        except ValueError as exc:
            raise SystemExit(f"bad value for {f.name}: {raw!r} ({exc})") from exc
    return Settings(**values)  # type: ignore[arg-type]
