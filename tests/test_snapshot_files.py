"""Snapshot files on disk: the newest is the highest generation inside a file, never its name or the
clock; a file is loaded only if every field is what the live API would accept, and whatever the
bytes, reading one raises SnapshotError or nothing. Crafted files are re-checksummed, so only
validation can refuse them; they are built here by hand, not with the code under test."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import signal
import stat
import struct
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cellstream.streams import snapshot
from cellstream.streams.snapshot import (
    ModelSection,
    SnapshotDir,
    SnapshotError,
    decode,
    encode,
    write_atomic,
)
from cellstream.streams.store import StreamRows
from support import start_server

Header = dict[str, Any]
Parts = list[bytes]
PREFIX = struct.Struct("<8sII")
LOGGER = "cellstream.streams.snapshot"


# --- building files by hand -------------------------------------------------------------------


def pack(header: Header | bytes, payload: bytes, version: int = 1) -> bytes:
    """A file with a correct checksum around any header and payload."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    body = PREFIX.pack(b"CELLSNAP", version, len(raw)) + raw + payload
    return body + hashlib.sha256(body).digest()


def unpack(data: bytes) -> tuple[Header, bytes]:
    """(header, sections payload) of a file, read without the code under test."""
    _, _, length = PREFIX.unpack_from(data)
    return json.loads(data[PREFIX.size : PREFIX.size + length]), data[PREFIX.size + length : -32]


def generation_in(path: Path) -> int:
    return int(unpack(path.read_bytes())[0].get("generation", 0))


def model_part(name: str = "gru", ids: tuple[str, ...] = ("s1", "s2")) -> tuple[Header, Parts]:
    """One valid model header and its sections: output 2 values, one state 'h' of shape [1, 3]."""
    count = len(ids)
    parts = [
        "\n".join(ids).encode(),
        np.arange(1, count + 1, dtype="<u8").tobytes(),
        np.ones(count, np.uint8).tobytes(),
        np.full((count, 2), 0.5, "<f4").tobytes(),
        np.arange(count * 3, dtype="<f4").tobytes(),
    ]
    header = {
        "name": name,
        "version": "1",
        "sha256": "ab" * 32,
        "output_size": 2,
        "count": count,
        "states": [{"name": "h", "shape": [1, 3]}],
        "sections": [len(p) for p in parts],
    }
    return header, parts


def craft(models: list[tuple[Header, Parts]], **fields: Any) -> bytes:
    header = {"created_unix": 1.0, "generation": 1, "models": [m for m, _ in models], **fields}
    return pack(header, b"".join(b"".join(parts) for _, parts in models))


def put(model: Header, parts: Parts, index: int, raw: bytes) -> None:
    """Replace one section and keep the header's size of it truthful."""
    parts[index] = raw
    model["sections"][index] = len(raw)


def section(ids: list[str], steps: list[int], model: str = "gru") -> ModelSection:
    """Streams of a small 'gru' as the live server would hand them to a snapshot."""
    count = len(ids)
    rows = StreamRows(
        ids,
        np.array(steps, np.uint64),
        np.ones(count, bool),
        np.full((count, 2), 0.25, np.float32),
        [np.full((count, 1, 3), -1.5, np.float32)],
    )
    return ModelSection(model, "1", "ab" * 32, 2, ["h"], [(1, 3)], rows)


def steps_of(found: tuple[Path, list[ModelSection]] | None) -> dict[str, int]:
    assert found is not None
    (only,) = found[1]
    return dict(zip(only.rows.ids, only.rows.steps.tolist(), strict=True))


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


# --- D7: which file is newest ------------------------------------------------------------------


def test_export_named_to_sort_first_never_overrides_newer_snapshots(tmp_path: Path) -> None:
    snapshots = SnapshotDir(tmp_path, keep=3)
    snapshots.write([section(["s"], [1])])
    newest, _ = snapshots.write([section(["s"], [2])])
    imported = tmp_path / "snapshot-imported.csnap"
    imported.write_bytes(b"".join(encode([section(["s"], [0])])))
    assert steps_of(snapshots.newest_valid()) == {"s": 2}
    assert snapshots.files()[0] == newest and snapshots.files()[-1] == imported


