"""Our ``flame.v1`` protos against flamepy 0.6.0's, field by field.

flamepy is Flame's own client; its generated modules register the same ``flame.v1`` names as
ours in protobuf's default pool, so they are read in a subprocess and compared as data:
every message with its fields (number, type, label, message or enum type, proto3
``optional``), every enum with its values, every service with its methods (request and
reply types, streaming).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "proto" / "flame_magic" / "_proto"

DUMP = """
import json, sys
from google.protobuf import descriptor_pb2

def dump(modules):
    out = {"messages": {}, "enums": {}, "services": {}}
    def messages(prefix, items):
        for item in items:
            name = f"{prefix}.{item.name}"
            out["messages"][name] = {
                f.name: [f.number, f.type, f.label, f.type_name, f.proto3_optional] for f in item.field
            }
            messages(name, item.nested_type)
            for enum in item.enum_type:
                out["enums"][f"{name}.{enum.name}"] = {v.name: v.number for v in enum.value}
    for module in modules:
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        messages(proto.package, proto.message_type)
        for enum in proto.enum_type:
            out["enums"][f"{proto.package}.{enum.name}"] = {v.name: v.number for v in enum.value}
        for service in proto.service:
            out["services"][f"{proto.package}.{service.name}"] = {
                m.name: [m.input_type, m.output_type, m.client_streaming, m.server_streaming]
                for m in service.method
            }
    return out

if sys.argv[1] == "flamepy":
    from flamepy.proto import frontend_pb2, shim_pb2, types_pb2
    modules = [types_pb2, frontend_pb2, shim_pb2]
else:
    from flame_magic.protocol import frontend, instance, types
    modules = [types, frontend, instance]
print(json.dumps(dump(modules)))
"""


def descriptors(side: str) -> dict[str, dict[str, object]]:
    done = subprocess.run(
        [sys.executable, "-c", DUMP, side], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_our_protos_say_which_flame_release_they_follow_and_flamepy_is_that_release():
    releases = set()
    for name in ("types", "frontend", "instance"):
        found = re.search(
            r"Follows Flame release v(\S+) \(xflops/flame, commit ([0-9a-f]{40})\)",
            (PROTOS / f"{name}.proto").read_text(),
        )
        assert found, f"{name}.proto does not say which Flame release it follows"
        releases.add(found.groups())
    assert len(releases) == 1
    ((release, _commit),) = releases
    assert importlib.metadata.version("flamepy") == release


@pytest.mark.parametrize("kind", ["messages", "enums", "services"])
def test_our_flame_v1_descriptors_match_flamepys_field_by_field(kind):
    ours, flamepy = descriptors("ours")[kind], descriptors("flamepy")[kind]
    assert sorted(ours) == sorted(flamepy)
    for name in ours:
        assert ours[name] == flamepy[name], f"{name} differs from flamepy's"
