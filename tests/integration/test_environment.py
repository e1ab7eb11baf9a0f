"""The runner's environment follows the notebook, through a real kernel on the embedded Flame.

- A module that lives only in a folder the notebook put on ``sys.path`` (not the runner's
  working directory, nor its ``sys.path``) travels with the cells that use it, and an edit
  takes effect on the next cell.
- A package at another version on the runner (``PYTHONPATH`` gives the runner 2.0, the
  notebook puts 1.0 first on its ``sys.path``), or missing there, fails the cell with one
  line, before anything is unpickled.
- ``--pip`` and ``FlameMagics.requirements`` install from a local wheel folder, offline; an
  install that cannot find the package says so (more in ``test_pip_environments.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from jupyter_client.manager import start_new_kernel


def execute(client, code: str) -> tuple[dict, list[dict]]:
    outputs: list[dict] = []

    def keep(message: dict) -> None:
        if message["msg_type"] in ("stream", "execute_result", "display_data", "error"):
            outputs.append(message["content"])

    reply = client.execute_interactive(code, timeout=180, output_hook=keep)
    return reply["content"], outputs


def value(outputs: list[dict]) -> str:
    results = [o["data"]["text/plain"] for o in outputs if "data" in o]
    assert results, outputs
    return results[-1]


def text(outputs: list[dict]) -> str:
    return "".join(o.get("text", "") for o in outputs)


def build_wheel(root: Path, name: str, version: str, wheels: Path) -> Path:
    """A tiny pure-Python distribution ``name`` at ``version``, built with pip."""
    project = root / f"{name}-{version}"
    (project / name).mkdir(parents=True)
    (project / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [build-system]
            requires = ["setuptools"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{name}"
            version = "{version}"

            [tool.setuptools]
            packages = ["{name}"]
            """
        )
    )
    (project / name / "__init__.py").write_text(
        textwrap.dedent(
            f"""
            __version__ = "{version}"

            class Toy:
                def __init__(self, size):
                    self.size = size
            """
        )
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
        + ["-w", str(wheels), str(project)],
        check=True,
        capture_output=True,
    )
    return next(wheels.glob(f"{name}-{version}-*.whl"))


TOOLHELP = "def loud(word):\n    return word.upper()\n"


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """Folders: the notebook's modules, two versions of a package, wheels, the kernel's cwd."""
    root = tmp_path_factory.mktemp("environment")
    lib = root / "lib"
    (lib / "shapes").mkdir(parents=True)
    (lib / "toolbox.py").write_text(
        "from toolhelp import loud\n\ndef shout(word):\n    return loud(word) + '!'\n"
    )
    (lib / "toolhelp.py").write_text(TOOLHELP)
    (lib / "unsent.py").write_text("NAME = 'unsent'\n")
    (lib / "shapes" / "__init__.py").write_text("from .area import square\n")
    (lib / "shapes" / "area.py").write_text(
        "def square(side):\n    return side * side\n\nclass Square:\n    def __init__(self, side):\n"
        "        self.side = side\n"
    )
    wheels = root / "wheels"
    wheels.mkdir()
    notebook_site, runner_site = root / "notebook-site", root / "runner-site"
    for wheel, site in [
        (build_wheel(root, "flmtoy", "1.0", wheels), notebook_site),
        (build_wheel(root, "flmtoy", "2.0", wheels), runner_site),
        (build_wheel(root, "flmextra", "1.0", wheels), notebook_site),
    ]:
        with zipfile.ZipFile(wheel) as archive:  # a pure-Python wheel installs by unpacking
            archive.extractall(site)
    work = root / "work"
    work.mkdir()
    return {
        "lib": lib,
        "wheels": wheels,
        "notebook_site": notebook_site,
        "runner_site": runner_site,
        "work": work,
    }


@pytest.fixture
def env_kernel(isolated_home, places):
    """A kernel whose runners see flmtoy 2.0 (PYTHONPATH) and install only from the local wheels."""
    env = {**os.environ}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(places["runner_site"]), env.get("PYTHONPATH")) if p)
    env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(places["wheels"]))
    manager, client = start_new_kernel(kernel_name="python3", env=env, cwd=str(places["work"]))
    yield client
    client.stop_channels()
    if manager.is_alive():
        manager.shutdown_kernel(now=True)


