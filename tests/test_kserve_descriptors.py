"""proto/inference is wire-compatible with Triton: every message, field, enum value and method it
declares has the full name, number, type and shape of the one in tritonclient's own stubs; every
Triton method is either served or answered UNIMPLEMENTED on purpose; and both stub sets load in
one process (ours live in a descriptor pool of their own)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pool
from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.grpc import service_pb2 as triton_service

from cellstream._proto import inference
from cellstream._proto.inference import grpc_service_pb2, model_config_pb2
from cellstream.protocols.kserve_v2_unserved import UNSERVED

PROTOS = Path(__file__).resolve().parent.parent / "proto" / "inference"
OURS = (grpc_service_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR)
TRITON = descriptor_pool.Default()  # where tritonclient's stubs register themselves


def messages(file: Any) -> list[Any]:
    """Every message type of a file, nested ones (map entries included) too."""

    def walk(message: Any) -> list[Any]:
        return [message, *(inner for nested in message.nested_types for inner in walk(nested))]

    return [message for top in file.message_types_by_name.values() for message in walk(top)]


def enums(file: Any) -> list[Any]:
    found = list(file.enum_types_by_name.values())
    for message in messages(file):
        found += message.enum_types
    return found


def shape_of(field: Any) -> tuple[Any, ...]:
    kind = field.message_type or field.enum_type
    oneof = field.containing_oneof
    return (
        field.name,
        field.type,
        field.is_repeated,
        kind.full_name if kind is not None else None,
        oneof.name if oneof is not None else None,
    )


def test_the_stubs_are_separate_pools_that_load_together() -> None:
    assert grpc_service_pb2.DESCRIPTOR.pool is inference.POOL
    assert triton_service.DESCRIPTOR.pool is TRITON and triton_config.DESCRIPTOR.pool is TRITON
    assert grpc_service_pb2.DESCRIPTOR.package == triton_service.DESCRIPTOR.package == "inference"


@pytest.mark.parametrize("message", [m for file in OURS for m in messages(file)], ids=lambda m: m.full_name)
def test_every_message_matches_tritons_field_for_field(message: Any) -> None:
    theirs = TRITON.FindMessageTypeByName(message.full_name)
    assert message.GetOptions().map_entry == theirs.GetOptions().map_entry
    for field in message.fields:
        their_field = theirs.fields_by_number.get(field.number)
        assert their_field is not None, f"{message.full_name}.{field.name} (#{field.number}) is not Triton's"
        assert shape_of(field) == shape_of(their_field), f"{message.full_name}.{field.name} differs"


def test_every_enum_value_has_tritons_number() -> None:
    for enum in [e for file in OURS for e in enums(file)]:
        theirs = TRITON.FindEnumTypeByName(enum.full_name)
        for value in enum.values:
            assert theirs.values_by_name[value.name].number == value.number, f"{enum.full_name}.{value.name}"


def test_every_method_matches_tritons_and_every_triton_method_is_answered() -> None:
    ours = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    for method in ours.methods:
        their = theirs.methods_by_name[method.name]
        assert (
            method.input_type.full_name,
            method.output_type.full_name,
            method.client_streaming,
            method.server_streaming,
        ) == (
            their.input_type.full_name,
            their.output_type.full_name,
            their.client_streaming,
            their.server_streaming,
        ), method.name
    served = set(ours.methods_by_name)
    assert not served & set(UNSERVED)
    assert served | set(UNSERVED) == set(theirs.methods_by_name)


@pytest.mark.parametrize("proto", sorted(PROTOS.glob("*.proto")), ids=lambda p: p.name)
def test_every_rpc_field_and_value_is_documented(proto: Path) -> None:
    lines = proto.read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        is_field = stripped.endswith(";") and "=" in stripped and not stripped.startswith(("//", "syntax"))
        if stripped.startswith(("rpc ", "message ", "enum ", "oneof ")) or is_field:
            assert lines[i - 1].strip().startswith("//"), (
                f"{proto.name}:{i + 1} has no doc comment: {stripped}"
            )
