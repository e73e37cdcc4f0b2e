"""Which files a model file pulls in, and whether they may be used.

An ONNX tensor may keep its bytes in another file (external data): `external_data` entries
`location` (relative to the model's directory), `offset` and `length`, which onnxruntime opens.
A hostile model could name `../../etc/passwd`, an absolute path, a link out of its directory or
a 50 GB file, so every such entry is found and checked before onnxruntime is given the model.
onnx is a test dependency only, so the entries are found by walking the protobuf wire format of
the bytes already read (field numbers from onnx/onnx.proto): one pass, linear in the file size.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cellstream.errors import ModelLoadError, quoted

MAX_DEPTH = 100  # protobuf's default recursion limit, which onnxruntime's parser keeps
MEMORY_TAG = "*/_ORT_MEM_ADDR_/*"  # onnxruntime reads this "location" as a memory address, never a file
KEEP_NEXT = "keep external data files next to model.onnx"
AGAIN = "export the model and its external data again"
MAX_DIGITS = 19  # of an offset or a length: an int64, as onnxruntime reads them
SHOWN = 200  # characters of a tensor name or location quoted: paths run longer than a client's strings

_VARINT, _FIXED64, _LENGTH, _GROUP_START, _GROUP_END, _FIXED32 = range(6)

# The messages that can hold a TensorProto, and the field numbers leading to one (onnx.proto):
# ModelProto graph, training_info, functions; a graph's initializers, sparse initializers and
# nodes; a node's attributes; an attribute's tensors, sparse tensors and subgraphs (If, Loop, Scan).
_CHILDREN: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node", 11: "attribute"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION, _EXTERNAL = 8, 13, 14, 1
_ENTRY_KEY, _ENTRY_VALUE = 1, 2


class Unreadable(Exception):
    """The bytes are not a protobuf message (or nest past MAX_DEPTH): onnxruntime cannot parse them either."""


@dataclass(frozen=True)
class ExternalTensor:
    """One tensor that keeps its data elsewhere: its name and its `external_data` entries, in order."""

    name: str
    entries: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class DataFiles:
    """The external data files a model pulls in (resolved, each once), or why its bytes were unreadable."""

    paths: tuple[Path, ...]
    unreadable: str | None = None

    def checked(self, path: Path) -> tuple[Path, ...]:
        """The files, once onnxruntime has parsed the model: bytes this walk could not read but
        onnxruntime took would hold entries nobody checked, so that model is refused."""
        if self.unreadable is not None:
            raise ModelLoadError(
                f"{path}: onnxruntime reads it, but its external data cannot be checked ({self.unreadable}): "
                f"export the model again"
            )
        return self.paths


def read_within(path: Path, limit: int) -> bytes:
    """The file's bytes, refused by its size (stat) before any is read, and if it grew past it since."""
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            data = file.read(limit + 1 if size <= limit else 0)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read it ({_why(exc)}): make it a readable file") from exc
    if (size := max(size, len(data))) > limit:
        raise ModelLoadError(f"{path}: is {size} bytes, {_over(limit)}")
    return data


def data_files(path: Path, model: bytes, limit: int) -> DataFiles:
    """Check every external data entry of `model` (the bytes of `path`): inside the model's
    directory, present, long enough, and with the model file within `limit` bytes (by stat; nothing
    is read). Bytes that are no protobuf are left to onnxruntime, whose error says so."""
    try:
        tensors = external_tensors(model)
    except Unreadable as exc:
        return DataFiles((), str(exc))
    check = _Entries(path)
    for tensor in tensors:
        check.tensor(tensor)
    total, files = len(model) + sum(check.sizes.values()), len(check.sizes)
    if total > limit:
        raise ModelLoadError(
            f"{path}: is {total} bytes with its external data ({len(model)} in {path.name}, "
            f"{total - len(model)} in {files} data file{'s' * (files > 1)}), {_over(limit)}"
        )
    return DataFiles(tuple(check.sizes))


def _why(exc: OSError) -> str:
    """The OS's reason alone: the path an OSError quotes may hold a newline, and the message is one line."""
    return exc.strerror or type(exc).__name__


def _over(limit: int) -> str:
    return f"over the limit of {limit} bytes: shrink the model, or raise --max-model-bytes"


