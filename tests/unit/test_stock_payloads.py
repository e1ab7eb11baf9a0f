"""What flame-magic sends to Flame's stock flmrun: pickles that name no code, and its evaluator's sources."""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import re
import subprocess
import sys

import cloudpickle
import pytest

from flame_magic import codec, stock


def globals_named(data: bytes) -> set[str]:
    """The globals a pickle loads (GLOBAL opcodes; protocol 3 has no STACK_GLOBAL)."""
    names = set()
    for opcode, argument, _ in pickletools.genops(data):
        assert opcode.name != "STACK_GLOBAL"
        if opcode.name == "GLOBAL":
            names.add(str(argument).replace(" ", "."))
    return names


def test_the_pickles_name_only_flamepys_types_and_builtins_never_code() -> None:
    context = stock.runner_context()
    assert globals_named(context) == {"flamepy.runner.types.RunnerContext", "builtins.eval"}
    request = stock.runner_request("run", codec.frame(b"cell"))
    assert globals_named(request) == {"flamepy.runner.types.RunnerRequest"}


def test_flamepys_runner_loads_them_and_the_evaluator_probes_from_source() -> None:
    # flamepy cannot be imported next to flame_magic (both define flame.v1): another process.
    script = (
        "import json, pickle, sys\n"
        "from flamepy.runner.types import RunnerContext, RunnerRequest\n"
        "context = pickle.loads(sys.stdin.buffer.read())\n"
        "assert isinstance(context, RunnerContext) and context.stateful is False\n"
        "request = pickle.loads(bytes.fromhex(sys.argv[1]))\n"
        "assert isinstance(request, RunnerRequest) and request.method == 'probe'\n"
        "print(getattr(context.execution_object, request.method)().decode())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, stock.runner_request("probe").hex()],
        input=stock.runner_context(),
        capture_output=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert done.returncode == 0, done.stderr.decode()
    report = stock.Report.parse(done.stdout.strip().splitlines()[-1])
    assert report.python == codec.PYTHON_VERSION and report.load_error == ""
    assert json.loads(done.stdout)["versions"]["cloudpickle"] == cloudpickle.__version__


def test_results_are_read_only_as_plain_bytes() -> None:
    assert codec.plain_bytes(cloudpickle.dumps(b"result")) == b"result"

    class Sneaky:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, ("echo pwned",))

    with pytest.raises(codec.PayloadError, match="only plain bytes"):
        codec.plain_bytes(pickle.dumps(Sneaky()))
    with pytest.raises(codec.PayloadError, match="not bytes"):
        codec.plain_bytes(pickle.dumps([1, 2]))
    with pytest.raises(codec.PayloadError, match="not a framed"):
        codec.unframe(b"\x0a\x00", "the runner")
    assert codec.unframe(codec.frame(b"abc"), "the runner") == b"abc"


def test_the_evaluator_sources_import_only_under_their_private_package() -> None:
    bundle = stock.bundle()
    assert re.fullmatch(r"_flame_magic_[0-9a-f]{12}", bundle.root)
    for name, source in bundle.modules.items():
        assert name == bundle.root or name.startswith(bundle.root + ".")
        stray = re.findall(r"^\s*(?:from|import)\s+flame_magic", source, flags=re.MULTILINE)
        assert not stray, (name, stray)
    messages = bundle.modules[f"{bundle.root}.flame_magic._proto.cell_pb2"]
    assert "ValidateProtobufRuntimeVersion" not in messages and "_descriptor_pool.Default()" not in messages


def test_a_python_copy_of_flmrun_sets_only_the_python_version() -> None:
    from flame_magic.protocol import types

    template = types.ApplicationSpec(
        command="${FLAME_HOME}/bin/uv",
        arguments=[
            "run",
            "--python",
            "python${FLAME_PYTHON_VERSION}",
            "python",
            "-m",
            "flamepy.runner.runpy",
        ],
        environments=[types.Environment(name="FLAME_PYTHON_VERSION", value="3.12")],
        installer="python",
    )
    copy = stock.python_copy_spec(template)
    assert {e.name: e.value for e in copy.environments} == {"FLAME_PYTHON_VERSION": codec.PYTHON_VERSION}
    assert list(copy.arguments) == list(template.arguments) and copy.installer == "python"
    assert stock.python_copy_name("flmrun") == f"flmrun-py{codec.PYTHON_VERSION.replace('.', '-')}"
