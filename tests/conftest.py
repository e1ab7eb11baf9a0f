"""Shared fixtures: a real IPython shell with flame_magic loaded, on an embedded Flame.

``--cpu-load`` runs the session beside two CPU-bound processes, as on a busy machine.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from jupyter_client.manager import start_new_kernel

# Spins until its parent (the pytest process) is gone: killing pytest leaves no burner behind.
BURNER = """
import os, sys
parent = int(sys.argv[1])
while os.getppid() == parent:
    for _ in range(200_000):
        pass
"""
BURNERS = 2
_burners = pytest.StashKey[list[subprocess.Popen[bytes]]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cpu-load",
        action="store_true",
        help=f"run the tests beside {BURNERS} CPU-bound processes (a busy machine)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--cpu-load"):
        config.stash[_burners] = [
            subprocess.Popen([sys.executable, "-c", BURNER, str(os.getpid())]) for _ in range(BURNERS)
        ]


def pytest_unconfigure(config: pytest.Config) -> None:
    for burner in config.stash.get(_burners, []):
        burner.kill()
        burner.wait()


def pytest_report_header(config: pytest.Config) -> str | None:
    burners = config.stash.get(_burners, [])
    if not burners:
        return None
    return f"cpu load: {len(burners)} CPU-bound processes, pids {' '.join(str(b.pid) for b in burners)}"


@pytest.fixture(scope="session")
def isolated_home(tmp_path_factory):
    """No cluster configured: HOME without ~/.flame and no FLAME_* variables."""
    home = tmp_path_factory.mktemp("home")
    saved = {k: os.environ.get(k) for k in ("HOME", "FLAME_ENDPOINT", "FLAME_CA_FILE")}
    os.environ["HOME"] = str(home)
    os.environ.pop("FLAME_ENDPOINT", None)
    os.environ.pop("FLAME_CA_FILE", None)
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def shell(isolated_home):
    """A real IPython shell with the extension loaded (one embedded Flame for the run)."""
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "flame_magic")
    yield ip
    ip.run_line_magic("unload_ext", "flame_magic")


@pytest.fixture
def kernel(isolated_home):
    """A real Jupyter kernel (manager, client), shut down afterwards."""
    manager, client = start_new_kernel(kernel_name="python3", env={**os.environ})
    yield manager, client
    client.stop_channels()
    if manager.is_alive():
        manager.shutdown_kernel(now=True)


class Ran:
    """What running one cell showed: its value, error, and captured output."""

    def __init__(self, result, captured):
        self.value = result.result
        self.error = result.error_in_exec or result.error_before_exec
        self.stdout = captured.stdout
        self.stderr = captured.stderr
        self.outputs = captured.outputs


@pytest.fixture
def run(shell):
    """Run one cell in the shell and capture what it showed."""

    def run_cell(source: str) -> Ran:
        with capture_output() as captured:
            result = shell.run_cell(source, store_history=True)
        return Ran(result, captured)

    return run_cell
