"""Packages installed for a notebook's runners, the way Flame installs an application's package.

``%%flmrun --pip "pandas==2.2.2"`` (and ``FlameMagics.requirements``) does not install
anything from the notebook into a running runner. It becomes a Flame application of its
own, as flamepy's ``Runner`` makes one for a project:

- a tiny generated Python project (:func:`package`) whose dependencies are the
  requirements, with the local wheels given as paths inside it, is uploaded through Flame's
  object cache (``grpc://HOST:PORT/<app>/pkg/<file>.tar.gz``);
- an application is registered that is the runner application in use (flame-magic's
  runner or Flame's ``flmrun``) plus that ``url`` and ``installer: python``, and with
  ``FLAME_PYTHON_VERSION`` set to the notebook's Python (:func:`environment_spec`);
- Flame's executor manager (or the embedded Flame, :mod:`flame_magic.embedded.installer`)
  downloads the package when a runner of that application starts, installs it with its
  dependencies into the application's own folder (``uv pip install --target``; pip on the
  embedded Flame) and puts that folder first on the runner's ``PYTHONPATH``.

The application is named after a digest of what it holds (``flmrun-env-<digest>``), so the
same requirements on the same runner reuse it: across cells, sessions, kernels and
notebooks, installed once per executor. An installation that fails fails the session's
bind, as any application's; :func:`install_failed` turns that into one line and removes the
application, so that the next try installs anew (Flame remembers a failed url for good).

The generated project builds with a backend of its own (a few lines of the standard
library, in the archive): nothing needs to come from a package index but the
requirements themselves, so local wheels install offline. A wheel's dependencies, like
any requirement, come from the executors' package index (pip's and uv's settings there:
``PIP_INDEX_URL``, ``UV_INDEX_URL``, ``PIP_FIND_LINKS``...).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import secrets
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

from packaging.requirements import InvalidRequirement, Requirement

from flame_magic import codec
from flame_magic.applications import is_our_runner
from flame_magic.cache import CacheClient
from flame_magic.client import FlameClient
from flame_magic.errors import CacheError, FlameError, RequirementError
from flame_magic.modules import canonical
from flame_magic.protocol import cell, types

#: The environment variable that marks an application as one of these (its value: the requirements).
MARKER = "FLAME_MAGIC_REQUIREMENTS"
BACKEND = "_flame_magic_environment"
WHEELS = "_flame_magic_wheels"
# flame-magic's runner package, when the runner application installs it from a url (see deploy).
RUNNER_DISTRIBUTION = "flame-magic"
# Seconds a new runner of an environment may take beyond FlameMagics.start_timeout: Flame
# installs the packages as the runner starts (its own downloads may take 300 s).
INSTALL_SECONDS = 600.0
# How Flame's executor manager (and the embedded Flame) words a bind that failed in the installer.
INSTALL_FAILED = "application installation failed"

_WHEEL = re.compile(r"^(?P<name>[A-Za-z0-9_.]+)-[^-]+(-[^-]+)?-[^-]+-[^-]+-[^-]+\.whl$")


def parse(texts: Iterable[str], cwd: str | None = None) -> tuple[str, ...]:
    """The requirements as they identify an environment: sorted, once each, paths made absolute.

    A requirement is a PEP 508 string (``pandas==2.2.2``, ``numpy>=2; python_version>'3.9'``)
    or the path of a wheel file (``./dist/mylib-0.1-py3-none-any.whl``), which goes with the
    package, and is given here with the digest of its content (``PATH#sha256=...``), so that
    a rebuilt wheel is a new environment.

    Raises
    ------
    RequirementError
        For a pip option, a path that is not a wheel file, or text that is no requirement.
    """
    found = set()
    for text in texts:
        text = text.strip()
        if not text or text.startswith("-"):
            raise RequirementError(
                f"--pip and FlameMagics.requirements take requirements such as 'pandas==2.2.2' or the "
                f"path of a wheel file, not {text!r}; give pip options as PIP_* (or UV_*) variables in "
                "the executors' environment."
            )
        if _is_path(text):
            path = Path(os.path.expanduser(text))
            if not path.is_absolute():
                path = Path(cwd or os.getcwd()) / path
            path = path.resolve()
            if not path.is_file() or _WHEEL.match(path.name) is None:
                raise RequirementError(
                    f"--pip {text}: {'no such file' if not path.exists() else 'not a wheel file'} "
                    f"({path}); give a wheel (`pip wheel --no-deps -w dist DIR` builds one) or a "
                    "requirement such as 'mylib==0.1'."
                )
            found.add(f"{path}#sha256={hashlib.sha256(path.read_bytes()).hexdigest()}")
            continue
        try:
            Requirement(text)
        except InvalidRequirement as exc:
            why = str(exc).splitlines()[0].rstrip(".")
            raise RequirementError(
                f"--pip {text!r} is not a requirement ({why}): write one as pip takes it, e.g. 'pandas>=2'."
            ) from None
        found.add(text)
    return tuple(sorted(found))


def _is_path(text: str) -> bool:
    if re.search(r"@\s*\w+://", text):
        return False  # ``name @ https://...``: a requirement with its url
    return text.endswith(".whl") or text.startswith((".", "~", os.sep)) or os.sep in text


def describe(requirements: Iterable[str]) -> str:
    """``flmtoy==1.0, mylib-0.1-py3-none-any.whl``: the requirements as the user reads them."""
    return ", ".join(Path(r.partition("#sha256=")[0]).name if "#sha256=" in r else r for r in requirements)


def names(requirements: Iterable[str]) -> set[str]:
    """The distributions the requirements name, as pip compares names (``foo-bar``)."""
    found = set()
    for requirement in requirements:
        path, digest, _ = requirement.partition("#sha256=")
        match = _WHEEL.match(Path(path).name) if digest else None
        name = match.group("name") if match else Requirement(requirement).name
        found.add(canonical(name))
    return found


def leave_to_pip(request: cell.CellRequest, requirements: Iterable[str]) -> None:
    """Drop from the cell's package checks those that ``--pip`` installs: their version is the one asked."""
    asked = names(requirements)
    kept = [r for r in request.requires if canonical(r.distribution) not in asked]
    if len(kept) != len(request.requires):
        del request.requires[:]
        request.requires.extend(kept)


# -- the package ---------------------------------------------------------------------------

_BACKEND_SOURCE = '''\
"""The build backend of a flame-magic environment: a wheel of metadata, no code.

Its dependencies are the notebook's requirements, and the wheels beside this file as
direct references (the absolute path is known only here, where the project was unpacked).
"""

import base64
import hashlib
import os
import tarfile
import zipfile
from pathlib import Path

NAME = {name!r}
REQUIREMENTS = {requirements!r}
WHEELS = {wheels!r}  # distribution name -> file in this project
HERE = Path(__file__).resolve().parent
DIST = NAME.replace("-", "_")
INFO = DIST + "-0.dist-info"


def _files():
    requires = list(REQUIREMENTS)
    requires += [name + " @ " + (HERE / path).as_uri() for name, path in sorted(WHEELS.items())]
    metadata = "Metadata-Version: 2.1\\nName: " + NAME + "\\nVersion: 0\\n"
    metadata += "".join("Requires-Dist: " + r + "\\n" for r in requires)
    wheel = "Wheel-Version: 1.0\\nGenerator: flame-magic\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"
    return {{INFO + "/METADATA": metadata.encode(), INFO + "/WHEEL": wheel.encode()}}


def get_requires_for_build_wheel(config_settings=None):
    return []


def get_requires_for_build_sdist(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    for name, data in _files().items():
        path = Path(metadata_directory) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return INFO


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    filename = DIST + "-0-py3-none-any.whl"
    files = _files()
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(name + ",sha256=" + digest + "," + str(len(data)))
    files[INFO + "/RECORD"] = ("\\n".join(record + [INFO + "/RECORD,,"]) + "\\n").encode()
    with zipfile.ZipFile(os.path.join(wheel_directory, filename), "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return filename


def build_sdist(sdist_directory, config_settings=None):
    filename = DIST + "-0.tar.gz"
    with tarfile.open(os.path.join(sdist_directory, filename), "w:gz") as archive:
        for path in sorted(HERE.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                archive.add(path, DIST + "-0/" + path.relative_to(HERE).as_posix())
    return filename
'''


def package(name: str, requirements: list[str], files: dict[str, tuple[str, bytes]]) -> bytes:
    """The generated project for ``requirements``, as a reproducible ``.tar.gz``.

    Parameters
    ----------
    name
        The project's (and distribution's) name.
    requirements
        PEP 508 requirements, resolved by the installer (from its index).
    files
        Distribution name -> (file name, content) of archives that go in the project and
        are its dependencies by direct reference (local wheels; a runner package).
    """
    wheels = {dist: f"{WHEELS}/{filename}" for dist, (filename, _) in files.items()}
    dynamic = bool(wheels)  # their references are made where the project is unpacked
    dependencies = "".join(f"    {json.dumps(r)},\n" for r in requirements)
    project = f'[project]\nname = "{name}"\nversion = "0"\n'
    project += 'dynamic = ["dependencies"]\n' if dynamic else f"dependencies = [\n{dependencies}]\n"
    pyproject = (
        f'[build-system]\nrequires = []\nbuild-backend = "{BACKEND}"\nbackend-path = ["."]\n\n{project}'
    )
    backend = _BACKEND_SOURCE.format(name=name, requirements=list(requirements), wheels=wheels)
    members = [("pyproject.toml", pyproject.encode()), (f"{BACKEND}.py", backend.encode())]
    members += [(path, files[dist][1]) for dist, path in sorted(wheels.items())]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for member, data in members:
            info = tarfile.TarInfo(member)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            archive.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


# -- the application -----------------------------------------------------------------------


def environment_spec(
    base: types.ApplicationSpec, url: str, requirements: tuple[str, ...]
) -> types.ApplicationSpec:
    """``base`` (the runner application) installing the package at ``url``, for this Python."""
    spec = types.ApplicationSpec()
    spec.CopyFrom(base)
    spec.url = url
    spec.installer = "python"
    spec.description = f"{base.description or 'runner'}; with {describe(requirements)} (flame-magic --pip)"
    kept = [e for e in spec.environments if e.name not in ("FLAME_PYTHON_VERSION", MARKER)]
    del spec.environments[:]
    spec.environments.extend(kept)
    spec.environments.add(name="FLAME_PYTHON_VERSION", value=codec.PYTHON_VERSION)
    spec.environments.add(name=MARKER, value=json.dumps([describe([r]) for r in requirements]))
    return spec


def is_environment(spec: types.ApplicationSpec) -> bool:
    """Whether an application is one of these environments (by its marker variable)."""
    return any(e.name == MARKER for e in spec.environments)


def _essentials(spec: types.ApplicationSpec) -> str:
    environments = sorted((e.name, e.value) for e in spec.environments)
    fields = [spec.command, list(spec.arguments), spec.url, spec.installer, spec.working_directory]
    return json.dumps([*fields, environments])


def _contents(
    base: types.ApplicationSpec, requirements: tuple[str, ...], cache: CacheClient
) -> tuple[list[str], dict[str, tuple[str, bytes]]]:
    """What the package holds: requirements for the index, and archives by distribution name."""
    index, files = [], {}
    for requirement in requirements:
        path, _, _ = requirement.partition("#sha256=")
        if "#sha256=" in requirement:
            match = _WHEEL.match(Path(path).name)
            assert match is not None  # checked by parse
            files[match.group("name").replace("_", "-").lower()] = (Path(path).name, Path(path).read_bytes())
        else:
            index.append(requirement)
    if base.HasField("url") and base.url:
        # flame-magic's runner comes from a package of its own: the environment has it too.
        scheme = urlsplit(base.url).scheme.lower()
        if scheme.startswith("grpc"):
            fetched = cache.get(_object_key(base.url))
            if fetched is None or fetched.base is None:
                raise FlameError(f"the runner's package {base.url} is not in Flame's object cache")
            data = b"".join([bytes(fetched.base), *(bytes(p) for _, p in fetched.patches)])
            files[RUNNER_DISTRIBUTION] = (urlsplit(base.url).path.rsplit("/", 1)[-1], data)
        else:
            index.append(f"{RUNNER_DISTRIBUTION} @ {base.url}")
    return index, files


def ensure(
    client: FlameClient,
    cache: CacheClient | None,
    base_name: str,
    base: types.Application,
    requirements: tuple[str, ...],
    notify: Callable[[str], None],
) -> types.Application:
    """The environment application for ``requirements`` over ``base``, registered if need be.

    Raises
    ------
    FlameError
        If there is no object cache to upload the package through, the runner application
        installs a package of its own that is not flame-magic's, or Flame refuses the
        registration; each message in one line, saying what to do.
    """
    what = describe(requirements)
    if base.spec.HasField("url") and base.spec.url and not is_our_runner(base.spec):
        raise FlameError(
            f"--pip {what}: application {base_name!r} installs a package of its own ({base.spec.url}), "
            "which the packages cannot be added to: put them in that package's dependencies, or use "
            "flame-magic's runner or flmrun (`%config FlameMagics.application`)."
        )
    identity = json.dumps([base_name, _essentials(base.spec), list(requirements), codec.PYTHON_VERSION])
    name = f"{base_name}-env-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"
    existing = client.get_application(name)
    if existing is not None and is_environment(existing.spec):
        return existing
    if cache is None:
        raise FlameError(
            f"--pip {what}: Flame installs packages from a package uploaded through its object cache, "
            "and none is configured here: set FLAME_CACHE_ENDPOINT=grpc://HOST:9090 (or `cache:` in the "
            "context in ~/.flame/flame.yaml), or have the packages installed on the executors."
        )
    try:
        index, files = _contents(base.spec, requirements, cache)
        data = package(name, index, files)
        # A fresh url per registration: Flame keeps what became of an installation by url, also a failure.
        key = f"{name}/pkg/{name}-{secrets.token_hex(4)}.tar.gz"
        ref = cache.put(key, data)
    except (CacheError, OSError) as exc:
        raise FlameError(f"--pip {what}: cannot upload the package to Flame's object cache: {exc}") from None
    url = f"{ref.endpoint.rstrip('/')}/{ref.key}"
    spec = environment_spec(base.spec, url, requirements)
    try:
        client.register_application(name, spec)
    except FlameError as exc:
        registered = client.get_application(name)  # another notebook registered it meanwhile
        _delete(cache, ref.key)
        if registered is not None and is_environment(registered.spec):
            return registered
        raise FlameError(
            f"--pip {what}: Flame at {client.endpoint} refused to register application {name!r} "
            f"({str(exc).splitlines()[0]}); ask its administrator to allow it, or have the packages "
            "installed on the executors."
        ) from None
    notify(
        f"--pip {what}: registered application {name!r} ({base_name!r} with these packages); Flame "
        "installs them as its first runner starts (this cell waits for it), and later cells with the "
        "same packages reuse it."
    )
    return types.Application(metadata=types.Metadata(name=name), spec=spec)


def install_failed(
    client: FlameClient, cache: CacheClient | None, application: str, reason: str
) -> str | None:
    """The one line for a session whose runner could not start, when it is an environment that
    Flame could not install (None otherwise).

    The application is unregistered (its package deleted from the cache), so that the next
    cell with the same packages registers and installs it anew.
    """
    if INSTALL_FAILED not in reason:
        return None  # the runner itself did not start: said as for any session
    found = client.get_application(application)
    if found is None or not is_environment(found.spec):
        return None
    wanted = ", ".join(json.loads(next(e.value for e in found.spec.environments if e.name == MARKER)))
    try:
        client.unregister_application(application)
    except FlameError:
        pass  # another notebook's session still uses it: it is replaced when next registered
    if cache is not None and found.spec.url:
        _delete(cache, _object_key(found.spec.url))
    return (
        f"Installing {wanted} for the runners failed ({_why(reason)}): check the names and versions, and "
        "that the executors reach a package index (PIP_INDEX_URL/UV_INDEX_URL there), or give wheel "
        "files (`--pip ./dist/NAME.whl`). Cells without these packages are not affected."
    )


def _why(reason: str) -> str:
    """pip's (or uv's) own reason, from the installation log when it is readable here, else Flame's words."""
    log = re.search(r"See log: (\S+\.log)", reason)
    text = reason
    if log is not None:
        try:
            text += "\n" + Path(log.group(1)).read_text(encoding="utf-8", errors="replace")[-8000:]
        except OSError:
            pass  # the log is on an executor's node
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)  # pip and uv colour what they write
    lines = [line.strip() for line in text.splitlines()]
    for index in reversed(range(len(lines))):
        mark = next((m for m in ("ERROR:", "error:", "╰─▶") if lines[index].startswith(m)), None)
        if mark is None:
            continue
        found = lines[index].removeprefix(mark).strip()
        # uv says why below its error: the first cause, and the last one (the root) if another.
        causes = []
        for line in lines[index + 1 :]:
            if not line.startswith(("cause:", "Caused by:")):
                break
            causes.append(line.split(":", 1)[1].strip())
        if causes:
            found += f": {causes[0]}" + (f" ({causes[-1]})" if len(causes) > 1 else "")
        found = found.rstrip(".")
        return f"{found}; see {log.group(1)}" if log is not None else found
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    return lines[0].split("could not start: ", 1)[-1] if lines else "no reason given"


def _object_key(url: str) -> str:
    """The object key at the end of a ``grpc://HOST:PORT/<app>/<session>/<id>`` url."""
    return "/".join(url.rsplit("/", 3)[1:])


def _delete(cache: CacheClient, key: str) -> None:
    try:
        cache.delete(key)
    except CacheError:
        pass
