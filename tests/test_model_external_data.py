"""ONNX external data: a model's tensors may keep their bytes in files next to model.onnx, and only
there. One that points outside the model's directory (an absolute path, `..`, a link out), at a
missing file or past a file's end is refused before onnxruntime opens anything, in one line naming
the tensor and the location; the data files count towards --max-model-bytes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cellstream.errors import ModelLoadError, quoted
from cellstream.model import CellModel
from cellstream.model_files import MAX_DEPTH, SHOWN, DataFiles, Unreadable, external_tensors
from reference import reference_sequence
from support import MODELS, start_server, wait_for
from test_model_hardening import cellstream

X = np.random.default_rng(11).normal(size=(12, 8)).astype(np.float32)
DATA = "weights.bin"
KEEP = "keep external data files next to model.onnx"


def external_gru(directory: Path, location: str = DATA) -> Path:
    """The bundled GRU with its weights (each initializer over 1 KiB) in `location`, saved by onnx itself."""
    model = onnx.load(str(MODELS / "gru" / "model.onnx"))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location
    )
    return path


def relocate(path: Path, location: str, *, only: str | None = None, **entries: str) -> None:
    """Rewrite the `location` (and any other given entries) of each external tensor, or of `only`."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        if only is not None and tensor.name != only:
            continue
        for entry in tensor.external_data:
            entry.value = {"location": location, **entries}.get(entry.key, entry.value)
    onnx.save(model, str(path))


def first_external(path: Path) -> str:
    model = onnx.load(str(path), load_external_data=False)
    return next(t.name for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL)


def refusal(path: Path, *args: str) -> str:
    """`cellstream models check`'s one line for a model it refuses (exit 2, nothing on stdout)."""
    result = cellstream("models", "check", *args, str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("cannot be served: ")
    return result.stderr.strip()


def test_model_with_its_data_next_to_it_serves_the_reference_numbers(tmp_path: Path) -> None:
    path = external_gru(tmp_path / "repo" / "gru")
    assert path.stat().st_size < (tmp_path / "repo" / "gru" / DATA).stat().st_size  # the weights are outside
    assert CellModel(path).data_files == ((tmp_path / "repo" / "gru" / DATA).resolve(),)
    server = start_server(tmp_path / "run", models=tmp_path / "repo")
    try:
        with server.client() as client:
            outputs = [client.step("s", x, model="gru").output for x in X]
        expected, _ = reference_sequence(MODELS / "gru", X)
        np.testing.assert_allclose(np.array(outputs), expected, atol=1e-5)
    finally:
        assert server.stop() == 0, server.log()


def test_data_in_a_subdirectory_or_through_a_link_within_the_directory_is_taken(tmp_path: Path) -> None:
    (tmp_path / "m" / "data").mkdir(parents=True)
    path = external_gru(tmp_path / "m", location="data/w.bin")
    assert CellModel(path).data_files == ((tmp_path / "m" / "data" / "w.bin").resolve(),)
    os.symlink("data/w.bin", tmp_path / "m" / "alias.bin")
    relocate(path, "alias.bin")
    assert CellModel(path).data_files == ((tmp_path / "m" / "data" / "w.bin").resolve(),)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "link-out", "dotdot-link"])
def test_data_outside_the_model_directory_is_refused_naming_tensor_and_location(
    tmp_path: Path, how: str
) -> None:
    path = external_gru(tmp_path / "repo" / "gru")
    secret = tmp_path / "secret.bin"
    shutil.copy(tmp_path / "repo" / "gru" / DATA, secret)  # a file onnxruntime could read, were it asked
    location = {
        "dotdot": "../../secret.bin",
        "absolute": str(secret),
        "link-out": "leak.bin",
        "dotdot-link": "up/secret.bin",
    }[how]
    if how == "link-out":
        os.symlink(secret, tmp_path / "repo" / "gru" / "leak.bin")
    if how == "dotdot-link":
        os.symlink("../..", tmp_path / "repo" / "gru" / "up")
    relocate(path, location)
    line = refusal(path)
    tensor = first_external(path)
    home = (tmp_path / "repo" / "gru").resolve()
    assert f"{path}: tensor {tensor!r} keeps its data in {quoted(location, SHOWN)}" in line
    assert f"outside the model's directory {home}: {KEEP}" in line
    if how != "absolute":
        assert f"which resolves to {secret.resolve()}" in line
    assert "onnxruntime" not in line  # refused before onnxruntime was given the file


@pytest.mark.parametrize(
    ("location", "why"),
    [
        ("*/_ORT_MEM_ADDR_/*", "which is not a file name"),  # onnxruntime's in-memory marker
        ("w\0.bin", "which is not a file name"),
        (".", "which is not a regular file"),
        ("loop.bin", "which cannot be followed (a loop of links)"),
    ],
    ids=["memory-marker", "nul", "directory", "link-loop"],
)
def test_a_location_that_is_no_data_file_is_refused(tmp_path: Path, location: str, why: str) -> None:
    path = external_gru(tmp_path / "m")
    os.symlink("loop.bin", tmp_path / "m" / "loop.bin")
    relocate(path, location)
    with pytest.raises(ModelLoadError) as info:
        CellModel(path)
    assert f"keeps its data in {location!r}, {why}: {KEEP}" in str(info.value)


