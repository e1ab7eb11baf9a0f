"""The parts of ``--pip`` environments: requirements, the generated package, the application.

The package is installed here by a real pip, offline, as the embedded Flame and Flame's
executor manager install an application's package (``--target``, from the unpacked project).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from flame_magic import codec, environments
from flame_magic.cache import Fetched, ObjectRef
from flame_magic.embedded.installer import needs_nothing_from_an_index
from flame_magic.protocol import cell, types


def tiny_wheel(folder: Path, name: str = "flmunit", version: str = "0.1") -> Path:
    """A pure-Python wheel written by hand (a wheel is a zip with metadata)."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}/__init__.py", f"VERSION = {version!r}\n")
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return path


def unpack(package: bytes, destination: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(package), mode="r:gz") as archive:
        archive.extractall(destination, filter="data")
    return destination


def test_requirements_are_sorted_once_each_and_wheels_carry_their_digest(tmp_path: Path) -> None:
    wheel = tiny_wheel(tmp_path)
    parsed = environments.parse(["numpy>=1", wheel.name, " numpy>=1 "], cwd=str(tmp_path))
    assert len(parsed) == 2 and parsed[0].startswith(f"{wheel}#sha256=") and parsed[1] == "numpy>=1"
    assert environments.describe(parsed) == f"{wheel.name}, numpy>=1"
    # A rebuilt wheel is another environment.
    wheel.write_bytes(wheel.read_bytes() + b"\0")
    assert environments.parse([str(wheel)]) != parsed[:1]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("--index-url=http://example.org", "give pip options as PIP_*"),
        ("./missing-0.1-py3-none-any.whl", "no such file"),
        ("pandas=>2", "is not a requirement"),
    ],
)
def test_what_is_not_a_requirement_is_refused_in_one_line(tmp_path: Path, text: str, says: str) -> None:
    (tmp_path / "notawheel.txt").write_text("")
    with pytest.raises(environments.RequirementError) as caught:
        environments.parse([text], cwd=str(tmp_path))
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_a_file_that_is_not_a_wheel_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("")
    with pytest.raises(environments.RequirementError, match="not a wheel file"):
        environments.parse(["./data.txt"], cwd=str(tmp_path))
    # A requirement with its url is pip's to fetch, wherever it points.
    assert environments.parse(["demo @ https://example.org/demo-1.0-py3-none-any.whl"]) == (
        "demo @ https://example.org/demo-1.0-py3-none-any.whl",
    )


def test_the_package_installs_its_wheel_offline_with_pip(tmp_path: Path) -> None:
    wheel = tiny_wheel(tmp_path)
    requirements = environments.parse([str(wheel)])
    index, files = environments._contents(types.ApplicationSpec(), requirements, None)  # type: ignore[arg-type]
    package = environments.package("flmunit-env-0123", index, files)
    assert package == environments.package("flmunit-env-0123", index, files)  # reproducible
    src = unpack(package, tmp_path / "src")
    assert not needs_nothing_from_an_index(src)  # a wheel to install: pip, not --no-deps
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-index", "--target", str(tmp_path / "deps"), str(src)],
        capture_output=True,
        text=True,
        env=environment,
    )
    assert done.returncode == 0, done.stderr
    installed = subprocess.run(
        [sys.executable, "-c", "import flmunit; print(flmunit.VERSION)"],
        capture_output=True,
        text=True,
        env={**environment, "PYTHONPATH": str(tmp_path / "deps")},
    )
    assert installed.stdout.strip() == "0.1"


def test_the_package_installs_its_wheel_offline_with_uv_as_flames_executor_manager_does(
    tmp_path: Path,
) -> None:
    uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    if not os.access(uv, os.X_OK):
        pytest.skip("uv is not installed (it comes with the test extra)")
    wheel = tiny_wheel(tmp_path)
    index, files = environments._contents(types.ApplicationSpec(), environments.parse([str(wheel)]), None)  # type: ignore[arg-type]
    src = unpack(environments.package("flmunit-env-4567", index, files), tmp_path / "src")
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))}
    # No index reachable: the executor manager's command, in the unpacked project.
    environment.update(UV_CACHE_DIR=str(tmp_path / "cache"), UV_INDEX_URL="http://127.0.0.1:9/simple")
    command = [uv, "pip", "install", "--link-mode=copy", "--python", sys.executable]
    done = subprocess.run(
        [*command, "--target", str(tmp_path / "deps"), "."],
        cwd=src,
        capture_output=True,
        text=True,
        env=environment,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "deps" / "flmunit" / "__init__.py").read_text() == "VERSION = '0.1'\n"


def test_requirements_met_here_install_offline_on_the_embedded_flame(tmp_path: Path) -> None:
    package = environments.package("env-here", [f"cloudpickle=={codec.CLOUDPICKLE_VERSION}"], {})
    assert needs_nothing_from_an_index(unpack(package, tmp_path))


def test_the_application_is_the_runner_with_the_package_and_the_notebooks_python() -> None:
    base = types.ApplicationSpec(
        command="python3",
        arguments=["-m", "flamepy.runner.runpy"],
        installer="python",
        working_directory="/work",
        environments=[types.Environment(name="FLAME_PYTHON_VERSION", value="3.9")],
    )
    spec = environments.environment_spec(base, "grpc://cache:9090/a/pkg/a-1.tar.gz", ("numpy==2.0",))
    assert (spec.command, list(spec.arguments), spec.working_directory) == (
        "python3",
        ["-m", "flamepy.runner.runpy"],
        "/work",
    )
    assert (spec.url, spec.installer) == ("grpc://cache:9090/a/pkg/a-1.tar.gz", "python")
    variables = {e.name: e.value for e in spec.environments}
    assert variables["FLAME_PYTHON_VERSION"] == codec.PYTHON_VERSION
    assert json.loads(variables[environments.MARKER]) == ["numpy==2.0"]
    assert environments.is_environment(spec) and not environments.is_environment(base)


