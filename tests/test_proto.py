"""The generated code is fresh, and the wire contract stays compatible with the steering copy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

REPO = Path(__file__).resolve().parent.parent
GENERATED = REPO / "service" / "cellstream" / "_proto"
CONTRACT = REPO.parent / "shared" / "cellstream.contract.proto"
OURS = REPO / "proto" / "cellstream" / "v1" / "cellstream.proto"


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "proto" / "generate.py"), str(tmp_path)], check=True, capture_output=True
    )
    fresh = {p.relative_to(tmp_path): p.read_text() for p in tmp_path.rglob("*.py*")}
    committed = {p.relative_to(GENERATED): p.read_text() for p in GENERATED.rglob("*.py*")}
    assert fresh.keys() == committed.keys()
    stale = [str(name) for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"generated code is stale, run `make proto`: {stale}"


def descriptor(proto: Path, tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / (proto.stem + ".pb")
    include = Path(protoc.__file__).parent / "_proto"
    assert (
        protoc.main(
            ["protoc", f"-I{proto.parent}", f"-I{include}", f"--descriptor_set_out={out}", proto.name]
        )
        == 0
    )
    file_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return file_set.file[0]


@pytest.mark.skipif(
    not CONTRACT.exists(), reason="the steering copy shared/cellstream.contract.proto is not beside the repo"
)
def test_wire_compatible_with_contract(tmp_path: Path) -> None:
    contract = descriptor(CONTRACT, tmp_path / "a")
    ours = descriptor(OURS, tmp_path / "b")
    assert ours.package == contract.package == "cellstream.v1"
    our_messages = {m.name: m for m in ours.message_type}
    for message in contract.message_type:
        assert message.name in our_messages, f"message {message.name} is missing"
        our_fields = {f.number: f for f in our_messages[message.name].field}
        for field in message.field:
            mine = our_fields.get(field.number)
            assert mine is not None, f"{message.name}.{field.name} (#{field.number}) is missing"
            assert (mine.name, mine.type, mine.label, mine.type_name.split(".")[-1]) == (
                field.name,
                field.type,
                field.label,
                field.type_name.split(".")[-1],
            ), f"{message.name}.{field.name} changed"
    (service,) = contract.service
    (our_service,) = [s for s in ours.service if s.name == service.name]
    our_methods = {m.name: m for m in our_service.method}
    for method in service.method:
        mine = our_methods[method.name]
        assert (mine.input_type, mine.output_type, mine.client_streaming, mine.server_streaming) == (
            method.input_type,
            method.output_type,
            method.client_streaming,
            method.server_streaming,
        ), f"method {method.name} changed"


def test_every_rpc_and_field_is_documented() -> None:
    lines = OURS.read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        is_field = (
            stripped
            and "=" in stripped
            and stripped.endswith(";")
            and not stripped.startswith(("//", "syntax", "package"))
        )
        if stripped.startswith("rpc ") or is_field:
            assert lines[i - 1].strip().startswith("//"), f"line {i + 1} has no doc comment: {stripped}"
