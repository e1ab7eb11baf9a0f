"""flame-magic's runner as a Flame application: telling it apart, packaging it, registering it.

A Flame cluster starts with ``flmrun``, flamepy's runner (``python -m flamepy.runner.runpy``),
which runs flamepy's own ``RunnerContext`` objects through the object cache: cells run there
with flame-magic's evaluator sent as source (:mod:`flame_magic.stock`). :func:`deploy`
registers flame-magic's runner (``python -m flame_magic_runner``), the faster path, as an
application:

- with ``url`` and ``installer: python``: Flame's executor manager downloads the package
  (a ``file://`` path every executor can read, or ``http(s)://``), ``uv pip install``\\ s it
  and runs the runner with the same Python minor version as the notebook;
- or as a command for a runner already installed on the executors.

``python -m flame_magic.deploy DIRECTORY`` builds the package into a directory and prints an
application manifest for ``flmctl register -f`` (see ``docs/admin.md``).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from flame_magic import codec, wire
from flame_magic.applications import DEFAULT_NAME, RUNNER_MODULE, is_our_runner
from flame_magic.client import FlameClient
from flame_magic.errors import FlameError, RequestError
from flame_magic.protocol import types

PYTHON_VERSION = codec.PYTHON_VERSION
# flame-magic's dependencies that only the notebook side needs stay out of the runner's package.
# (flamepy, packaging, tomli: the embedded Flame's; cloudpickle: pinned instead.)
NOTEBOOK_ONLY = frozenset({"ipykernel", "pyyaml", "cloudpickle", "flamepy", "packaging", "tomli"})
# What the runner imports, when flame-magic's metadata cannot be read (running from a checkout).
RUNNER_REQUIREMENTS = ("ipython", "grpcio", "protobuf", "pyarrow")
SOURCE_SUFFIXES = (".py", ".pyi", ".typed")

# As Flame's own flmrun: uv (shipped in $FLAME_HOME/bin) runs the Python that the python
# installer installed the package for, with the package on PYTHONPATH.
UV_COMMAND = "${FLAME_HOME}/bin/uv"
UV_ARGUMENTS = ("run", "--python", "python${FLAME_PYTHON_VERSION}", "python", "-m", RUNNER_MODULE)


# -- the package ---------------------------------------------------------------------------


def _requirements() -> list[str]:
    """The runner's dependencies, with cloudpickle pinned: pickles travel only between equals."""
    try:
        declared = importlib.metadata.requires("flame-magic") or []
    except importlib.metadata.PackageNotFoundError:
        declared = list(RUNNER_REQUIREMENTS)
    wanted = []
    for requirement in declared:
        match = re.match(r"[A-Za-z0-9_.-]+", requirement)
        if match and "extra ==" not in requirement and match.group(0).lower() not in NOTEBOOK_ONLY:
            wanted.append(requirement)
    return [*wanted, f"cloudpickle=={codec.CLOUDPICKLE_VERSION}"]


def _version() -> str:
    from flame_magic import __version__

    return __version__


def _pyproject() -> str:
    dependencies = "".join(f'    "{r}",\n' for r in _requirements())
    return (
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n\n'
        f'[project]\nname = "flame-magic"\nversion = "{_version()}"\n'
        'description = "flame-magic\'s runner for Flame executors (built by flame_magic.deploy)"\n'
        f'requires-python = "=={PYTHON_VERSION}.*"\ndependencies = [\n{dependencies}]\n\n'
        '[tool.setuptools.packages.find]\ninclude = ["flame_magic*", "flame_magic_runner*"]\n\n'
        '[tool.setuptools.package-data]\n"*" = ["*.pyi", "py.typed"]\n'
    )


def _package_files() -> list[tuple[str, Path]]:
    """(name in the archive, file) for the sources of flame_magic and runner, sorted."""
    import flame_magic
    import flame_magic_runner

    files = []
    for package in (flame_magic, flame_magic_runner):
        root = Path(package.__file__).resolve().parent  # type: ignore[arg-type]
        for path in root.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix in SOURCE_SUFFIXES:
                files.append((f"{package.__name__}/{path.relative_to(root).as_posix()}", path))
    return sorted(files)


def package_bytes() -> tuple[str, bytes]:
    """The runner package: its file name and a .tar.gz with ``pyproject.toml`` at its root.

    Flame's python installer looks for ``pyproject.toml`` at the top of the extracted
    archive, so there is no top directory as in an sdist. The archive is reproducible
    (sorted, fixed times), and its name carries a digest of its content: Flame caches an
    installation by url, so a changed runner must get a new url.
    """
    members = [("pyproject.toml", _pyproject().encode())]
    members += [(name, path.read_bytes()) for name, path in _package_files()]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            archive.addfile(info, io.BytesIO(data))
    digest = hashlib.sha256(raw.getvalue()).hexdigest()[:12]
    compressed = gzip.compress(raw.getvalue(), mtime=0)
    return f"flame_magic_runner-{_version()}-py{PYTHON_VERSION}-{digest}.tar.gz", compressed