def test_pips_and_uvs_reasons_are_found(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("$ pip install\n\x1b[31mERROR: No matching distribution found for nope==1\x1b[0m\n")
    reason = f"The application of session 's' could not start: installation failed. See log: {log}"
    assert environments._why(reason) == f"No matching distribution found for nope==1; see {log}"
    log.write_text(
        "  × No solution found when resolving dependencies:\n"
        "  ╰─▶ Because nope was not found in the package registry\n"
    )
    assert environments._why(reason).startswith("Because nope was not found in the package registry")
    # As uv (Flame's installer) writes them, without a terminal.
    log.write_text(
        "error: Request failed after 3 retries in 5.8s\n"
        "  cause: Failed to fetch: http://127.0.0.1:9/simple/nope/\n"
        "  cause: tcp connect error\n"
        "  cause: Connection refused (os error 111)\n"
    )
    assert environments._why(reason) == (
        "Request failed after 3 retries in 5.8s: Failed to fetch: http://127.0.0.1:9/simple/nope/ "
        f"(Connection refused (os error 111)); see {log}"
    )
    # On a cluster the log is on the executor's node: Flame's own words.
    far = (
        "The application of session 's' could not start: Python installation failed. See log: /nowhere/x.log"
    )
    assert environments._why(far) == "Python installation failed. See log: /nowhere/x.log"


class RefusingFlame:
    """Stands for a Flame whose session manager refuses registrations (an administrator's policy)."""

    endpoint = "http://flame.example:8080"

    def __init__(self) -> None:
        self.base = types.Application(
            metadata=types.Metadata(name="flmrun"),
            spec=types.ApplicationSpec(command="python3", arguments=["-m", "flamepy.runner.runpy"]),
        )

    def get_application(self, name: str) -> types.Application | None:
        return self.base if name == "flmrun" else None

    def register_application(self, name: str, spec: types.ApplicationSpec) -> None:
        raise environments.FlameError(f"register application {name!r}: PERMISSION_DENIED: not allowed")


class MemoryCache:
    """Stands for Flame's object cache: keeps objects in a dict."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put(self, key: str, data: bytes) -> ObjectRef:
        self.objects[key] = bytes(data)
        return ObjectRef("grpc://cache.example:9090", key, 1)

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)

    def get(self, key: str) -> Fetched | None:
        data = self.objects.get(key)
        return None if data is None else Fetched(1, memoryview(data), [])  # type: ignore[arg-type]


def test_a_refused_registration_or_no_cache_is_one_line_saying_what_to_do(tmp_path: Path) -> None:
    flame, cache = RefusingFlame(), MemoryCache()
    requirements = environments.parse(["numpy==2.0"])
    with pytest.raises(environments.FlameError) as caught:
        environments.ensure(flame, cache, "flmrun", flame.base, requirements, print)  # type: ignore[arg-type]
    message = str(caught.value)
    assert message.startswith("--pip numpy==2.0: Flame at http://flame.example:8080 refused to register")
    assert "PERMISSION_DENIED: not allowed" in message and "administrator" in message
    assert "\n" not in message and not cache.objects  # the uploaded package is removed again
    with pytest.raises(environments.FlameError, match="none is configured here: set FLAME_CACHE_ENDPOINT"):
        environments.ensure(flame, None, "flmrun", flame.base, requirements, print)  # type: ignore[arg-type]


def test_a_runner_installed_from_a_package_brings_it_into_the_environment() -> None:
    """flame-magic's runner deployed with --url: the environment installs the runner's package too."""
    cache = MemoryCache()
    cache.objects["flame-magic/pkg/runner.tar.gz"] = b"runner package"
    base = types.ApplicationSpec(command="uv", arguments=["run", "python", "-m", "flame_magic_runner"])
    base.url = "grpc://cache.example:9090/flame-magic/pkg/runner.tar.gz"
    index, files = environments._contents(base, ("numpy==2.0",), cache)  # type: ignore[arg-type]
    assert index == ["numpy==2.0"] and files == {"flame-magic": ("runner.tar.gz", b"runner package")}
    base.url = "file:///shared/flame/flame_magic_runner-0.1.tar.gz"
    index, files = environments._contents(base, ("numpy==2.0",), cache)  # type: ignore[arg-type]
    assert index == ["numpy==2.0", "flame-magic @ file:///shared/flame/flame_magic_runner-0.1.tar.gz"]
    # Another application with a package of its own cannot take more packages.
    flame = RefusingFlame()
    other = types.Application(
        metadata=types.Metadata(name="mine"), spec=types.ApplicationSpec(command="python3", url=base.url)
    )
    with pytest.raises(environments.FlameError, match="installs a package of its own"):
        environments.ensure(flame, cache, "mine", other, ("numpy==2.0",), print)  # type: ignore[arg-type]


def test_what_pip_installs_is_not_checked_against_the_notebooks_version(tmp_path: Path) -> None:
    wheel = tiny_wheel(tmp_path, "Own_Lib")
    requirements = environments.parse(["Six==1.16.0", str(wheel)])
    assert environments.names(requirements) == {"six", "own-lib"}
    request = cell.CellRequest()
    for distribution in ("six", "own_lib", "numpy"):
        request.requires.add(module=distribution, distribution=distribution, version="1")
    environments.leave_to_pip(request, requirements)
    assert [r.distribution for r in request.requires] == ["numpy"]
