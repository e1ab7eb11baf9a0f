"""The runner's application spec, package and manifest, and how applications are told apart."""

from __future__ import annotations

import io
import tarfile
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from flame_magic import applications, codec, deploy, protocol
from flame_magic.client import FlameError

types = protocol.types
REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_SPEC = REPO_ROOT / "deploy" / "flame-magic-runner.yaml"
UV_RUN = ["run", "--python", "python${FLAME_PYTHON_VERSION}", "python"]  # as Flame's flmrun

# The fields of an application manifest as flmctl 0.6 reads it (flmctl/src/apis.rs).
MANIFEST_SPEC_FIELDS = {
    "shim",
    "image",
    "description",
    "labels",
    "command",
    "arguments",
    "environments",
    "working_directory",
    "max_instances",
    "delay_release",
    "schema",
    "url",
    "installer",
}


def members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}  # type: ignore[union-attr]


def test_package_has_pyproject_at_its_root_and_pins_what_pickles_need() -> None:
    name, data = deploy.package_bytes()
    files = members(data)
    # Flame's python installer looks for pyproject.toml at the top of the extracted archive.
    assert "pyproject.toml" in files
    expected = {"flame_magic/codec.py", "flame_magic_runner/__main__.py", "flame_magic/_proto/cell_pb2.py"}
    assert expected <= set(files)
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc") or f.startswith("tests/")]
    pyproject = files["pyproject.toml"].decode()
    assert f'"cloudpickle=={codec.CLOUDPICKLE_VERSION}"' in pyproject
    assert f'requires-python = "=={codec.PYTHON_VERSION}.*"' in pyproject
    assert "ipykernel" not in pyproject and "pyyaml" not in pyproject  # notebook-side only
    assert name.startswith(
        f"flame_magic_runner-{version('flame-magic')}-py{codec.PYTHON_VERSION}-"
    ) and name.endswith(".tar.gz")
    assert deploy.package_bytes() == (name, data)  # reproducible: same name for the same runner


def test_build_package_writes_once_and_readable_by_executors(tmp_path: Path) -> None:
    first = deploy.build_package(tmp_path)
    assert first.stat().st_mode & 0o777 == 0o644
    mtime = first.stat().st_mtime_ns
    assert deploy.build_package(tmp_path) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]
    assert deploy.package_url(tmp_path.as_uri() + "/") == first.as_uri()
    assert deploy.package_url(first.as_uri()) == first.as_uri()  # a package built before
    assert deploy.package_url("https://example.org/r.tar.gz") == "https://example.org/r.tar.gz"
    with pytest.raises(FlameError, match="does not exist"):
        deploy.package_url((tmp_path / "missing").as_uri())
    with pytest.raises(FlameError, match="absolute path"):
        deploy.package_url("file://relative/dir")


def test_runner_spec_with_url_runs_as_flames_own_flmrun() -> None:
    spec = deploy.runner_spec(url="file:///shared/r.tar.gz")
    assert spec.command == "${FLAME_HOME}/bin/uv"
    assert list(spec.arguments) == [
        "run",
        "--python",
        "python${FLAME_PYTHON_VERSION}",
        "python",
        "-m",
        "flame_magic_runner",
    ]
    assert (spec.url, spec.installer) == ("file:///shared/r.tar.gz", "python")
    assert [(e.name, e.value) for e in spec.environments] == [("FLAME_PYTHON_VERSION", codec.PYTHON_VERSION)]
    assert applications.is_our_runner(spec) and not applications.is_stock_runner(spec)
    installed = deploy.runner_spec(python="/opt/venv/bin/python")
    expected = ("/opt/venv/bin/python", ["-m", "flame_magic_runner"])
    assert (installed.command, list(installed.arguments)) == expected
    assert not installed.HasField("url") and not installed.HasField("installer")


def test_choose_spec_says_what_to_write() -> None:
    with pytest.raises(ValueError, match="--url file:///shared/dir/"):
        deploy.choose_spec(url=None, installed=False, python=None, embedded=False)
    with pytest.raises(ValueError, match="not both"):
        deploy.choose_spec(url="file:///x/", installed=True, python=None, embedded=False)
    assert deploy.choose_spec(url=None, installed=True, python=None, embedded=False).command == (
        f"python{codec.PYTHON_VERSION}"
    )


def _application(name: str, spec: protocol.types.ApplicationSpec, state: int = types.Enabled) -> object:
    return types.Application(
        metadata=types.Metadata(id=name, name=name), spec=spec, status=types.ApplicationStatus(state=state)
    )


def test_applications_are_told_apart() -> None:
    stock = types.ApplicationSpec(
        command="${FLAME_HOME}/bin/uv",
        arguments=[
            "run",
            "--python",
            "python${FLAME_PYTHON_VERSION}",
            "python",
            "-m",
            "flamepy.runner.runpy",
        ],
    )
    assert applications.is_stock_runner(stock) and not applications.is_our_runner(stock)
    assert applications.is_our_runner(types.ApplicationSpec(command="/usr/bin/flame-magic-runner"))
    assert "flamepy's runner" in applications.describe(_application("flmrun", stock))  # type: ignore[arg-type]
    ours = deploy.runner_spec()
    assert (
        applications.describe(_application("fm", ours, types.Disabled))
        == "fm (disabled, flame-magic's runner)"
    )  # type: ignore[arg-type]
    assert applications.check_application(_application("fm", ours), "fm", "e") is None  # type: ignore[arg-type]
    assert "%flame deploy" in (applications.check_application(None, "fm", "e") or "")


def check_manifest(document: dict) -> protocol.types.ApplicationSpec:
    """Check a manifest against flmctl's format; return the spec it describes."""
    assert set(document) == {"metadata", "spec"} and set(document["metadata"]) == {"name"}
    assert set(document["spec"]) <= MANIFEST_SPEC_FIELDS
    spec = document["spec"]
    assert spec.get("shim", "host") in ("host", "Host")
    return types.ApplicationSpec(
        shim=types.Host,
        command=spec["command"],
        arguments=spec["arguments"],
        url=spec.get("url"),
        installer=spec.get("installer"),
        environments=[types.Environment(name=k, value=v) for k, v in spec.get("environments", {}).items()],
        delay_release=spec.get("delay_release"),
    )


def test_shipped_application_spec_is_what_deploy_registers() -> None:
    document = yaml.safe_load(SHIPPED_SPEC.read_text())
    shipped = check_manifest(document)
    assert document["metadata"]["name"] == applications.DEFAULT_NAME
    expected = deploy.runner_spec(url=shipped.url)
    for field in ("command", "arguments", "installer", "delay_release"):
        assert getattr(shipped, field) == getattr(expected, field), field
    # The administrator sets the notebooks' Python version there.
    assert [e.name for e in shipped.environments] == [e.name for e in expected.environments]


def test_manifest_round_trips_through_flmctls_format() -> None:
    spec = deploy.runner_spec(url="file:///shared/r.tar.gz")
    document = yaml.safe_load(deploy.manifest("fm", spec))
    assert document["metadata"]["name"] == "fm"
    assert deploy._essentials(check_manifest(document)) == deploy._essentials(spec)
