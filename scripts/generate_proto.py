"""Regenerate flame_magic/_proto from proto/ (the only way those files are made).

Messages, their type stubs (``*_pb2.pyi``) and gRPC code come from grpcio-tools' protoc;
the gRPC code's type stubs (``*_pb2_grpc.pyi``) from mypy-protobuf's plugin, so that calls
through the stubs are typed. Both are pinned in the ``test`` extra: another version would
make other files.

Usage: python scripts/generate_proto.py [OUTPUT_ROOT]
"""

from __future__ import annotations

import shutil
import sys
import sysconfig
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"


def _plugin(name: str) -> str:
    """The path of a protoc plugin installed for this Python (mypy-protobuf's)."""
    places = (Path(sys.executable).parent, Path(sysconfig.get_path("scripts")))
    beside = next((place / name for place in places if (place / name).exists()), None)
    found = str(beside) if beside is not None else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: install the test extra (pip install -e '.[test]')")
    return found


def generate(output_root: Path) -> list[Path]:
    """Generate Python modules and their type stubs for every .proto under proto/ into output_root."""
    sources = sorted(PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={output_root}",
        f"--pyi_out={output_root}",
        f"--grpc_python_out={output_root}",
        f"--mypy_grpc_out={output_root}",
        *(str(s.relative_to(PROTO_ROOT)) for s in sources),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    package = output_root / "flame_magic" / "_proto"
    for grpc_module in package.glob("*_pb2_grpc.py"):
        if "Servicer" not in grpc_module.read_text():  # a .proto with no service
            grpc_module.unlink()
            grpc_module.with_suffix(".pyi").unlink(missing_ok=True)
    marker = '"""Generated from proto/ by scripts/generate_proto.py; do not edit."""\n'
    (package / "__init__.py").write_text(marker)
    return sorted(p for p in package.iterdir() if p.is_file())


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    for path in generate(out):
        print(path)
