"""Installing applications with a ``url`` for the embedded Flame, as Flame's executor manager does.

An application with ``installer: python`` and a ``url`` (``file://``, ``http(s)://``, or
``grpc://``/``grpcs://`` = an object of the object cache, as flamepy's ``Runner`` uploads
its package) gets its archive (``.tar.gz``, ``.tgz`` or ``.zip`` holding a Python project)
downloaded and unpacked into ``<state>/apps/<name>-<digest>/src`` and installed with pip
into ``.../deps``, once per application, url and Python version. Its processes then get
``PYTHONPATH=deps:src:...`` on top of the notebook's environment, which stays underneath:
when everything the project depends on is installed there already, pip runs offline
(``--no-index --no-deps --no-build-isolation``); otherwise pip installs it with its
dependencies from the package index. ``installer: python`` without a url installs nothing
and only sets ``FLAME_PYTHON_VERSION``, as Flame does.

A failed installation is remembered, as on Flame: every later bind of that application
fails at once with the same message, until the application is registered anew.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from flame_magic import protocol

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)

PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
DOWNLOAD_TIMEOUT = 300.0  # seconds for an http(s) download
_ARCHIVES = (".tar.gz", ".tgz", ".zip")
PATH_VARIABLES = ("PYTHONPATH", "PATH")  # what an installation puts in front, not in place


class InstallError(Exception):
    """The application could not be installed; the message says why (and where the log is)."""


class Installer:
    """Installs applications into private environments under ``<state_dir>/apps``.

    Parameters
    ----------
    state_dir
        The embedded Flame's private state directory.
    """

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "apps"
        self.logs = state_dir / "logs" / "install"
        self._done: dict[tuple[str, str, str], dict[str, str] | InstallError] = {}
        self._locks: dict[tuple[str, str, str], asyncio.Lock] = {}

    async def install(
        self,
        name: str,
        spec: protocol.types.ApplicationSpec,
        cache_endpoint: str | None = None,
        cache_storage: str | None = None,
    ) -> dict[str, str]:
        """The variables the application's processes get, installing it first if needed.

        ``cache_endpoint`` and ``cache_storage`` are this Flame's object cache, for
        ``grpc://`` urls that name it (its Unix socket has no host to put in a url).

        Returns
        -------
        dict
            ``PYTHONPATH`` (and ``PATH``) to put in front of the process's own, and
            ``FLAME_PYTHON_VERSION``; empty for an application without an installer.

        Raises
        ------
        InstallError
            When the installation fails (now or at an earlier try).
        """
        if not spec.HasField("installer") or not spec.installer:
            return {}
        if spec.installer != "python":
            raise InstallError(
                f"installer <{spec.installer}> of application <{name}> is not supported by the "
                "embedded Flame (only python)"
            )
        if not spec.HasField("url") or not spec.url:
            return {"FLAME_PYTHON_VERSION": PYTHON_VERSION}
        key = (name, spec.url, PYTHON_VERSION)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:  # instances binding at once wait for one installation
            done = self._done.get(key)
            if done is None:
                try:
                    done = await self._install(name, spec.url, key, (cache_endpoint, cache_storage))
                except InstallError as err:
                    done = err
                except Exception as err:  # whatever broke, the bind must fail with why
                    log.exception("installing application %s failed", name)
                    done = InstallError(f"installing application <{name}> failed: {err!r}")
                self._done[key] = done
        if isinstance(done, InstallError):
            raise done
        return dict(done)

    def forget(self, name: str) -> None:
        """Drop what is remembered of ``name`` (it was unregistered or updated)."""
        for key in [k for k in self._done if k[0] == name]:
            del self._done[key]

    async def _install(
        self, name: str, url: str, key: tuple[str, str, str], cache: tuple[str | None, str | None]
    ) -> dict[str, str]:
        digest = hashlib.sha256("\0".join(key).encode()).hexdigest()[:16]
        home = self.root / f"{name}-{digest}"
        src, deps = home / "src", home / "deps"
        self.logs.mkdir(mode=0o700, parents=True, exist_ok=True)
        log_path = self.logs / f"{name}.log"
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(mode=0o700, parents=True)
        archive = await asyncio.to_thread(_download, url, home / "download", *cache)
        await asyncio.to_thread(_unpack, archive, src)
        offline = needs_nothing_from_an_index(src)
        argv = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
        if offline:
            argv += ["--no-index", "--no-deps", "--no-build-isolation"]
        argv += ["--target", str(deps), str(src)]
        log.info("installing application %s from %s (%s)", name, url, "offline" if offline else "with pip")
        with open(log_path, "ab") as logf:
            logf.write(f"$ {' '.join(argv)}\n".encode())
            logf.flush()
            process = await asyncio.create_subprocess_exec(
                *argv,
                cwd=src,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=logf,
                stderr=asyncio.subprocess.STDOUT,
            )
            code = await process.wait()
        if code != 0:
            raise InstallError(
                f"Python installation failed for app <{name}> (pip exit code {code}). "
                f"See log: {log_path}\n{_tail(log_path)}"
            )
        variables = {
            "PYTHONPATH": os.pathsep.join([str(deps), str(src)]),
            "FLAME_PYTHON_VERSION": PYTHON_VERSION,
        }
        if (deps / "bin").is_dir():
            variables["PATH"] = str(deps / "bin")
        return variables


def _download(url: str, directory: Path, cache_endpoint: str | None, cache_storage: str | None) -> Path:
    """The archive behind ``url``, in ``directory`` (a local file is used where it is)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    filename = unquote(parts.path.rsplit("/", 1)[-1]) or "package.tar.gz"
    if not filename.endswith(_ARCHIVES):
        raise InstallError(f"unsupported archive format: {filename} (expected .tar.gz, .tgz or .zip)")
    if scheme == "file":
        path = Path(unquote(parts.path))
        if not path.is_file():
            raise InstallError(f"package {url} not found: no file {path}")
        return path
    target = directory / filename
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as answer, open(target, "wb") as out:
                shutil.copyfileobj(answer, out, 1 << 20)
        except OSError as err:
            raise InstallError(f"failed to download {url}: {err}") from None
        return target
    if scheme.startswith("grpc"):
        endpoint, key = _cache_object(url, cache_endpoint)
        from flame_magic.cache import CacheClient, CacheError

        storage = cache_storage if endpoint == cache_endpoint else None
        client = CacheClient(endpoint, storage=storage)
        try:
            fetched = client.get(key)
        except CacheError as err:
            raise InstallError(f"failed to download {url} from the object cache: {err}") from None
        finally:
            client.close()
        if fetched is None or fetched.base is None:
            raise InstallError(f"the object cache sent no data for {url}")
        with open(target, "wb") as out:
            out.write(memoryview(fetched.base))
            for _, patch in fetched.patches:
                out.write(memoryview(patch))
        return target
    raise InstallError(f"unsupported url scheme in {url}: use file://, http(s):// or grpc(s)://")