@pytest.mark.parametrize("application", ["flame-magic", "flmrun"])  # both runner paths
def test_local_modules_travel_and_edits_take_effect(env_kernel, places, application):
    client = env_kernel
    lib = places["lib"]
    (lib / "toolhelp.py").write_text(TOOLHELP)  # as it was before an earlier run edited it
    reply, _ = execute(client, f"import sys\nsys.path.insert(0, {str(lib)!r})\n%load_ext flame_magic")
    assert reply["status"] == "ok"
    reply, _ = execute(client, f"%config FlameMagics.application = {application!r}")
    assert reply["status"] == "ok"

    reply, outputs = execute(
        client,
        "%%flmrun\nimport os\nfrom toolbox import shout\nimport shapes\nprint(shout('hi'), shapes.square(3))",
    )
    assert reply["status"] == "ok", outputs
    assert text(outputs) == "HI! 9\n"

    # The runner has no way to the folder: a module no cell names does not travel, and is not found.
    reply, outputs = execute(client, "%%flmrun\nimport importlib\nimportlib.import_module('un' + 'sent')")
    assert reply["status"] == "error" and reply["ename"] == "ModuleNotFoundError", outputs

    # A notebook function that uses the module takes it along; tracebacks name the notebook's file.
    execute(client, "import toolbox\ndef exclaim(word):\n    return toolbox.shout(word)")
    reply, outputs = execute(client, "%%flmrun\nexclaim('a'), toolbox.__file__")
    assert reply["status"] == "ok", outputs
    assert value(outputs) == repr(("A!", str(lib / "toolbox.py")))

    (lib / "toolhelp.py").write_text("def loud(word):\n    raise ValueError('edited: ' + word)\n")
    reply, outputs = execute(client, "%%flmrun\nfrom toolbox import shout\nshout('hey')")
    assert reply["status"] == "error" and reply["ename"] == "ValueError", outputs
    traceback = "\n".join(outputs[-1]["traceback"])
    assert "edited: hey" in traceback
    assert str(lib / "toolhelp.py") in traceback and "raise ValueError('edited: ' + word)" in traceback

    # --map items that are instances of the notebook's classes take their module to the map's runners.
    execute(client, "from shapes.area import Square\nsquares = [Square(side) for side in range(4)]")
    reply, outputs = execute(client, "%%flmrun --map s=squares --into areas --instances 2\ns.side * s.side")
    assert reply["status"] == "ok", outputs
    _, outputs = execute(client, "print(areas)")
    assert text(outputs) == "[0, 1, 4, 9]\n"

    _, outputs = execute(client, "%flame status")
    status = text(outputs)
    assert "Modules sent with cells:" in status
    assert "toolbox (" in status and "toolhelp (" in status and "2 versions" in status
    assert "shapes (2 files" in status and "unsent" not in status


@pytest.mark.parametrize("application", ["flame-magic", "flmrun"])  # both runner paths
def test_a_package_at_another_version_or_missing_fails_in_one_line(env_kernel, places, application):
    client = env_kernel
    site = places["notebook_site"]
    code = f"import sys\nsys.path.insert(0, {str(site)!r})\nimport flmtoy, flmextra\ntoy = flmtoy.Toy(3)\n"
    reply, _ = execute(client, code + "%load_ext flame_magic")
    assert reply["status"] == "ok"
    reply, _ = execute(client, f"%config FlameMagics.application = {application!r}")
    assert reply["status"] == "ok"
    _, outputs = execute(client, "print(flmtoy.__version__)")
    assert text(outputs) == "1.0\n"

    # First the runner refuses (it has 2.0), then the notebook, from the runner's report.
    for source in ("%%flmrun\ntoy.size", "%%flmrun\nimport flmtoy\nflmtoy.__version__"):
        reply, outputs = execute(client, source)
        assert reply["status"] == "error" and reply["ename"] == "CellFailed", outputs
        lines = outputs[-1]["traceback"]
        assert len(lines) == 1, lines
        assert "flmtoy is 1.0 in the notebook but 2.0 on the runner" in lines[0]
        assert "--pip flmtoy==1.0" in lines[0]
        assert "Traceback" not in lines[0] and "pickl" not in lines[0]

    reply, outputs = execute(client, "%%flmrun\nsmall = flmextra.Toy(1)\nsmall.size")
    assert reply["status"] == "error" and reply["ename"] == "CellFailed", outputs
    assert len(outputs[-1]["traceback"]) == 1
    assert "the runner lacks flmextra (1.0 in the notebook)" in outputs[-1]["traceback"][0]

    # Asked to, it runs with what the runner has.
    execute(client, "%config FlameMagics.check_packages = False")
    reply, outputs = execute(client, "%%flmrun\nimport flmtoy\ntoy.size, flmtoy.__version__")
    assert reply["status"] == "ok", outputs
    assert value(outputs) == "(3, '2.0')"
    execute(client, "%config FlameMagics.check_packages = True")

    # Installed on request, offline, from the local wheel: the notebook's version on the runner.
    reply, outputs = execute(
        client, "%%flmrun --pip flmtoy==1.0\nimport flmtoy\ntoy.size, flmtoy.__version__"
    )
    assert reply["status"] == "ok", outputs
    assert value(outputs) == "(3, '1.0')"
    # What --pip asks for is what the cell gets, also at another version than the notebook's.
    reply, outputs = execute(client, "%%flmrun --pip flmtoy==2.0\nimport flmtoy\nflmtoy.__version__")
    assert reply["status"] == "ok", outputs
    assert value(outputs) == "'2.0'"

    # The notebook's requirements and the cell's together make the runner's environment.
    execute(client, "%config FlameMagics.requirements = ['flmextra==1.0']")
    reply, outputs = execute(client, "%%flmrun --pip flmtoy==1.0\nflmextra.Toy(5).size + toy.size")
    assert reply["status"] == "ok", outputs
    assert value(outputs) == "8"

    reply, outputs = execute(client, "%%flmrun --pip flmtoy==9.9\n1")
    assert reply["status"] == "error" and reply["ename"] == "CellFailed", outputs
    assert len(outputs[-1]["traceback"]) == 1
    line = outputs[-1]["traceback"][0]
    assert "Installing flmextra==1.0, flmtoy==9.9 for the runners failed" in line
    assert "flmtoy==9.9" in line and "package index" in line
    execute(client, "%config FlameMagics.requirements = []")
    reply, outputs = execute(client, "%%flmrun\n'the next cell runs'")
    assert reply["status"] == "ok", outputs