def test_export_dropped_into_an_empty_directory_is_restored(tmp_path: Path) -> None:
    (tmp_path / "streams.csnap").write_bytes(b"".join(encode([section(["moved"], [7])])))
    snapshots = SnapshotDir(tmp_path)
    assert steps_of(snapshots.newest_valid()) == {"moved": 7}
    path, _ = snapshots.write([section(["moved"], [8])])
    assert generation_in(path) == 1 and steps_of(snapshots.newest_valid()) == {"moved": 8}


def test_clock_set_back_never_deletes_the_new_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = 1_700_000_000.0
    monkeypatch.setattr(snapshot, "time", types.SimpleNamespace(time=lambda: now + 3600))
    snapshots = SnapshotDir(tmp_path, keep=1)
    snapshots.write([section(["s"], [1])])
    monkeypatch.setattr(snapshot, "time", types.SimpleNamespace(time=lambda: now))
    written, _ = snapshots.write([section(["s"], [2])])
    assert written.exists() and snapshots.files() == [written]
    assert steps_of(snapshots.newest_valid()) == {"s": 2}


def test_files_from_before_generations_read_as_generation_0(tmp_path: Path) -> None:
    legacy_header, payload = unpack(b"".join(encode([section(["old"], [5])], created=4e12)))
    del legacy_header["generation"]
    legacy = tmp_path / "snapshot-999999999999999.csnap"  # a name from a clock far ahead
    legacy.write_bytes(pack(legacy_header, payload))
    snapshots = SnapshotDir(tmp_path)
    assert steps_of(snapshots.newest_valid()) == {"old": 5}
    written, _ = snapshots.write([section(["old"], [6])])
    assert generation_in(written) == 1 and snapshots.files() == [written, legacy]


def test_next_write_continues_after_the_highest_generation_seen(tmp_path: Path) -> None:
    # The highest generation's body is corrupt, yet no new file may rank below (or tie with) it.
    data = bytearray(craft([model_part()], generation=41))
    data[-40] ^= 0xFF
    corrupt = tmp_path / "snapshot-corrupt.csnap"
    corrupt.write_bytes(bytes(data))
    snapshots = SnapshotDir(tmp_path)
    written, _ = snapshots.write([section(["s"], [1])])
    assert generation_in(written) == 42 and "42" in written.name
    assert snapshots.files() == [written, corrupt]


def test_pruning_keeps_the_highest_generations(tmp_path: Path) -> None:
    (tmp_path / "snapshot-imported.csnap").write_bytes(b"".join(encode([section(["s"], [0])])))
    (tmp_path / "snapshot-junk.csnap").write_bytes(b"not a snapshot at all")
    snapshots = SnapshotDir(tmp_path, keep=2)
    written = [snapshots.write([section(["s"], [k])])[0] for k in range(1, 5)]
    assert sorted(tmp_path.iterdir()) == sorted(written[-2:])
    assert [generation_in(p) for p in snapshots.files()] == [4, 3]


def test_keep_0_still_keeps_the_file_just_written(tmp_path: Path) -> None:
    snapshots = SnapshotDir(tmp_path, keep=0)
    snapshots.write([section(["s"], [1])])
    written, _ = snapshots.write([section(["s"], [2])])
    assert snapshots.files() == [written]


def test_newest_generation_is_verified_whole_and_older_ones_are_fallbacks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    snapshots = SnapshotDir(tmp_path)
    snapshots.write([section(["s"], [1])])
    newer, _ = snapshots.write([section(["s"], [2])])
    newest, _ = snapshots.write([section(["s"], [3])])
    newest.write_bytes(newest.read_bytes()[:-1])
    bad_ids_header, bad_payload = unpack(newer.read_bytes())
    newer.write_bytes(pack(bad_ids_header, b"\xff" + bad_payload[1:]))
    caplog.set_level(logging.ERROR, logger=LOGGER)
    assert steps_of(snapshots.newest_valid()) == {"s": 1}
    assert newest.name in caplog.text and newer.name in caplog.text