class _Entries:
    """The checks of one model file's external data entries, and the files they found (each once)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.home = path.parent.resolve()
        self.sizes: dict[Path, int] = {}
        self._targets: dict[str, Path] = {}  # most models keep every tensor in one file

    def tensor(self, tensor: ExternalTensor) -> None:
        """Refuse the model unless this tensor's entries name a usable span of a file inside its directory."""
        where = f"{self.path}: tensor {quoted(tensor.name, SHOWN)}"
        counts = Counter(key for key, _ in tensor.entries)  # a hostile tensor may hold millions
        if twice := sorted(key for key, count in counts.items() if count > 1):
            raise ModelLoadError(
                f"{where} names {quoted(twice[0])} twice in its external data: write each once"
            )
        entries = dict(tensor.entries)
        location = entries.get("location", "")
        if not location:
            raise ModelLoadError(f"{where} keeps its data in an external file but names none: {KEEP_NEXT}")
        said = f"{where} keeps its data in {quoted(location, SHOWN)}"
        target = self._targets.get(location) or self._target(said, location)
        self._targets[location] = target
        size = self.sizes.get(target)
        if size is None:
            size = self.sizes[target] = self._size(said, target)
        offset, length = _bytes(said, entries, "offset") or 0, _bytes(said, entries, "length")
        if offset + (length or 0) > size:
            span = f"at bytes {offset} to {offset + length}" if length is not None else f"from byte {offset}"
            raise ModelLoadError(f"{said} {span}, but that file has {size} bytes: {AGAIN}")

    def _target(self, said: str, location: str) -> Path:
        if location == MEMORY_TAG or "\0" in location:
            raise ModelLoadError(f"{said}, which is not a file name: {KEEP_NEXT}")
        outside = f"outside the model's directory {self.home}: {KEEP_NEXT}"
        if PurePosixPath(location).is_absolute():
            raise ModelLoadError(f"{said}, an absolute path {outside}")
        try:
            target = (self.path.parent / location).resolve()  # follows links, as opening it would
        except RuntimeError as exc:
            raise ModelLoadError(f"{said}, which cannot be followed (a loop of links): {KEEP_NEXT}") from exc
        except OSError as exc:
            raise ModelLoadError(f"{said}, which cannot be followed ({_why(exc)}): {KEEP_NEXT}") from exc
        if not target.is_relative_to(self.home):
            raise ModelLoadError(f"{said}, which resolves to {target}, {outside}")
        return target

    @staticmethod
    def _size(said: str, target: Path) -> int:
        try:
            info = target.stat()
        except FileNotFoundError as exc:
            raise ModelLoadError(f"{said}, which does not exist ({target}): {KEEP_NEXT}") from exc
        except OSError as exc:
            raise ModelLoadError(f"{said}, which cannot be read ({_why(exc)}): {KEEP_NEXT}") from exc
        if not stat.S_ISREG(info.st_mode):  # a fifo would block the load; a directory holds no data
            raise ModelLoadError(f"{said}, which is not a regular file: {KEEP_NEXT}")
        return info.st_size


def _bytes(said: str, entries: dict[str, str], key: str) -> int | None:
    value = entries.get(key)
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > MAX_DIGITS:
        raise ModelLoadError(
            f"{said} at {key} {quoted(value)}, which is not a whole number of bytes: {AGAIN}"
        )
    return int(value)


def external_tensors(model: bytes) -> list[ExternalTensor]:
    """Every tensor of an ONNX ModelProto that names external data or is marked EXTERNAL: in the
    graph, its subgraphs and functions, as initializer, sparse tensor or node attribute."""
    found: list[ExternalTensor] = []
    _walk(model, 0, len(model), kind="model", depth=0, found=found)
    return found


def _walk(data: bytes, start: int, end: int, *, kind: str, depth: int, found: list[ExternalTensor]) -> None:
    if kind == "tensor":
        if (tensor := _tensor(data, start, end, depth)) is not None:
            found.append(tensor)
        return
    children = _CHILDREN[kind]
    for number, wire, first, last in _fields(data, start, end, depth):
        child = children.get(number)
        # A known field of another wire type is an unknown field to protobuf too: skipped.
        if child is not None and wire == _LENGTH and first < last:  # an empty message holds nothing
            _walk(data, first, last, kind=child, depth=depth + 1, found=found)