def test_missing_data_file_is_refused(tmp_path: Path) -> None:
    path = external_gru(tmp_path / "m")
    (tmp_path / "m" / DATA).unlink()
    line = refusal(path)
    data = (tmp_path / "m" / DATA).resolve()
    assert f"keeps its data in {DATA!r}, which does not exist ({data}): {KEEP}" in line


def test_data_past_the_end_of_its_file_is_refused(tmp_path: Path) -> None:
    path = external_gru(tmp_path / "m")
    data = tmp_path / "m" / DATA
    size = data.stat().st_size
    with data.open("r+b") as file:
        file.truncate(size - 4)  # the last tensor's span now runs 4 bytes past the end
    line = refusal(path)
    assert f"keeps its data in {DATA!r} at bytes " in line
    assert f"to {size}, but that file has {size - 4} bytes" in line

    data.write_bytes(b"\0" * size)
    tensor = first_external(path)
    relocate(path, DATA, only=tensor, offset=str(size + 1))
    assert f"tensor {tensor!r} keeps its data in {DATA!r} at bytes {size + 1} to" in refusal(path)
    relocate(path, DATA, only=tensor, offset="-1")
    assert "at offset '-1', which is not a whole number of bytes" in refusal(path)


def test_data_files_count_towards_max_model_bytes_each_once(tmp_path: Path) -> None:
    path = external_gru(tmp_path / "m")
    total = path.stat().st_size + (tmp_path / "m" / DATA).stat().st_size
    line = refusal(path, "--max-model-bytes", str(total - 1))
    assert f"{path}: is {total} bytes with its external data" in line
    assert f"over the limit of {total - 1} bytes: shrink the model, or raise --max-model-bytes" in line
    # Every tensor reads the same file: it counts once, so the model fits in exactly its bytes.
    result = cellstream("models", "check", "--max-model-bytes", str(total), str(path))
    assert result.returncode == 0, result.stderr
    assert f"  data    {DATA!r}" in result.stdout


def test_a_huge_data_file_is_refused_by_its_size_before_it_is_read(tmp_path: Path) -> None:
    path = external_gru(tmp_path / "m")
    with (tmp_path / "m" / DATA).open("r+b") as file:
        file.truncate(50 << 30)  # sparse: 50 GiB by stat, no disk used; reading it would take minutes
    line = refusal(path)
    assert f"is {path.stat().st_size + (50 << 30)} bytes with its external data" in line
    assert "over the limit of 1073741824 bytes" in line


def nested_model(depth: int, leaf: TensorProto) -> onnx.ModelProto:
    """A model whose graph holds `leaf` in a Constant node `depth` If-subgraphs down."""
    graph = helper.make_graph([helper.make_node("Constant", [], ["k"], value=leaf)], "leaf", [], [])
    empty = helper.make_graph([], "empty", [], [])
    for level in range(depth):
        branch = helper.make_node("If", ["c"], ["k"], then_branch=graph, else_branch=empty, name=f"if{level}")
        graph = helper.make_graph([branch], f"level{level}", [], [])
    return helper.make_model(graph)


def pointing(name: str, location: str) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[2], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "8")):
        tensor.external_data.add(key=key, value=value)
    return tensor


def test_every_place_a_tensor_can_be_is_walked(tmp_path: Path) -> None:
    """Initializers, sparse initializers, node attributes (tensor, tensors, subgraphs of subgraphs)
    and function bodies: the walk finds every external tensor put there, and only those."""
    model = nested_model(3, pointing("deep", "a.bin"))
    graph = model.graph
    graph.initializer.append(pointing("init", "b.bin"))
    graph.initializer.append(numpy_helper.from_array(np.ones(2, np.float32), "inline"))
    sparse = helper.make_sparse_tensor(
        pointing("sparse_values", "c.bin"), pointing("sparse_indices", "d.bin"), [4]
    )
    graph.sparse_initializer.append(sparse)
    many = helper.make_attribute("several", [pointing("listed", "e.bin")])
    graph.node.append(helper.make_node("Custom", [], [], domain="x"))
    graph.node[-1].attribute.append(many)
    body = helper.make_node("Constant", [], ["z"], value=pointing("in_function", "f.bin"))
    model.functions.append(helper.make_function("x", "F", [], ["z"], [body], [helper.make_opsetid("", 17)]))
    found = {(t.name, dict(t.entries)["location"]) for t in external_tensors(model.SerializeToString())}
    assert found == {
        ("deep", "a.bin"),
        ("init", "b.bin"),
        ("sparse_values", "c.bin"),
        ("sparse_indices", "d.bin"),
        ("listed", "e.bin"),
        ("in_function", "f.bin"),
    }
    path = tmp_path / "m" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(nested_model(5, pointing("deep", "../../../etc/passwd")).SerializeToString())
    with pytest.raises(ModelLoadError, match=r"tensor 'deep' keeps its data in '\.\./\.\./\.\./etc/passwd'"):
        CellModel(path)


