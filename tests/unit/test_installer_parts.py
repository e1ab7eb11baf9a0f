"""Pure parts of the embedded Flame's application installer: when it can install offline,
what it unpacks, which cache object a url names."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from flame_magic.embedded.installer import InstallError, _cache_object, _unpack, needs_nothing_from_an_index


def project(tmp_path: Path, body: str) -> Path:
    (tmp_path / "pyproject.toml").write_text(body)
    return tmp_path


BUILD = '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'


@pytest.mark.parametrize(
    ("body", "offline"),
    [
        (BUILD + '[project]\nname = "a"\nversion = "1"\ndependencies = []\n', True),
        (
            BUILD + '[project]\nname = "a"\nversion = "1"\ndependencies = ["cloudpickle>=1", "pyarrow"]\n',
            True,
        ),
        # A marker that does not apply here needs nothing.
        (
            BUILD
            + '[project]\nname = "a"\nversion = "1"\ndependencies = ["nope-x; python_version < \'3\'"]\n',
            True,
        ),
        (
            BUILD + '[project]\nname = "a"\nversion = "1"\ndependencies = ["flame-magic-no-such-dist"]\n',
            False,
        ),
        (BUILD + '[project]\nname = "a"\nversion = "1"\ndependencies = ["cloudpickle<1"]\n', False),
        (BUILD + '[project]\nname = "a"\ndynamic = ["dependencies", "version"]\n', False),
        (
            '[build-system]\nbuild-backend = "no_such_backend.api"\n[project]\nname = "a"\nversion = "1"\n',
            False,
        ),
        ("not toml [", False),
    ],
)
def test_offline_only_when_everything_it_needs_is_installed(tmp_path: Path, body: str, offline: bool) -> None:
    assert needs_nothing_from_an_index(project(tmp_path, body)) is offline


def test_a_setup_py_project_is_installed_with_pip(tmp_path: Path) -> None:
    (tmp_path / "setup.py").write_text("from setuptools import setup\nsetup()\n")
    assert needs_nothing_from_an_index(tmp_path) is False


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_unpack_needs_a_python_project_and_stays_inside(tmp_path: Path) -> None:
    good = _tar(tmp_path / "good.tar.gz", {"pyproject.toml": b"[project]\n", "pkg/__init__.py": b""})
    _unpack(good, tmp_path / "good")
    assert (tmp_path / "good" / "pkg" / "__init__.py").is_file()

    plain = _tar(tmp_path / "plain.tar.gz", {"README": b"hi"})
    with pytest.raises(InstallError, match="No Python package found"):
        _unpack(plain, tmp_path / "plain")

    evil = _tar(tmp_path / "evil.tar.gz", {"../escaped.txt": b"x", "pyproject.toml": b""})
    with pytest.raises(InstallError):
        _unpack(evil, tmp_path / "evil")
    assert not (tmp_path / "escaped.txt").exists()


def test_cache_urls_name_their_object() -> None:
    own = "grpc+unix:///tmp/state/cache.sock"
    assert _cache_object(f"{own}/app/pkg/app.tar.gz", own) == (own, "app/pkg/app.tar.gz")
    assert _cache_object("grpc://cache.lab:9090/app/pkg/app.tar.gz", own) == (
        "grpc://cache.lab:9090",
        "app/pkg/app.tar.gz",
    )
    with pytest.raises(InstallError, match="no cache address"):
        _cache_object("grpc:///app/pkg/x.tar.gz", own)
