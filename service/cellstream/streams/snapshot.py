"""Snapshot files: every stream's state, step and last reply, written atomically, verified on read.

Format version 1 (little-endian), one file per snapshot, `snapshot-<unix ms>.csnap`:

    magic        8 bytes   b"CELLSNAP"
    version      u32       1
    header_len   u32       length of the JSON header
    header       JSON      {"created_unix": float, "models": [ModelHeader...]}
    sections     bytes     for each model, in header order: ids, steps, replayable, last_output,
                           then one section per state; sizes are in the header
    sha256       32 bytes  of everything above

ModelHeader: {"name", "version", "sha256" (of model.onnx), "output_size", "count",
"states": [{"name", "shape"}], "sections": [byte sizes]}. Stream ids are joined with "\n"
(ids never hold control characters). steps are u64, replayable u8, floats f32.
A file whose checksum, magic, version or sizes do not add up is refused as a whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellstream.streams.store import StreamRows

log = logging.getLogger(__name__)

MAGIC = b"CELLSNAP"
VERSION = 1
SUFFIX = ".csnap"
_PREFIX = struct.Struct("<8sII")
_DIGEST = 32


class SnapshotError(Exception):
    """A snapshot file is truncated, corrupt or of an unknown version."""


@dataclass
class ModelSection:
    """The streams of one model version in a snapshot."""

    name: str
    version: str
    sha256: str
    output_size: int
    state_names: list[str]
    state_shapes: list[tuple[int, ...]]
    rows: StreamRows


def encode(sections: Sequence[ModelSection], created: float | None = None) -> list[bytes]:
    """The file's bytes as a list of chunks (no single giant copy of the slabs)."""
    headers, payload = [], []
    for section in sections:
        rows = section.rows
        parts = [
            "\n".join(rows.ids).encode(),
            np.ascontiguousarray(rows.steps, "<u8").tobytes(),
            np.ascontiguousarray(rows.replayable, np.uint8).tobytes(),
            np.ascontiguousarray(rows.last_output, "<f4").tobytes(),
            *(np.ascontiguousarray(state, "<f4").tobytes() for state in rows.states),
        ]
        headers.append(
            {
                "name": section.name,
                "version": section.version,
                "sha256": section.sha256,
                "output_size": section.output_size,
                "count": len(rows),
                "states": [
                    {"name": n, "shape": list(s)}
                    for n, s in zip(section.state_names, section.state_shapes, strict=True)
                ],
                "sections": [len(p) for p in parts],
            }
        )
        payload.extend(parts)
    header = json.dumps(
        {"created_unix": time.time() if created is None else created, "models": headers}
    ).encode()
    chunks = [_PREFIX.pack(MAGIC, VERSION, len(header)), header, *payload]
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    chunks.append(digest.digest())
    return chunks


def decode(data: bytes) -> tuple[float, list[ModelSection]]:
    if len(data) < _PREFIX.size + _DIGEST:
        raise SnapshotError(f"{len(data)} bytes is too short to be a snapshot")
    body, digest = memoryview(data)[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise SnapshotError("checksum mismatch: the file is truncated or corrupt")
    magic, version, header_len = _PREFIX.unpack_from(body)
    if magic != MAGIC:
        raise SnapshotError("not a cellstream snapshot (bad magic)")
    if version != VERSION:
        raise SnapshotError(f"snapshot format version {version}; this server reads version {VERSION}")
    offset = _PREFIX.size
    try:
        header = json.loads(bytes(body[offset : offset + header_len]))
    except ValueError as exc:
        raise SnapshotError(f"unreadable header: {exc}") from exc
    offset += header_len
    sections = []
    for model in header["models"]:
        raw = []
        for size in model["sections"]:
            raw.append(bytes(body[offset : offset + size]))
            offset += size
        count = model["count"]
        shapes = [tuple(s["shape"]) for s in model["states"]]
        ids = raw[0].decode().split("\n") if count else []
        if len(ids) != count:
            raise SnapshotError(f"model {model['name']}: {len(ids)} ids for {count} streams")
        try:
            rows = StreamRows(
                ids=ids,
                steps=np.frombuffer(raw[1], "<u8").astype(np.uint64),
                replayable=np.frombuffer(raw[2], np.uint8).astype(bool),
                last_output=np.frombuffer(raw[3], "<f4")
                .reshape(count, model["output_size"])
                .astype(np.float32),
                states=[
                    np.frombuffer(r, "<f4").reshape(count, *shape).astype(np.float32)
                    for r, shape in zip(raw[4:], shapes, strict=True)
                ],
            )
        except ValueError as exc:
            raise SnapshotError(f"model {model['name']}: section sizes do not fit: {exc}") from exc
        sections.append(
            ModelSection(
                model["name"],
                model["version"],
                model["sha256"],
                model["output_size"],
                [s["name"] for s in model["states"]],
                shapes,
                rows,
            )
        )
    if offset != len(body):
        raise SnapshotError(f"{len(body) - offset} bytes left over after the last section")
    return float(header["created_unix"]), sections


def write_atomic(path: Path, chunks: Sequence[bytes]) -> int:
    """Temp file, fsync, rename, fsync the directory: a crash leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    size = 0
    with tmp.open("wb") as out:
        for chunk in chunks:
            out.write(chunk)
            size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return size


class SnapshotDir:
    """The snapshots of one state directory: newest first, a few kept for fallback."""

    def __init__(self, root: Path, keep: int = 3) -> None:
        self.root = root
        self.keep = keep
        root.mkdir(parents=True, exist_ok=True)

    def files(self) -> list[Path]:
        return sorted(self.root.glob(f"snapshot-*{SUFFIX}"), key=lambda p: p.name, reverse=True)

    def write(self, sections: Sequence[ModelSection]) -> tuple[Path, int]:
        created = time.time()
        path = self.root / f"snapshot-{int(created * 1000):015d}{SUFFIX}"
        size = write_atomic(path, encode(sections, created))
        for old in self.files()[self.keep :]:
            old.unlink(missing_ok=True)
        return path, size

    def newest_valid(self) -> tuple[Path, list[ModelSection]] | None:
        """The newest file that reads back whole; corrupt ones are reported and skipped."""
        for path in self.files():
            try:
                _, sections = decode(path.read_bytes())
            except (OSError, SnapshotError, KeyError, TypeError) as exc:
                log.error("snapshot %s is unusable (%s); trying the previous one", path.name, exc)
                continue
            return path, sections
        return None
