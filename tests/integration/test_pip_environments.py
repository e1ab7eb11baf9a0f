"""``--pip``: Flame installs the packages as an application's package, through a real kernel.

On the embedded Flame, on both runner paths (flame-magic's runner and Flame's ``flmrun``),
offline (``PIP_NO_INDEX``, no wheel folder):

- a wheel built in the test's directory, given by its path, is installed for the cell's
  runners (and only theirs: the notebook does not have it);
- a later cell with the same packages, in a new session, reuses the application: it is
  registered and installed once;
- a requirement that no index can give fails the cell in one line, with pip's reason and
  the way out; the notebook's variables survive and the next cells run, also a second try
  of the same requirement, which installs anew.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from jupyter_client.manager import start_new_kernel
from test_environment import execute, text, value

WHEEL = "dist/flmpipdemo-0.3-py3-none-any.whl"


def build_wheel(root: Path) -> Path:
    """A tiny pure-Python distribution, built offline with the setuptools installed here."""
    project = root / "flmpipdemo"
    (project / "flmpipdemo").mkdir(parents=True)
    (project / "pyproject.toml").write_text(
        textwrap.dedent(
            """
            [build-system]
            requires = ["setuptools"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "flmpipdemo"
            version = "0.3"
            """
        )
    )
    (project / "flmpipdemo" / "__init__.py").write_text(
        "__version__ = '0.3'\n\ndef twice(x):\n    return 2 * x\n"
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
        + ["-w", str(root / "work" / "dist"), str(project)],
        check=True,
        capture_output=True,
    )
    return root / "work" / WHEEL


@pytest.fixture
def offline_kernel(isolated_home, tmp_path):
    """A kernel in a folder with a wheel in ``dist/``, whose pip reaches no package index."""
    build_wheel(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_FIND_LINKS", "UV_"))}
    env["PIP_NO_INDEX"] = "1"
    manager, client = start_new_kernel(kernel_name="python3", env=env, cwd=str(tmp_path / "work"))
    yield client
    client.stop_channels()
    if manager.is_alive():
        manager.shutdown_kernel(now=True)


def installs(client, application_prefix: str) -> int:
    """How many times the embedded Flame installed an environment of ``application_prefix``."""
    code = (
        "import pathlib\n"
        "_flame = get_ipython().find_cell_magic('flmrun').__self__.connection()._embedded\n"
        f"sum(p.read_text().count('$ ') for p in (pathlib.Path(_flame.state_dir) / 'logs' / 'install')"
        f".glob({application_prefix + '-env-*.log'!r}))"
    )
    reply, outputs = execute(client, code)
    assert reply["status"] == "ok", outputs
    return int(value(outputs))


@pytest.mark.parametrize("application", ["flame-magic", "flmrun"])  # both runner paths
def test_pip_installs_a_local_wheel_offline_once_and_a_bad_requirement_fails_in_one_line(
    offline_kernel, application
):
    client = offline_kernel
    reply, _ = execute(client, f"%load_ext flame_magic\n%config FlameMagics.application = {application!r}")
    assert reply["status"] == "ok"
    execute(client, "kept = 41")
    cell = f"%%flmrun --pip ./{WHEEL}\nimport flmpipdemo\nflmpipdemo.__version__, flmpipdemo.twice(kept)"

    reply, outputs = execute(client, cell)
    assert reply["status"] == "ok", outputs
    assert value(outputs) == "('0.3', 82)"
    assert f"registered application '{application}-env-" in text(outputs)
    assert "flmpipdemo-0.3-py3-none-any.whl" in text(outputs)
    reply, outputs = execute(client, "import importlib.util\nimportlib.util.find_spec('flmpipdemo') is None")
    assert value(outputs) == "True"  # installed for the runners, not in the notebook

    # Another session, the same packages: the same application, installed once.
    reply, outputs = execute(client, "%flame close")
    assert reply["status"] == "ok", outputs
    reply, outputs = execute(client, cell)
    assert reply["status"] == "ok", outputs
    assert value(outputs) == "('0.3', 82)"
    assert "registered" not in text(outputs)
    assert installs(client, application) == 1

    # A package no index gives (there is none): one line, pip's reason and what to do.
    for _attempt in range(2):  # the second try installs anew, and fails the same way
        reply, outputs = execute(client, "%%flmrun --pip flm-no-such-dist-h16==1.0\n1")
        assert reply["status"] == "error" and reply["ename"] == "CellFailed", outputs
        lines = outputs[-1]["traceback"]
        assert len(lines) == 1, lines
        line = lines[0]
        assert line.startswith("CellFailed: Installing flm-no-such-dist-h16==1.0 for the runners failed (")
        assert "No matching distribution found for flm-no-such-dist-h16==1.0" in line
        assert "package index" in line and "--pip ./dist/NAME.whl" in line
        assert "Traceback" not in line and "\n" not in line
    assert installs(client, application) == 3  # the wheel's once, the bad one twice

    reply, outputs = execute(client, "%%flmrun\nkept + 1")
    assert reply["status"] == "ok", outputs
    assert value(outputs) == "42"
    reply, outputs = execute(client, cell)
    assert reply["status"] == "ok", outputs
    assert value(outputs) == "('0.3', 82)"


def test_pip_refuses_options_and_paths_that_are_not_wheels(run, tmp_path):
    ran = run("%%flmrun --pip=--index-url=http://example.org\n1")
    assert type(ran.error).__name__ == "UsageError"
    assert "take requirements such as 'pandas==2.2.2' or the path of a wheel file" in str(ran.error)
    missing = tmp_path / "nowhere-0.1-py3-none-any.whl"
    ran = run(f"%%flmrun --pip {missing}\n1")
    assert type(ran.error).__name__ == "UsageError"
    assert f"no such file ({missing})" in str(ran.error)
    ran = run("%%flmrun --pip 'pandas=>2'\n1")
    assert type(ran.error).__name__ == "UsageError"
    assert "is not a requirement" in str(ran.error)


def test_a_map_and_a_background_cell_say_a_failed_installation_in_one_line(offline_kernel):
    client = offline_kernel
    reply, _ = execute(client, "%load_ext flame_magic")
    assert reply["status"] == "ok"
    reply, outputs = execute(client, "%%flmrun --map x=range(3) --pip flm-no-such-dist-h16==2.0\nx")
    assert reply["status"] == "error" and reply["ename"] == "CellFailed", outputs
    assert len(outputs[-1]["traceback"]) == 1
    assert (
        "Installing flm-no-such-dist-h16==2.0 for the runners failed (No matching distribution"
        in (outputs[-1]["traceback"][0])
    )
    reply, outputs = execute(client, "%%flmrun --background job --pip flm-no-such-dist-h16==2.0\n1")
    assert reply["status"] == "ok", outputs
    reply, outputs = execute(
        client, "try:\n    job.result(timeout=300)\nexcept Exception as exc:\n    print(exc)"
    )
    said = text(outputs).strip().splitlines()
    assert len(said) == 1, said  # (the cell that started it showed it too, as its output)
    assert said[-1].startswith("Installing flm-no-such-dist-h16==2.0 for the runners failed (No matching")
    assert said[-1].endswith("The background cell `job` did not run to its end.")