def _tensor(data: bytes, start: int, end: int, depth: int) -> ExternalTensor | None:
    name, entries, external = "", [], False
    for number, wire, first, last in _fields(data, start, end, depth):
        if number == _TENSOR_NAME and wire == _LENGTH:
            name = _text(data[first:last])  # protobuf keeps the last of a repeated singular field
        elif number == _TENSOR_EXTERNAL_DATA and wire == _LENGTH:
            entries.append(_entry(data, first, last, depth + 1))
        elif number == _TENSOR_DATA_LOCATION and wire == _VARINT:
            external = first == _EXTERNAL
    # Every entry is checked, marked EXTERNAL or not: protobuf merges split copies of one tensor.
    return ExternalTensor(name, tuple(entries)) if entries or external else None


def _entry(data: bytes, start: int, end: int, depth: int) -> tuple[str, str]:
    key = value = ""
    for number, wire, first, last in _fields(data, start, end, depth):
        if number == _ENTRY_KEY and wire == _LENGTH:
            key = _text(data[first:last])
        elif number == _ENTRY_VALUE and wire == _LENGTH:
            value = _text(data[first:last])
    return key, value


def _text(raw: bytes) -> str:
    """A proto2 string, which protobuf does not check for UTF-8: undecodable bytes kept as the OS would."""
    return os.fsdecode(raw)


def _fields(data: bytes, start: int, end: int, depth: int) -> Iterator[tuple[int, int, int, int]]:
    """Each field of the message in data[start:end], at nesting `depth`: (number, wire type,
    value, end) for a varint, (number, wire type, start, end) of its bytes otherwise."""
    if depth > MAX_DEPTH:
        raise Unreadable(f"its messages nest deeper than {MAX_DEPTH} levels")
    pos = start
    while pos < end:
        # One-byte tags and lengths (fields 1-15, values under 128) are most of a file: read inline.
        tag = data[pos]
        if tag >= 0x80 or not tag >> 3:
            number, wire, pos = _tag(data, pos, end)
        else:
            number, wire, pos = tag >> 3, tag & 7, pos + 1
        if wire == _LENGTH and pos < end and data[pos] < 0x80:
            first, pos = pos + 1, pos + 1 + data[pos]
            if pos > end:
                raise Unreadable(f"field {number} at byte {first} runs past the end of its message")
            yield number, wire, first, pos
        elif wire == _VARINT:
            value, pos = _varint(data, pos, end)
            yield number, wire, value, pos
        else:
            first, pos = _value(data, pos, end, number=number, wire=wire, depth=depth)
            yield number, wire, first, pos


def _value(data: bytes, pos: int, end: int, *, number: int, wire: int, depth: int) -> tuple[int, int]:
    """Where the value of a field whose tag ends at `pos` starts and ends. A group, which no ONNX
    message has but protobuf skips as an unknown field, is skipped the same way."""
    if wire == _VARINT:
        return pos, _varint(data, pos, end)[1]
    if wire == _LENGTH:
        size, pos = _varint(data, pos, end)
        first, last = pos, pos + size
    elif wire in (_FIXED64, _FIXED32):
        first, last = pos, pos + (8 if wire == _FIXED64 else 4)
    elif wire == _GROUP_START:
        if depth + 1 > MAX_DEPTH:
            raise Unreadable(f"its messages nest deeper than {MAX_DEPTH} levels")
        first = last = pos
        while last < end:
            inner, inner_wire, last = _tag(data, last, end)
            if inner_wire == _GROUP_END and inner == number:
                return first, last
            _, last = _value(data, last, end, number=inner, wire=inner_wire, depth=depth + 1)
        raise Unreadable(f"group {number} at byte {first} has no end")
    else:
        raise Unreadable(f"the field before byte {pos} has wire type {wire}, which protobuf refuses here")
    if last > end:
        raise Unreadable(f"field {number} at byte {first} runs past the end of its message")
    return first, last


def _tag(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """The field number and wire type of the tag at `pos`, and the position after it."""
    tag, after = _varint(data, pos, end)
    if tag >> 3 == 0 or tag >= 1 << 32:
        raise Unreadable(f"the field at byte {pos} is numbered {tag >> 3}, which protobuf refuses")
    return tag >> 3, tag & 7, after


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it: at most 10 bytes, as protobuf reads them."""
    start, value, shift = pos, 0, 0
    while pos < end and shift < 70:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise Unreadable(f"the number at byte {start} runs past the end of its message, or past 10 bytes")