def build_package(directory: str | os.PathLike[str]) -> Path:
    """Write the runner package into ``directory`` (kept if already there); return its path."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FlameError(f"Cannot build flame-magic's runner package in {directory}: not a directory.")
    name, data = package_bytes()
    path = directory / name
    if path.exists() and path.read_bytes() == data:
        return path
    # Into place at once: an executor may be reading the directory.
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".flame-magic-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(temporary, 0o644)  # the executors may run as another user
        os.replace(temporary, path)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise FlameError(f"Cannot write flame-magic's runner package to {path}: {exc}") from None
    return path


def package_url(url: str) -> str:
    """The package url to register: ``file://DIR/`` builds the package into DIR first."""
    parts = urlsplit(url)
    if parts.scheme != "file":
        if parts.scheme not in ("http", "https", "grpc", "grpcs"):
            raise FlameError(f"Cannot use package url {url!r}: expected file://, http(s):// or grpc(s)://.")
        return url
    path = Path(unquote(parts.path))
    if not path.is_absolute() or parts.netloc not in ("", "localhost"):
        raise FlameError(f"Cannot use {url!r}: a file:// url needs an absolute path (file:///shared/dir/).")
    if path.is_dir():
        return build_package(path).as_uri()
    if path.is_file():
        return url  # a package built before, by `python -m flame_magic.deploy` or an administrator
    raise FlameError(
        f"{path} does not exist. Give a directory that every executor can read at the same path "
        "(file:///shared/dir/): the package is built into it."
    )


# -- the application -----------------------------------------------------------------------


def runner_spec(
    *, url: str | None = None, python: str | None = None, working_directory: str | None = None
) -> types.ApplicationSpec:
    """The application spec of flame-magic's runner.

    Parameters
    ----------
    url
        Package url for Flame's python installer; None for a runner already installed.
    python
        Without ``url``: the executors' Python that has flame-magic installed
        (default ``python3.X``, this notebook's version).
    working_directory
        Absolute directory the runner starts in (default: one per executor).
    """
    spec = types.ApplicationSpec(
        shim=types.Host,
        description=(
            f"flame-magic's runner: runs %%flmrun notebook cells (flame-magic {_version()}, "
            f"Python {PYTHON_VERSION}, cloudpickle {codec.CLOUDPICKLE_VERSION})"
        ),
        environments=[types.Environment(name="FLAME_PYTHON_VERSION", value=PYTHON_VERSION)],
        delay_release=wire.RELEASE_DELAY,
    )
    if url is not None:
        spec.command = UV_COMMAND
        spec.arguments.extend(UV_ARGUMENTS)
        spec.url = url
        spec.installer = "python"
    else:
        spec.command = python or f"python{PYTHON_VERSION}"
        spec.arguments.extend(["-m", RUNNER_MODULE])
    if working_directory:
        spec.working_directory = working_directory
    return spec


def choose_spec(
    *, url: str | None, installed: bool, python: str | None, embedded: bool
) -> types.ApplicationSpec:
    """The runner's spec from ``%flame deploy``'s options.

    On the embedded Flame (this machine) the runner is the one installed with this kernel.

    Raises
    ------
    RequestError
        For options that do not go together or are missing, with what to write instead.
    """
    if url and installed:
        raise RequestError("Give either --url (Flame installs the package) or --installed, not both.")
    if python and url:
        raise RequestError("--python goes with --installed: with --url, Flame picks Python " + PYTHON_VERSION)
    if url:
        return runner_spec(url=package_url(url))
    if installed or embedded:
        if embedded:
            return runner_spec(python=python or sys.executable, working_directory=os.getcwd())
        return runner_spec(python=python)
    raise RequestError(
        "Say how the executors get flame-magic's runner: `%flame deploy --url file:///shared/dir/` "
        "builds the package into a directory every executor reads at the same path and lets Flame "
        "install it; `%flame deploy --installed [--python PYTHON]` runs a runner installed there."
    )


def executors_here(endpoint: str, embedded: bool) -> bool:
    """Whether the executors of the Flame at ``endpoint`` run on this machine (loopback)."""
    if embedded or endpoint.startswith("unix:"):
        return True
    return urlsplit(endpoint).hostname in ("127.0.0.1", "localhost", "::1")


