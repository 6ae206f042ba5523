"""The checked-in generated code matches proto/ (regenerate: python scripts/gen_proto.py)."""

from __future__ import annotations

import pathlib
import tempfile

import pytest
from google.protobuf import descriptor_pb2

from shoal.v1 import agent_pb2, control_pb2, gossip_pb2, raft_pb2, types_pb2

ROOT = pathlib.Path(__file__).resolve().parent.parent

protoc = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools is in the test extras")


def _compiled() -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "set.pb"
        protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
        assert protos, "no .proto files found"
        rc = protoc.main(
            ["protoc", f"-I{ROOT / 'proto'}", f"--descriptor_set_out={out}", *protos]
        )
        assert rc == 0
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return {f.name: _canonical(f) for f in fds.file}


def _canonical(fdp: descriptor_pb2.FileDescriptorProto) -> bytes:
    """Serialized descriptor without json_name, which protoc adds only to descriptor sets."""

    def strip(messages: "list[descriptor_pb2.DescriptorProto]") -> None:
        for m in messages:
            for f in m.field:
                f.ClearField("json_name")
            strip(list(m.nested_type))

    strip(list(fdp.message_type))
    return fdp.SerializeToString(deterministic=True)


def test_generated_code_matches_proto_sources() -> None:
    compiled = _compiled()
    checked_in = {}
    for module in (agent_pb2, control_pb2, gossip_pb2, raft_pb2, types_pb2):
        fdp = descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
        checked_in[fdp.name] = _canonical(fdp)
    assert set(compiled) == set(checked_in), "a .proto file has no generated module (or vice versa)"
    stale = sorted(name for name in compiled if compiled[name] != checked_in[name])
    assert not stale, f"generated code is stale for {stale}: run python scripts/gen_proto.py"


def test_grpc_stubs_exist_for_every_service() -> None:
    from shoal.v1 import agent_pb2_grpc, control_pb2_grpc, raft_pb2_grpc

    assert hasattr(control_pb2_grpc, "ControlStub")
    assert hasattr(agent_pb2_grpc, "AgentStub")
    assert hasattr(raft_pb2_grpc, "RaftStub")
    assert [m.name for m in raft_pb2.DESCRIPTOR.services_by_name["Raft"].methods] == ["Send", "SendSnapshot"]
    assert [m.name for m in control_pb2.DESCRIPTOR.services_by_name["Control"].methods] == [
        "Apply", "Get", "Delete", "Scale", "WatchEvents", "Logs", "Members", "Servers", "AddServer", "RemoveServer", "Cordon", "Plan",
        "WatchTable",
    ]
