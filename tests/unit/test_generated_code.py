"""The checked-in generated protobuf code is exactly what the script makes."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_checked_in_generated_code_matches_proto_sources(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_proto.py"), str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = tmp_path / "flame_magic" / "_proto"
    checked_in = ROOT / "flame_magic" / "_proto"
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    kept = sorted(p.name for p in checked_in.iterdir() if p.is_file() and p.suffix in (".py", ".pyi"))
    assert names == kept
    _, mismatch, errors = filecmp.cmpfiles(fresh, checked_in, names, shallow=False)
    assert not mismatch and not errors, f"regenerate with scripts/generate_proto.py: {mismatch or errors}"


def test_wire_names_match_flame():
    from flame_magic.protocol import frontend, instance, types

    assert types.DESCRIPTOR.package == "flame.v1"
    services = {**frontend.DESCRIPTOR.services_by_name, **instance.DESCRIPTOR.services_by_name}
    assert services["Frontend"].full_name == "flame.v1.Frontend"
    assert "WatchTask" in services["Frontend"].methods_by_name
    assert set(services["Instance"].methods_by_name) == {"OnSessionEnter", "OnTaskInvoke", "OnSessionLeave"}