def check_python(python: str) -> str | None:
    """Why ``python``, on this machine, cannot run flame-magic's runner; None when it can.

    A runner whose Python lacks flame-magic exits before it serves, and Flame 0.6 then
    leaves its executor starting for ever: this is the check to make before registering.
    A name not found on this machine is not judged (the executors may have another PATH).
    """
    found = shutil.which(python)
    if found is None:
        if os.path.isabs(python):
            return f"{python} does not exist on this machine: name the executors' Python with --python PATH."
        return None
    try:
        done = subprocess.run(
            [found, "-c", f"import {RUNNER_MODULE}"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"Cannot run {python} to check that it has flame-magic's runner: {exc}"
    if done.returncode == 0:
        return None
    lines = done.stderr.decode("utf-8", errors="replace").strip().splitlines()
    why = lines[-1] if lines else f"exit code {done.returncode}"
    return (
        f"{python} cannot import flame-magic's runner ({why}): install flame-magic into that Python "
        f"(`{python} -m pip install flame-magic`), or name another one with --python PATH."
    )


def _essentials(spec: types.ApplicationSpec) -> tuple[object, ...]:
    environments = sorted((e.name, e.value) for e in spec.environments)
    fields = (spec.command, list(spec.arguments), spec.url, spec.installer, spec.working_directory)
    return (*fields, environments)


def would_change(client: FlameClient, name: str, spec: types.ApplicationSpec) -> bool:
    """Whether :func:`deploy` of ``spec`` as ``name`` would register or update anything."""
    existing = client.get_application(name)
    return existing is None or _essentials(existing.spec) != _essentials(spec)


@dataclass(frozen=True)
class Deployed:
    """What :func:`deploy` did: ``action`` is "registered", "updated" or "unchanged"."""

    name: str
    action: str
    spec: types.ApplicationSpec


def deploy(client: FlameClient, name: str, spec: types.ApplicationSpec) -> Deployed:
    """Register ``spec`` as application ``name``, or update it if it already runs our runner.

    Raises
    ------
    FlameError
        If ``name`` is taken by another kind of application, or Flame refuses.
    """
    existing = client.get_application(name)
    if existing is None:
        client.register_application(name, spec)
        return Deployed(name, "registered", spec)
    if not is_our_runner(existing.spec):
        raise FlameError(
            f"Flame at {client.endpoint} already has an application {name!r} that is not "
            "flame-magic's runner: choose another name with `%flame deploy --name NAME`."
        )
    if _essentials(existing.spec) == _essentials(spec):
        return Deployed(name, "unchanged", existing.spec)
    # Flame updates only an application without open sessions; say whose they are.
    open_sessions = [
        s.metadata.id
        for s in client.list_sessions()
        if s.spec.application == name and s.status.state == types.Open
    ]
    if open_sessions:
        raise FlameError(
            f"Application {name!r} on Flame at {client.endpoint} runs another version of the runner, "
            f"and Flame updates it only when none of its sessions is open ({', '.join(open_sessions)}): "
            "close them (`flmctl close -s ID`), or deploy under another name (`%flame deploy --name NAME`)."
        )
    client.update_application(name, spec)
    return Deployed(name, "updated", spec)


def manifest(name: str, spec: types.ApplicationSpec) -> str:
    """``spec`` as an application manifest for ``flmctl register -f``."""
    import yaml

    document: dict[str, object] = {
        "shim": "host",
        "description": spec.description,
        "command": spec.command,
        "arguments": list(spec.arguments),
    }
    if spec.HasField("url"):
        document["url"] = spec.url
    if spec.HasField("installer"):
        document["installer"] = spec.installer
    document["environments"] = {e.name: e.value for e in spec.environments}
    document["delay_release"] = spec.delay_release
    return yaml.safe_dump({"metadata": {"name": name}, "spec": document}, sort_keys=False, width=1000)


def main(argv: list[str] | None = None) -> int:
    """``python -m flame_magic.deploy DIRECTORY [--name NAME]``: build the package, print a manifest."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m flame_magic.deploy",
        description="Build flame-magic's runner package into DIRECTORY (which every executor must "
        "read at the same path) and print a Flame application manifest for `flmctl register -f`.",
    )
    parser.add_argument("directory", help="where to write the package, e.g. /shared/flame/packages")
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"application name (default: {DEFAULT_NAME})")
    args = parser.parse_args(argv)
    try:
        path = build_package(Path(args.directory).resolve())
    except FlameError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"# package: {path}", file=sys.stderr)
    sys.stdout.write(manifest(args.name, runner_spec(url=path.as_uri())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
