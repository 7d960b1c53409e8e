"""The CSI protocol in csi/: the committed stubs match the proto, and the proto is wire-compatible with
the official CSI v1.1.0 definitions (as shipped, generated, in the ember-csi package)."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from csi import csi_pb2
from testkit.host import REPO

GENERATED = ("csi_pb2.py", "csi_pb2_grpc.py", "csi_pb2.pyi")


def test_committed_stubs_are_what_the_proto_generates(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{REPO}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            "csi/csi.proto",
        ],
        check=True,
        cwd=REPO,
    )
    for name in GENERATED:
        fresh = (tmp_path / "csi" / name).read_text()
        committed = (REPO / "csi" / name).read_text()
        assert fresh == committed, f"csi/{name} is stale: run scripts/gen-proto.sh"


def ours() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    csi_pb2.DESCRIPTOR.CopyToProto(proto)
    return proto


def official_v1_1() -> descriptor_pb2.FileDescriptorProto:
    """The serialized descriptor inside ember-csi's v1.1.0 stubs, read without importing them (they are
    old-style generated code that current protobuf refuses to load)."""
    spec = importlib.util.find_spec("ember_csi")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("ember-csi is not installed; run scripts/install.sh --dev")
    source = Path(spec.submodule_search_locations[0], "v1_1_0", "csi_pb2.py").read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.keyword) and node.arg == "serialized_pb":
            return descriptor_pb2.FileDescriptorProto.FromString(ast.literal_eval(node.value))
    raise AssertionError("no serialized descriptor in ember-csi's csi_pb2.py")


def messages(proto) -> dict[str, descriptor_pb2.DescriptorProto]:
    found = {}

    def walk(prefix: str, items) -> None:
        for msg in items:
            name = f"{prefix}.{msg.name}"
            found[name] = msg
            walk(name, msg.nested_type)

    walk("", proto.message_type)
    return found


def enums(proto) -> dict[str, dict[str, int]]:
    found = {f".{e.name}": {v.name: v.number for v in e.value} for e in proto.enum_type}
    for name, msg in messages(proto).items():
        found.update({f"{name}.{e.name}": {v.name: v.number for v in e.value} for e in msg.enum_type})
    return found


def field_shape(field: descriptor_pb2.FieldDescriptorProto) -> tuple:
    return field.number, field.type, field.label, field.type_name


def test_every_v1_1_message_and_field_is_on_the_wire_the_same():
    old, new = messages(official_v1_1()), messages(ours())
    assert len(old) > 90  # v1.1.0 has 95, map entries included
    mismatches = []
    for name, old_msg in old.items():
        if name not in new:
            mismatches.append(f"message {name} missing")
            continue
        new_fields = {f.name: f for f in new[name].field}
        for field in old_msg.field:
            if field.name not in new_fields:
                mismatches.append(f"{name}.{field.name} missing")
            elif field_shape(field) != field_shape(new_fields[field.name]):
                mismatches.append(
                    f"{name}.{field.name}: v1.1 {field_shape(field)} != ours {field_shape(new_fields[field.name])}"
                )
    assert mismatches == []


def test_every_v1_1_enum_value_keeps_its_number():
    old, new = enums(official_v1_1()), enums(ours())
    for name, values in old.items():
        assert name in new, name
        assert {k: new[name].get(k) for k in values} == values, name


def test_every_v1_1_method_keeps_its_request_and_response():
    def methods(proto):
        return {(s.name, m.name): (m.input_type, m.output_type) for s in proto.service for m in s.method}

    old, new = methods(official_v1_1()), methods(ours())
    assert {key: new.get(key) for key in old} == old


def test_v1_12_additions_are_present():
    proto = ours()
    assert proto.package == "csi.v1"
    services = {s.name: {m.name for m in s.method} for s in proto.service}
    assert set(services) == {"Identity", "Controller", "GroupController", "SnapshotMetadata", "Node"}
    assert {"GetSnapshot", "ControllerGetVolume", "ControllerModifyVolume"} <= services["Controller"]
    assert {"CreateVolumeGroupSnapshot", "DeleteVolumeGroupSnapshot", "GetVolumeGroupSnapshot"} <= (
        services["GroupController"]
    )
    assert {"GetMetadataAllocated", "GetMetadataDelta"} == services["SnapshotMetadata"]
    mode = csi_pb2.VolumeCapability.AccessMode
    assert (mode.SINGLE_NODE_SINGLE_WRITER, mode.SINGLE_NODE_MULTI_WRITER) == (6, 7)
    assert "mutable_parameters" in csi_pb2.CreateVolumeRequest.DESCRIPTOR.fields_by_name
    assert csi_pb2.VolumeCondition.DESCRIPTOR.fields_by_name["abnormal"].number == 1