def _cache_object(url: str, own: str | None) -> tuple[str, str]:
    """The cache endpoint and object key a ``grpc(s)://HOST:PORT/<key>`` url names."""
    if own and url.startswith(own.rstrip("/") + "/"):
        return own, url[len(own.rstrip("/")) + 1 :]
    parts = urlsplit(url)
    if not parts.netloc:
        raise InstallError(f"no cache address in {url}: expected grpc://HOST:PORT/<app>/<session>/<id>")
    return f"{parts.scheme}://{parts.netloc}", unquote(parts.path).lstrip("/")


def needs_nothing_from_an_index(src: Path) -> bool:
    """Whether the project in ``src`` installs offline over this Python's packages.

    True when its ``pyproject.toml`` declares its dependencies (not ``dynamic``), each is
    installed here in a version it accepts, and its build backend is importable here (or
    comes with the project, and what it requires is installed here).
    """
    try:
        with open(src / "pyproject.toml", "rb") as fh:
            pyproject: dict[str, Any] = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError):
        return False  # setup.py projects do not say what they need without running them
    project = pyproject.get("project")
    if not isinstance(project, dict) or "dependencies" in project.get("dynamic", []):
        return False
    build = pyproject.get("build-system", {})
    backend = str(build.get("build-backend", "setuptools.build_meta"))
    if build.get("backend-path"):  # the project brings its backend (a --pip environment does)
        if not all(_installed(requirement) for requirement in build.get("requires", [])):
            return False
    elif importlib.util.find_spec(backend.split(".", 1)[0].split(":", 1)[0]) is None:
        return False
    return all(_installed(requirement) for requirement in project.get("dependencies", []))


def _installed(text: str) -> bool:
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        requirement = Requirement(text)
    except InvalidRequirement:
        return False
    if requirement.marker is not None and not requirement.marker.evaluate():
        return True
    try:
        version = importlib.metadata.version(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return requirement.specifier.contains(version, prereleases=True)


def _unpack(archive: Path, destination: Path) -> None:
    """Unpack a .tar.gz/.tgz/.zip archive, refusing members that would land outside it."""
    destination.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(destination)  # zipfile drops absolute and ".." parts itself
        else:
            with tarfile.open(archive, "r:gz") as tf:
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(destination, filter="data")
                else:  # pragma: no cover - Pythons without extraction filters
                    for member in tf.getmembers():
                        target = (destination / member.name).resolve()
                        if (
                            not target.is_relative_to(destination.resolve())
                            or member.issym()
                            or member.islnk()
                        ):
                            raise InstallError(f"refusing archive member {member.name!r} of {archive.name}")
                    tf.extractall(destination)
    except (OSError, tarfile.TarError, zipfile.BadZipFile) as err:
        raise InstallError(f"failed to extract {archive.name}: {err}") from None
    if not any((destination / name).exists() for name in ("pyproject.toml", "setup.py", "setup.cfg")):
        raise InstallError(
            f"No Python package found in {archive.name} (missing pyproject.toml, setup.py, or setup.cfg)"
        )


def _tail(path: Path, limit: int = 2000) -> str:
    with contextlib.suppress(OSError), open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - limit))
        return fh.read().decode("utf-8", "replace").strip()
    return ""