# --- D4/D5: decode() checks every field -------------------------------------------------------


def test_hand_built_file_reads_back() -> None:
    created, (gru,) = decode(craft([model_part()]))
    assert created == 1.0 and gru.rows.ids == ["s1", "s2"] and gru.state_shapes == [(1, 3)]
    np.testing.assert_array_equal(gru.rows.steps, [1, 2])
    np.testing.assert_array_equal(gru.rows.states[0].ravel(), np.arange(6))


def test_encoded_sections_read_back_exactly_including_an_empty_one() -> None:
    empty = section([], [], model="idle")
    full = section(["a", "b", "c"], [1, 2, 2**64 - 2])
    full.rows.states[0][:] = np.arange(9, dtype=np.float32).reshape(3, 1, 3)
    created, back = decode(b"".join(encode([empty, full], created=5.5, generation=9)))
    assert created == 5.5 and [len(b.rows) for b in back] == [0, 3]
    assert back[0].rows.states[0].shape == (0, 1, 3) and back[1].rows.ids == ["a", "b", "c"]
    np.testing.assert_array_equal(back[1].rows.steps, full.rows.steps)
    np.testing.assert_array_equal(back[1].rows.states[0], full.rows.states[0])
    np.testing.assert_array_equal(back[1].rows.last_output, full.rows.last_output)
    assert unpack(b"".join(encode([full])))[0]["generation"] == 0  # an export


def add_model(h: Header, parts: Parts, name: str, ids: tuple[str, ...]) -> None:
    model, more = model_part(name, ids)
    h["models"].append(model)
    parts.extend(more)


def put_extra(model: Header, parts: Parts) -> None:
    """One more state section, sized truthfully, with no state in the header for it."""
    parts.append(parts[4])
    model["sections"].append(len(parts[4]))


Mutation = Callable[[Header, Header, Parts], None]  # (file header, first model, its sections)

