"""Snapshot files: every stream's state, step and last reply, written atomically, verified on read.

Format version 1, little-endian (docs/state.md has the full table): magic b"CELLSNAP", u32 version,
u32 header length, a JSON header {"created_unix", "generation", "models": [{"name", "version",
"sha256", "output_size", "count", "states": [{"name", "shape"}], "sections": [byte sizes]}]}, then
per model its sections (ids joined by "\n", steps u64, replayable u8, last outputs f32, one f32
section per state), then the SHA-256 of everything before it.

The checksum proves the bytes are intact, not who wrote them, so decode() checks every field as the
live API would and refuses a file whole with SnapshotError. The newest file of a directory is the
highest `generation` inside it (0 for exports and older files), never its name or the clock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

import numpy as np

from cellstream.ids import first_key_problem
from cellstream.streams.store import StreamRows

log = logging.getLogger(__name__)

MAGIC = b"CELLSNAP"
VERSION = 1
SUFFIX = ".csnap"
TMP_SUFFIX = SUFFIX + ".tmp"
# A model's header is a few hundred bytes; the bound keeps ordering reads small and refuses junk early.
MAX_HEADER_BYTES = 1 << 20
_MAX_INT64 = 2**63 - 1
MAX_GENERATION = _MAX_INT64
# Values in one stream's state or reply: far above any cell model, small enough that no shape overflows.
MAX_VALUES_PER_STREAM = 2**31
# numpy allows 32 dimensions (64 since 2.0); one is the stream axis.
MAX_STATE_DIMS = 31
_PREFIX = struct.Struct("<8sII")
_DIGEST = 32
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class SnapshotError(Exception):
    """A snapshot file is truncated, corrupt, malformed or of an unknown version."""


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


def encode(
    sections: Sequence[ModelSection], created: float | None = None, *, generation: int = 0
) -> list[bytes]:
    """The file's bytes as a list of chunks (no single giant copy of the slabs).

    `generation` orders files in a state directory; an export keeps 0 so that, dropped into a
    directory that already holds snapshots, it never overrides newer data.
    """
    if type(generation) is not int or not 0 <= generation <= MAX_GENERATION:
        raise ValueError(f"generation {generation!r} is not an integer from 0 to {MAX_GENERATION}")
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
    stamp = time.time() if created is None else created
    header = json.dumps({"created_unix": stamp, "generation": generation, "models": headers}).encode()
    chunks = [_PREFIX.pack(MAGIC, VERSION, len(header)), header, *payload]
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    chunks.append(digest.digest())
    return chunks


def decode(data: bytes | bytearray) -> tuple[float, list[ModelSection]]:
    """(created_unix, sections) of a whole file; SnapshotError, and no other error, for any other bytes."""
    view = memoryview(data)
    if len(view) < _PREFIX.size + _DIGEST:
        raise SnapshotError(f"{len(view)} bytes is too short to be a snapshot")
    body = view[:-_DIGEST]
    if hashlib.sha256(body).digest() != bytes(view[-_DIGEST:]):
        raise SnapshotError("checksum mismatch: the file is truncated or corrupt")
    header_len = _header_length(bytes(body[: _PREFIX.size]), len(view))
    header = _parse_header(body[_PREFIX.size : _PREFIX.size + header_len])
    created = _created(header)
    _generation(header)
    models = header.get("models")
    if not isinstance(models, list):
        raise SnapshotError(f"header: 'models' is {_show(models)}, not a list")
    offset = _PREFIX.size + header_len
    sections: list[ModelSection] = []
    seen_ids: set[str] = set()
    for index, model in enumerate(models):
        section, offset = _read_model(model, index, body, offset, seen_ids)
        if any((s.name, s.version) == (section.name, section.version) for s in sections):
            raise SnapshotError(
                f"{_where(section.name, section.version)}: the file holds this model version twice"
            )
        sections.append(section)
    if offset != len(body):
        raise SnapshotError(f"{len(body) - offset} bytes left over after the last section")
    return created, sections


def _read_model(
    model: object, index: int, body: memoryview, offset: int, seen_ids: set[str]
) -> tuple[ModelSection, int]:
    """One model's header checked field by field, then its sections at `offset`, each exactly the
    size its count and shapes imply (so nothing is broadcast or cut short); and the next offset."""
    if not isinstance(model, dict):
        raise SnapshotError(f"models[{index}] is {_show(model)}, not an object")
    name = _text(model.get("name"), f"models[{index}].name")
    version = _text(model.get("version"), f"model {name!r}: version")
    where = _where(name, version)
    sha256 = model.get("sha256")
    if not isinstance(sha256, str) or not _SHA256_HEX.fullmatch(sha256):
        raise SnapshotError(f"{where}: sha256 is {_show(sha256)}, not 64 lowercase hex digits")
    output_size = _integer(model.get("output_size"), f"{where}: output_size", 1, MAX_VALUES_PER_STREAM)
    count = _integer(model.get("count"), f"{where}: count", 0, _MAX_INT64)
    states = model.get("states")
    if not isinstance(states, list):
        raise SnapshotError(f"{where}: states is {_show(states)}, not a list")
    names: list[str] = []
    shapes: list[tuple[int, ...]] = []
    for k, state in enumerate(states):
        if not isinstance(state, dict):
            raise SnapshotError(f"{where}: states[{k}] is {_show(state)}, not an object")
        names.append(_text(state.get("name"), f"{where}: states[{k}].name"))
        if names[-1] in names[:-1]:
            raise SnapshotError(f"{where}: state {names[-1]!r} is listed twice")
        shapes.append(_shape(state.get("shape"), f"{where}: state {names[-1]!r} shape"))
    sizes = model.get("sections")
    if not isinstance(sizes, list) or len(sizes) != 4 + len(states):
        raise SnapshotError(
            f"{where}: sections is {_show(sizes)}; {len(states)} states need a list of "
            f"{4 + len(states)} sizes"
        )
    # ids have no fixed size, but none at all when there are no streams.
    expected = [None if count else 0, 8 * count, count, 4 * count * output_size]
    expected += [4 * count * math.prod(shape) for shape in shapes]
    labels = ["ids", "steps", "replayable", "last_output", *(f"state {n!r}" for n in names)]
    for label, size, want in zip(labels, sizes, expected, strict=True):
        _integer(size, f"{where}: {label} section size", 0, _MAX_INT64)
        if want is not None and size != want:
            raise SnapshotError(f"{where}: {label} section is {size} bytes; {count} streams need {want}")
    starts = list(accumulate(sizes, initial=offset))  # where each section begins; the last: the end
    if starts[-1] > len(body):
        raise SnapshotError(f"{where}: its sections run past the end of the file")
    ids = _ids(body[starts[0] : starts[1]], count, where, seen_ids)
    steps = np.frombuffer(body, "<u8", count, starts[1]).astype(np.uint64)
    replayable = np.frombuffer(body, np.uint8, count, starts[2])
    if count and replayable.max() > 1:
        raise SnapshotError(f"{where}: a replayable flag is {int(replayable.max())}, not 0 or 1")
    last_output = _floats(body, starts[3], (count, output_size), f"{where}: last outputs")
    values = [
        _floats(body, start, (count, *shape), f"{where}: state {n!r} values")
        for n, shape, start in zip(names, shapes, starts[4:-1], strict=True)
    ]
    rows = StreamRows(ids, steps, replayable.astype(bool), last_output, values)
    return ModelSection(name, version, sha256, output_size, names, shapes, rows), starts[-1]


def _where(name: str, version: str) -> str:
    return f"model {name!r} version {version!r}"


def _ids(raw: memoryview, count: int, where: str, seen: set[str]) -> list[str]:
    """Stream keys that each pass the live id rule (with their tenant's name, if any) and are
    distinct across the whole file."""
    if not count:
        return []
    try:
        ids = str(raw, "utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise SnapshotError(f"{where}: stream ids are not valid UTF-8 ({exc.reason})") from exc
    if len(ids) != count:
        raise SnapshotError(f"{where}: {len(ids)} ids for {count} streams")
    problem = first_key_problem(ids)
    if problem is not None:
        raise SnapshotError(f"{where}: {problem[1]}")
    before = len(seen)
    seen.update(ids)
    if len(seen) != before + count:
        raise SnapshotError(f"{where}: {before + count - len(seen)} stream ids appear twice in the file")
    return ids


def _floats(body: memoryview, offset: int, shape: tuple[int, ...], where: str) -> np.ndarray:
    values = np.frombuffer(body, "<f4", math.prod(shape), offset).reshape(shape).astype(np.float32)
    if not np.isfinite(values).all():
        raise SnapshotError(f"{where} include NaN or infinite values")
    return values


def _header_length(prefix: bytes, file_size: int) -> int:
    """The header's length from the fixed prefix, once magic, version and bounds agree."""
    magic, version, header_len = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise SnapshotError("not a cellstream snapshot (bad magic)")
    if version != VERSION:
        raise SnapshotError(f"snapshot format version {version}; this server reads version {VERSION}")
    if header_len > MAX_HEADER_BYTES:
        raise SnapshotError(f"header of {header_len} bytes; the limit is {MAX_HEADER_BYTES}")
    if _PREFIX.size + header_len + _DIGEST > file_size:
        raise SnapshotError(f"header of {header_len} bytes does not fit in a {file_size} byte file")
    return int(header_len)


def _parse_header(raw: bytes | memoryview) -> dict[str, Any]:
    try:
        header = json.loads(str(raw, "utf-8"))
    # RecursionError: deeply nested JSON; ValueError covers bad UTF-8 and over-long integers.
    except (ValueError, RecursionError) as exc:
        raise SnapshotError(f"unreadable header: {exc}") from exc
    if not isinstance(header, dict):
        raise SnapshotError(f"header is {_show(header)}, not an object")
    return header


def _created(header: dict[str, Any]) -> float:
    created = header.get("created_unix")
    # Comparisons, not float(): an integer too large for a float must be refused, not raise.
    if isinstance(created, bool) or not isinstance(created, int | float) or not -1e18 < created < 1e18:
        raise SnapshotError(f"header: created_unix is {_show(created)}, not a finite number of seconds")
    return float(created)


def _generation(header: dict[str, Any]) -> int:
    """Files written before generations existed read as 0, like exports."""
    return _integer(header.get("generation", 0), "header: generation", 0, MAX_GENERATION)


def _integer(value: object, where: str, low: int, high: int) -> int:
    # type() rather than isinstance: JSON true/false are bools, which Python counts as ints.
    if type(value) is not int or not low <= value <= high:
        raise SnapshotError(f"{where} is {_show(value)}, not an integer from {low} to {high}")
    return value


def _text(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise SnapshotError(f"{where} is {_show(value)}, not a non-empty string")
    return value


def _shape(value: object, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_STATE_DIMS:
        raise SnapshotError(f"{where} is {_show(value)}, not a list of at most {MAX_STATE_DIMS} sizes")
    shape = tuple(_integer(dim, where, 1, MAX_VALUES_PER_STREAM) for dim in value)
    if math.prod(shape) > MAX_VALUES_PER_STREAM:
        raise SnapshotError(f"{where} is {list(shape)}: over {MAX_VALUES_PER_STREAM} values per stream")
    return shape


def _show(value: object) -> str:
    """A field's value for an error message, cut short: crafted files may hold huge ones."""
    text = "missing" if value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _read_order(path: Path) -> tuple[int, float]:
    """(generation, created_unix) from the fixed prefix and header alone, to order files cheaply."""
    with path.open("rb") as file:
        size = os.fstat(file.fileno()).st_size
        prefix = file.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size:
            raise SnapshotError(f"{size} bytes is too short to be a snapshot")
        header_len = _header_length(prefix, size)
        header = _parse_header(file.read(header_len))
    return _generation(header), _created(header)


def write_atomic(path: Path, chunks: Sequence[bytes]) -> int:
    """Temp file (0600), fsync, rename, fsync the directory: a crash leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    # A leftover temp file may be a link or readable by others: start from a fresh file.
    tmp.unlink(missing_ok=True)
    size = 0
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
            for chunk in chunks:
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return size


def _rank(path: Path) -> tuple[int, float, str]:
    """Ties (exports, files from before generations) go by created_unix, then name."""
    try:
        generation, created = _read_order(path)
    except (OSError, SnapshotError):
        return -1, 0.0, path.name  # unreadable: ranked last, so tried last and deleted first
    return generation, created, path.name


class SnapshotDir:
    """The snapshots of one state directory, newest generation first; a few kept for fallback."""

    def __init__(self, root: Path, keep: int = 3) -> None:
        self.root = root
        self.keep = keep
        self._open()

    def _open(self) -> None:
        """Create the directory 0700 (snapshots hold every stream's state); clear crashed writes."""
        self.root.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.root.mkdir(mode=0o700)
        except FileExistsError:
            if not self.root.is_dir():
                raise NotADirectoryError(f"state directory {self.root} is not a directory") from None
            mode = self.root.stat().st_mode & 0o777
            if mode & 0o077:
                log.warning(
                    "state directory %s has mode %o: others can read every stream's state (chmod 700 it)",
                    self.root,
                    mode,
                )
        for stale in self.root.glob(f"*{TMP_SUFFIX}"):
            log.warning("removing %s, left by a snapshot write that did not finish", stale.name)
            try:
                stale.unlink(missing_ok=True)
            except OSError as exc:  # e.g. a directory of that name: not worth refusing to start
                log.warning("could not remove %s: %s", stale.name, exc)

    def _ranked(self) -> list[tuple[tuple[int, float, str], Path]]:
        """Every snapshot file by (generation, created_unix, name), newest first."""
        files = [path for path in self.root.glob(f"*{SUFFIX}") if path.is_file()]  # no dirs or FIFOs
        return sorted(((_rank(path), path) for path in files), reverse=True)

    def files(self) -> list[Path]:
        """Newest first: the order a restore tries them in."""
        return [path for _, path in self._ranked()]

    def write(self, sections: Sequence[ModelSection]) -> tuple[Path, int]:
        """Write the next generation, then drop all but the `keep` newest (never the new one)."""
        ranked = self._ranked()
        generation = max([0, *(rank[0] for rank, _ in ranked)]) + 1
        if generation > MAX_GENERATION:
            raise SnapshotError(f"a file in {self.root} claims generation {generation - 1}, the last one")
        path = self.root / f"snapshot-{generation:020d}{SUFFIX}"
        size = write_atomic(path, encode(sections, generation=generation))
        older = [old for _, old in ranked if old != path]
        for old in older[max(self.keep, 1) - 1 :]:
            try:
                old.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not remove old snapshot %s: %s", old.name, exc)
        return path, size

    def newest_valid(self) -> tuple[Path, list[ModelSection]] | None:
        """The newest file that reads back whole; unusable ones are reported and skipped."""
        for path in self.files():
            try:
                _, sections = decode(path.read_bytes())
            except (OSError, SnapshotError) as exc:
                log.error("snapshot %s is unusable (%s); trying the previous one", path.name, exc)
                continue
            return path, sections
        return None