def test_the_walk_agrees_with_onnx_on_real_files(tmp_path: Path) -> None:
    for bundled in sorted(MODELS.glob("*/model.onnx")):
        assert external_tensors(bundled.read_bytes()) == []
    path = external_gru(tmp_path / "m")
    proto = onnx.load(str(path), load_external_data=False)
    expected = [
        (t.name, tuple((e.key, e.value) for e in t.external_data))
        for t in proto.graph.initializer
        if t.data_location == TensorProto.EXTERNAL
    ]
    assert [(t.name, t.entries) for t in external_tensors(path.read_bytes())] == expected


def varint(number: int) -> bytes:
    """A protobuf varint, encoded here: Python's protobuf refuses to build messages nested past
    its own limit of 100, and never writes groups."""
    encoded = b""
    while number >= 0x80:
        encoded += bytes([number & 0x7F | 0x80])
        number >>= 7
    return encoded + bytes([number])


def length_delimited(field: int, payload: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def deep_model(levels: int) -> bytes:
    """A ModelProto whose external tensor sits in a graph `levels` subgraphs down: 5 + 3 * levels
    messages deep (graph, node, attribute per level; then graph, node, attribute, tensor, entry)."""
    leaf = nested_model(0, pointing("deep", "a.bin")).graph.SerializeToString()
    for _ in range(levels):  # graph <- node.attribute(5) <- attribute.g(6) <- graph.node(1)
        leaf = length_delimited(1, length_delimited(5, length_delimited(6, leaf)))
    return length_delimited(7, leaf)


def test_nesting_past_protobufs_limit_is_unreadable_and_refused(tmp_path: Path) -> None:
    inside = (MAX_DEPTH - 5) // 3  # the entry at depth 5 + 3 * levels <= MAX_DEPTH
    assert [t.name for t in external_tensors(deep_model(inside))] == ["deep"]
    with pytest.raises(Unreadable, match=f"nest deeper than {MAX_DEPTH} levels"):
        external_tensors(deep_model(inside + 1))
    path = tmp_path / "m" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(deep_model(inside + 1))
    with pytest.raises(ModelLoadError) as info:  # onnxruntime's parser stops there too
        CellModel(path)
    assert "\n" not in str(info.value)


def test_unknown_fields_and_groups_are_skipped_as_protobuf_skips_them(tmp_path: Path) -> None:
    path = external_gru(tmp_path / "m")
    group = varint(99 << 3 | 3) + varint(1 << 3) + varint(5) + varint(99 << 3 | 4)  # field 99: {1: 5}
    path.write_bytes(path.read_bytes() + group + varint(98 << 3 | 5) + b"\0" * 4)
    assert CellModel(path).data_files == ((tmp_path / "m" / DATA).resolve(),)  # onnxruntime takes it too


def test_bytes_the_walk_cannot_read_are_refused_even_if_onnxruntime_took_them(tmp_path: Path) -> None:
    with pytest.raises(Unreadable):
        external_tensors(b"this is not an onnx model")
    unread = DataFiles((), "why")
    with pytest.raises(
        ModelLoadError, match=r"m\.onnx: onnxruntime reads it, but its external data cannot be"
    ):
        unread.checked(tmp_path / "m.onnx")


def test_a_server_keeps_serving_its_good_models_and_logs_the_refused_one(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    external_gru(repo / "gru" / "1")
    relocate(external_gru(repo / "gru" / "2"), "/etc/passwd")  # the newest version: passed over at start
    server = start_server(tmp_path / "run", "--model-poll-interval", "0.05", models=repo)
    try:
        with server.client() as client:
            assert "refused model gru version 2: " in server.log()
            assert "'/etc/passwd', an absolute path outside the model's directory" in server.log()
            aside = tmp_path / "aside" / "evil"
            relocate(external_gru(aside), "../gru/1/weights.bin")  # another model's data: outside its own
            aside.rename(repo / "evil")
            wait_for(lambda: "refused model evil: " in server.log())
            assert "keeps its data in '../gru/1/weights.bin', which resolves to" in server.log()
            assert {m.name for m in client.list_models()} == {"gru"}
            outputs = [client.step("s", x, model="gru").output for x in X]
        expected, _ = reference_sequence(MODELS / "gru", X)
        np.testing.assert_allclose(np.array(outputs), expected, atol=1e-5)
        assert "Traceback" not in server.log()
    finally:
        assert server.stop() == 0, server.log()