MODEL_CASES: dict[str, tuple[Mutation, str]] = {
    "ids not UTF-8": (lambda h, m, p: put(m, p, 0, b"s\xff\ns2"), "not valid UTF-8"),
    "empty id": (lambda h, m, p: put(m, p, 0, b"\ns2"), "empty"),
    "control character in id": (lambda h, m, p: put(m, p, 0, b"s\x01\ns2"), "control character"),
    "id over 256 bytes": (lambda h, m, p: put(m, p, 0, b"x" * 257 + b"\ns2"), "257 bytes"),
    "duplicate ids": (lambda h, m, p: put(m, p, 0, b"s1\ns1"), "1 stream ids appear twice"),
    "fewer ids than streams": (lambda h, m, p: put(m, p, 0, b"s1"), "1 ids for 2 streams"),
    "short steps section": (lambda h, m, p: put(m, p, 1, p[1][:8]), "steps section is 8 bytes"),
    "short replayable section": (lambda h, m, p: put(m, p, 2, b"\x01"), "replayable section is 1"),
    "replayable flag 2": (lambda h, m, p: put(m, p, 2, b"\x01\x02"), "replayable flag is 2"),
    "NaN output": (
        lambda h, m, p: put(m, p, 3, np.full(4, np.nan, "<f4").tobytes()),
        "last outputs include NaN",
    ),
    "infinite state": (
        lambda h, m, p: put(m, p, 4, np.full(6, np.inf, "<f4").tobytes()),
        "state 'h' values include NaN or infinite",
    ),
    "state section of the wrong size": (lambda h, m, p: put(m, p, 4, p[4][:20]), "state 'h' section"),
    "shape [-1]": (lambda h, m, p: m["states"][0].update(shape=[-1]), "shape is -1"),
    "shape with a 0": (lambda h, m, p: m["states"][0].update(shape=[0, 3]), "shape is 0"),
    "shape of booleans": (lambda h, m, p: m["states"][0].update(shape=[True, 3]), "shape is True"),
    "shape of floats": (lambda h, m, p: m["states"][0].update(shape=[1.0, 3]), "shape is 1.0"),
    "shape not a list": (lambda h, m, p: m["states"][0].update(shape="13"), "shape is '13'"),
    "shape too large": (lambda h, m, p: m["states"][0].update(shape=[2**20, 2**20]), "values per stream"),
    "extra state section": (
        lambda h, m, p: put_extra(m, p),
        "1 states need a list of 5 sizes",
    ),
    "extra state in the header": (
        lambda h, m, p: m["states"].append({"name": "c", "shape": [1, 3]}),
        "2 states need a list of 6 sizes",
    ),
    "too few sections": (lambda h, m, p: (p.pop(), m["sections"].pop()), "need a list of 5 sizes"),
    "state listed twice": (
        lambda h, m, p: (m["states"].append({"name": "h", "shape": [1, 3]}), put_extra(m, p)),
        "state 'h' is listed twice",
    ),
    "empty state name": (lambda h, m, p: m["states"][0].update(name=""), "states[0].name is ''"),
    "state not an object": (lambda h, m, p: m.update(states=[3]), "states[0] is 3"),
    "count as text": (lambda h, m, p: m.update(count="2"), "count is '2'"),
    "negative count": (lambda h, m, p: m.update(count=-1), "count is -1"),
    "count true": (lambda h, m, p: m.update(count=True), "count is True"),
    "count missing": (lambda h, m, p: m.pop("count"), "count is missing"),
    "output size 0": (lambda h, m, p: m.update(output_size=0), "output_size is 0"),
    "output size as text": (lambda h, m, p: m.update(output_size="2"), "output_size is '2'"),
    "empty model name": (lambda h, m, p: m.update(name=""), "models[0].name is ''"),
    "model name a number": (lambda h, m, p: m.update(name=5), "models[0].name is 5"),
    "empty version": (lambda h, m, p: m.update(version=""), "model 'gru': version is ''"),
    "version a number": (lambda h, m, p: m.update(version=1), "model 'gru': version is 1"),
    "sha256 not hex": (lambda h, m, p: m.update(sha256="xyz"), "sha256 is 'xyz'"),
    "sections not a list": (lambda h, m, p: m.update(sections=7), "sections is 7"),
    "negative section size": (lambda h, m, p: m["sections"].__setitem__(4, -1), "section size is -1"),
    "sections past the end": (lambda h, m, p: p.__setitem__(4, p[4][:8]), "past the end"),
    "bytes left over": (lambda h, m, p: p.append(b"\0" * 8), "8 bytes left over"),
    "same model twice": (
        lambda h, m, p: add_model(h, p, "gru", ("s3",)),
        "holds this model version twice",
    ),
    "id in two models": (lambda h, m, p: add_model(h, p, "gru2", ("s2",)), "1 stream ids appear twice"),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_malformed_model_section_is_refused_with_a_message_naming_it(case: str) -> None:
    mutate, message = MODEL_CASES[case]
    model, parts = model_part()
    header: Header = {"created_unix": 1.0, "generation": 1, "models": [model]}
    mutate(header, model, parts)
    with pytest.raises(SnapshotError) as info:
        decode(pack(header, b"".join(parts)))
    assert message in str(info.value)
    if case not in {"empty model name", "model name a number", "bytes left over"}:
        assert "model 'gru" in str(info.value)  # the section it is about, by name


HEADER_CASES: dict[str, tuple[Header, str]] = {
    "created_unix as text": ({"created_unix": "x"}, "created_unix is 'x'"),
    "created_unix NaN": ({"created_unix": math.nan}, "created_unix is nan"),
    "created_unix too large for a float": ({"created_unix": 10**400}, "not a finite number"),
    "created_unix true": ({"created_unix": True}, "created_unix is True"),
    "created_unix missing": ({"created_unix": None}, "created_unix is missing"),
    "negative generation": ({"generation": -1}, "generation is -1"),
    "generation as text": ({"generation": "3"}, "generation is '3'"),
    "generation true": ({"generation": True}, "generation is True"),
    "generation beyond 63 bits": ({"generation": 2**63}, "generation is 9223372036854775808"),
    "models not a list": ({"models": {"a": 1}}, "'models' is {'a': 1}, not a list"),
    "models missing": ({"models": None}, "'models' is missing"),
    "model not an object": ({"models": [1]}, "models[0] is 1"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_malformed_header_field_is_refused(case: str) -> None:
    fields, message = HEADER_CASES[case]
    header, payload = unpack(craft([model_part()]))
    header.update(fields)
    header = {k: v for k, v in header.items() if v is not None}
    with pytest.raises(SnapshotError, match=re.escape(message)):
        decode(pack(header, payload))


RAW_HEADERS: dict[str, tuple[bytes, str]] = {
    "100k-deep nested JSON": (b"[" * 100_000 + b"]" * 100_000, "unreadable header"),
    "header not UTF-8": (b'{"created_unix": "\xff"}', "unreadable header"),
    "header not JSON": (b"{created_unix: 1}", "unreadable header"),
    "header an array": (b"[]", "header is [], not an object"),
    "header over 1 MiB": (json.dumps({"pad": "x" * (1 << 20)}).encode(), "the limit is"),
}


@pytest.mark.parametrize("case", list(RAW_HEADERS))
def test_unreadable_header_is_refused(case: str) -> None:
    raw, message = RAW_HEADERS[case]
    with pytest.raises(SnapshotError, match=re.escape(message)):
        decode(pack(raw, b""))


def test_header_length_beyond_the_file_and_unknown_versions_are_refused() -> None:
    body = PREFIX.pack(b"CELLSNAP", 1, 10**6) + b"{}"
    with pytest.raises(SnapshotError, match="does not fit"):
        decode(body + hashlib.sha256(body).digest())
    with pytest.raises(SnapshotError, match="version 2"):
        decode(pack(*unpack(craft([model_part()])), version=2))


JUNK: list[object] = [-1, 0, 1, 2**64, 10**400, 1.5, math.nan, math.inf, True, None, "", "x", [], [-1], {}]


def _leaves(value: object, path: tuple[object, ...] = ()) -> Iterator[tuple[object, ...]]:
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, (*path, index))


def test_no_tampering_lets_another_error_escape_decode() -> None:
    rng = np.random.default_rng(7)
    good = craft([model_part(), model_part("lstm", ("a", "b", "c"))])
    header, payload = unpack(good)
    paths = list(_leaves(header))[1:]
    for trial in range(3000):
        if trial % 2:  # a random field set to a random wrong value
            tampered = json.loads(json.dumps(header))
            *parents, last = paths[rng.integers(len(paths))]
            target = tampered
            for key in parents:
                target = target[key]
            target[last] = JUNK[rng.integers(len(JUNK))]
            data = pack(tampered, payload)
        else:  # random bytes changed anywhere before the checksum, then re-checksummed
            body = bytearray(good[:-32])
            for position in rng.integers(0, len(body), rng.integers(1, 4)).tolist():
                body[position] = int(rng.integers(256))
            data = bytes(body) + hashlib.sha256(body).digest()
        with contextlib.suppress(SnapshotError):  # refused is fine; any other exception fails
            decode(data)


def test_newest_valid_skips_every_crafted_file_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    snapshots = SnapshotDir(tmp_path)
    valid, _ = snapshots.write([section(["kept"], [9])])
    crafted = []
    for number, case in enumerate(MODEL_CASES):
        model, parts = model_part()
        header: Header = {"created_unix": 1.0, "generation": 10 + number, "models": [model]}
        MODEL_CASES[case][0](header, model, parts)
        crafted.append(tmp_path / f"snapshot-crafted-{number:03d}.csnap")
        crafted[-1].write_bytes(pack(header, b"".join(parts)))
    for number, (raw, _) in enumerate(RAW_HEADERS.values()):
        crafted.append(tmp_path / f"snapshot-raw-{number}.csnap")
        crafted[-1].write_bytes(pack(raw, b""))
    caplog.set_level(logging.ERROR, logger=LOGGER)
    found = snapshots.newest_valid()
    assert found is not None and found[0] == valid and steps_of(found) == {"kept": 9}
    for path in crafted[: len(MODEL_CASES)]:  # higher generations than the valid file: tried first
        assert f"snapshot {path.name} is unusable" in caplog.text


# --- the directory itself ----------------------------------------------------------------------


def test_stale_temp_files_are_removed_when_the_directory_opens(tmp_path: Path) -> None:
    (tmp_path / "snapshot-00000000000000000007.csnap.tmp").write_bytes(b"half a file")
    (tmp_path / "notes.txt").write_text("not ours")
    SnapshotDir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_state_directory_is_created_0700_and_files_0600(tmp_path: Path, umask_022: None) -> None:
    root = tmp_path / "var" / "state"
    path, _ = SnapshotDir(root).write([section(["s"], [1])])
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_leftover_temp_file_is_replaced_by_a_private_one(tmp_path: Path, umask_022: None) -> None:
    path = tmp_path / "out.csnap"
    leftover = tmp_path / "out.csnap.tmp"
    leftover.write_bytes(b"old")
    leftover.chmod(0o644)
    assert write_atomic(path, [b"new ", b"bytes"]) == 9
    assert path.read_bytes() == b"new bytes" and not leftover.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_readable_existing_directory_is_left_alone_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "state"
    root.mkdir()
    root.chmod(0o755)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    SnapshotDir(root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o755
    assert "has mode 755" in caplog.text


# --- the real server --------------------------------------------------------------------------

X = np.random.default_rng(3).normal(size=(8, 8)).astype(np.float32)


def ids_offset(header: Header, model: str) -> int:
    """Where a model's ids section starts in the payload: after every earlier model's sections."""
    offset = 0
    for entry in header["models"]:
        if entry["name"] == model:
            return offset
        offset += sum(entry["sections"])
    raise AssertionError(f"no model {model} in the file")


def test_server_starts_from_the_older_snapshot_when_newer_ones_are_crafted(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    first = start_server(tmp_path / "a", "--state-dir", str(state_dir), "--snapshot-interval", "0")
    with first.client() as client:
        client.step("kept", X[0])
        client.step("kept", X[1])
    assert first.stop() == 0
    (valid,) = state_dir.glob("*.csnap")
    header, payload = unpack(valid.read_bytes())
    header["generation"] = generation_in(valid) + 1
    ids_at = ids_offset(header, "gru")
    assert payload[ids_at : ids_at + 4] == b"kept"
    # Names that would also sort first by name: the file's generation must decide.
    bad_ids = state_dir / "snapshot-999999999999999.csnap"
    bad_ids.write_bytes(pack(header, payload[:ids_at] + b"ke\xfft" + payload[ids_at + 4 :]))
    deep = state_dir / "snapshot-999999999999998.csnap"
    deep.write_bytes(pack(b"[" * 100_000 + b"]" * 100_000, payload))
    second = start_server(tmp_path / "b", "--state-dir", str(state_dir), "--snapshot-interval", "0")
    try:
        with second.client() as client:
            assert client.get_state("kept").step == 2
        assert f"snapshot {bad_ids.name} is unusable" in second.log()
        assert "restored 1 streams from" in second.log() and valid.name in second.log()
    finally:
        assert second.stop() == 0, second.log()


def test_exported_file_in_the_state_dir_never_brings_old_data_back(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    server = start_server(tmp_path / "a", "--state-dir", str(state_dir), "--snapshot-interval", "0")
    with server.client() as client:
        for i in range(3):
            client.step("s", X[i], seq=i + 1)
        assert client.export_states(state_dir / "snapshot-imported.csnap") > 0
        for i in range(3, 5):
            client.step("s", X[i], seq=i + 1)
    assert server.stop() == 0
    for restart in ("b", "c"):  # every restart, not just the first
        server = start_server(tmp_path / restart, "--state-dir", str(state_dir), "--snapshot-interval", "0")
        try:
            with server.client() as client:
                assert client.get_state("s").step == 5
        finally:
            assert server.stop(signal.SIGTERM) == 0, server.log()
