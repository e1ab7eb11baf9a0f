"""Cells on Flame's stock ``flmrun`` (flamepy's runner), with nothing deployed.

flamepy's runner (``python -m flamepy.runner.runpy``) loads the session's common data, an
object-cache reference to a pickled ``RunnerContext``, keeps its ``execution_object`` for the
session, and for each task unpickles a ``RunnerRequest(method, args, kwargs)``, calls
``getattr(object, method)(*args)`` on a gRPC worker thread and stores the return value in the
object cache under ``<app>/<session>``, answering with its reference.

flame-magic's execution object is its evaluator, sent as **source**: the pickle calls only
``builtins.eval`` on the text of :mod:`flame_magic_runner.bootstrap` together with the sources
of the modules the evaluator needs (``flame_magic_runner.evaluate``, ``live``, ``fdcapture``,
``stock`` and the notebook-side ``wire``, ``objects``, ``codec``, ``cache``, ``transfer`` and
the generated ``cell`` messages), which it imports under a private package name. Nothing
in it is a code object, so a runner of any Python version loads it; its first task, a probe,
says which version it runs and what it has installed. A runner whose Python differs from the
notebook's cannot load the notebook's functions and classes (cloudpickled code is
minor-version specific): flame-magic then registers once a copy of the application with
``FLAME_PYTHON_VERSION`` set to the notebook's, as flamepy's ``Runner`` does, and refuses
with one line if that does not help.

Each cell is a task ``RunnerRequest("run", (framed CellRequest,))``; the evaluator returns the
framed ``CellResult`` as bytes, which flamepy pickles into the cache; the notebook reads it
(:func:`flame_magic.codec.plain_bytes` refuses anything but plain bytes), checks the header,
and deletes it. Large values, live output and interrupts travel through the cache as on
flame-magic's runner.
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flame_magic import codec
from flame_magic.cache import ObjectRef
from flame_magic.errors import CacheError, FlameError, PythonMismatch
from flame_magic.protocol import types

if TYPE_CHECKING:
    from flame_magic.cache import CacheClient
    from flame_magic.client import FlameClient

# flamepy's marker of a cloudpickled payload in the cache.
CLOUDPICKLE_TAG = b"FLM\x00"
CONTEXT_OBJECT = "runner-context"

NO_CACHE = (
    "Flame's flmrun (flamepy's runner) needs Flame's object cache, and none is configured here: "
    "set FLAME_CACHE_ENDPOINT=grpc://HOST:9090 (or `cache: {endpoint: ...}` in the context in "
    "~/.flame/flame.yaml), or run `%flame deploy` to use flame-magic's runner, which needs none."
)

# What the runner's lack of a package costs a cell (said once per session).
_MISSING_NOTES = {
    "IPython": "values show as their plain repr and display() is not captured",
    "matplotlib_inline": "matplotlib figures do not show inline",
}

_RUNNER_MODULES = (
    "evaluate",
    "values",
    "limits",
    "recording",
    "exceptions",
    "timeout",
    "text",
    "live",
    "fdcapture",
    "stock",
    "environment",
    "modules",
    "debug",
)
_NOTEBOOK_MODULES = (
    "wire",
    "objects",
    "codec",
    "cache",
    "digests",
    "transfer",
    "shm",
    "capture",
    "errors",
    "modules",
    "locator",
)


@dataclass(frozen=True)
class Bundle:
    """The evaluator's sources, ready to travel."""

    root: str
    modules: dict[str, str]
    packages: list[str]
    bootstrap: str


def _source(package: Any, name: str) -> str:
    return (Path(package.__file__).resolve().parent / f"{name}.py").read_text(encoding="utf-8")


@functools.cache
def bundle() -> Bundle:
    """The sources of the evaluator, under a private package named after their digest."""
    import flame_magic
    import flame_magic_runner
    from flame_magic._proto import cell_pb2

    texts = {f"flame_magic.{name}": _source(flame_magic, name) for name in _NOTEBOOK_MODULES}
    texts.update(
        {f"flame_magic_runner.{name}": _source(flame_magic_runner, name) for name in _RUNNER_MODULES}
    )
    texts["flame_magic._proto.cell_pb2"] = Path(cell_pb2.__file__).read_text(encoding="utf-8")
    digest = hashlib.sha256(json.dumps(texts, sort_keys=True).encode()).hexdigest()[:12]
    root = f"_flame_magic_{digest}"
    imports = re.compile(r"^(\s*)(from|import)\s+(flame_magic_runner|flame_magic)\b", re.MULTILINE)
    modules = {name: imports.sub(rf"\1\2 {root}.\3", text) for name, text in texts.items()}
    modules["flame_magic._proto.cell_pb2"] = _portable_messages(modules["flame_magic._proto.cell_pb2"], root)
    # The runner halves of two notebook modules that also hold gRPC stubs and clients.
    modules["flame_magic.protocol"] = f"from {root}.flame_magic._proto import cell_pb2 as cell\n"
    modules["flame_magic.client"] = "class FlameError(Exception):\n    pass\n"
    packages = ["", "flame_magic", "flame_magic._proto", "flame_magic_runner"]
    for package in packages:
        modules.setdefault(package, "")
    full = {(f"{root}.{name}" if name else root): text for name, text in modules.items()}
    return Bundle(
        root=root,
        modules=full,
        packages=[f"{root}.{name}" if name else root for name in packages],
        bootstrap=_source(flame_magic_runner, "bootstrap"),
    )


def _portable_messages(text: str, root: str) -> str:
    """The generated messages, loadable by the runner's protobuf (flamepy needs only 6.31).

    The serialized descriptor and the builder calls work on any protobuf since 3.20; only
    the generated code's guard against an older runtime is removed. The messages go into a
    pool of their own, so that a flame-magic installed on the runner cannot clash with them.
    """
    text = re.sub(
        r"^from google\.protobuf import runtime_version as _runtime_version\n", "", text, flags=re.M
    )
    text = re.sub(r"^_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)\n", "", text, flags=re.M)
    text = text.replace("_descriptor_pool.Default()", "_descriptor_pool.DescriptorPool()")
    return text.replace("'flame_magic._proto.cell_pb2'", f"'{root}.flame_magic._proto.cell_pb2'")


class _Evaluator:
    """The execution object as it travels: its pickle builds the evaluator on the runner from source.

    flamepy sees a callable, so it treats the service as stateless (it would otherwise pickle
    the object back into the cache after every task); tasks call its methods by name.
    """

    EXPRESSION = (
        "exec(compile(BOOTSTRAP, '<flame-magic bootstrap>', 'exec')) or "
        "FlameMagicEvaluator(ROOT, MODULES, PACKAGES)"
    )

    def __init__(self, source: Bundle) -> None:
        self.source = source

    def __reduce__(self) -> tuple[Any, ...]:
        source = self.source
        scope = {
            "BOOTSTRAP": source.bootstrap,
            "ROOT": source.root,
            "MODULES": source.modules,
            "PACKAGES": source.packages,
        }
        return (builtins.eval, (self.EXPRESSION, scope))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("flame-magic's evaluator runs on Flame's flmrun, not here")


def runner_context() -> bytes:
    """The pickled ``RunnerContext`` holding the evaluator, as flamepy's runner loads it."""
    state = {
        "execution_object": _Evaluator(bundle()),
        "stateful": False,
        "autoscale": True,
        "warmup": 0,
        "min_instances": 0,
        "max_instances": None,
    }
    return codec.flamepy_object("RunnerContext", state)


def runner_request(method: str, data: bytes | None = None) -> bytes:
    """The pickled ``RunnerRequest`` of a task calling the evaluator's ``method``."""
    args = None if data is None else (data,)
    return codec.flamepy_object("RunnerRequest", {"method": method, "args": args, "kwargs": None})


@dataclass
class Report:
    """What the probe said about a runner."""

    python: str
    python_full: str
    host: str
    versions: dict[str, str]
    missing: list[str]
    load_error: str

    @classmethod
    def parse(cls, data: bytes) -> Report:
        try:
            found = json.loads(data.decode("utf-8"))
            return cls(
                python=str(found["python"]),
                python_full=str(found.get("python_full", found["python"])),
                host=str(found.get("host", "")),
                versions={str(k): str(v) for k, v in dict(found.get("versions", {})).items()},
                missing=[str(name) for name in found.get("missing", [])],
                load_error=str(found.get("load_error", "")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FlameError(f"Flame's flmrun answered the probe with something else: {exc}") from None


class StockRunner:
    """Flame's ``flmrun``: flamepy's runner, running flame-magic's evaluator sent as source."""

    path = "Flame's flmrun (flamepy's runner)"
    same_cloudpickle = False

    def __init__(self, cache: CacheClient) -> None:
        self.cache = cache
        self.reports: dict[str, Report] = {}  # by session id

    @classmethod
    def for_cache(cls, cache: CacheClient | None) -> StockRunner:
        if cache is None:
            raise FlameError(NO_CACHE)
        return cls(cache)

    def common_data(self, application: str, session_id: str) -> bytes:
        # flamepy's runner unpickles the cache object to bytes, then those bytes to the context.
        data = CLOUDPICKLE_TAG + pickle.dumps(runner_context(), protocol=3)
        try:
            ref = self.cache.put(f"{application}/{session_id}/{CONTEXT_OBJECT}", data)
        except CacheError as exc:
            raise FlameError(f"Cannot store flame-magic's evaluator in Flame's object cache: {exc}") from None
        return ref.encode()

    def started(self, client: FlameClient, application: str, session_id: str) -> list[str]:
        task = client.create_task(session_id, runner_request("probe"))
        task = client.wait_task(session_id, task.metadata.id)
        data = self.output(task)
        if data is None:
            from flame_magic.client import failure_message

            raise FlameError(
                f"Flame's flmrun ({application!r}) could not start flame-magic's evaluator: "
                f"{failure_message(task) or 'no message'}."
            )
        report = Report.parse(data)
        self.reports[session_id] = report
        where = f"Flame's {application!r} runs Python {report.python_full}"
        if report.python != codec.PYTHON_VERSION:
            raise PythonMismatch(
                f"{where} and this notebook Python {codec.PYTHON_VERSION}: the notebook's functions "
                "and classes load only under the same minor version. Use a kernel with Python "
                f"{report.python}, or have the cluster's administrator make Python "
                f"{codec.PYTHON_VERSION} available to Flame's runners.",
                report.python,
            )
        if report.load_error:
            raise FlameError(
                f"{where} but cannot load flame-magic's evaluator there ({report.load_error}); "
                "flamepy's dependencies should be enough: check the runner's protobuf and pyarrow, "
                "or run `%flame deploy` to use flame-magic's runner."
            )
        notes = [_MISSING_NOTES[name] for name in report.missing if name in _MISSING_NOTES]
        if "IPython" in report.missing:
            notes = notes[:1]  # without IPython neither display nor inline figures exist
        said = []
        if notes:
            lacking = [name for name in ("IPython", "matplotlib_inline") if name in report.missing]
            said.append(f"Flame's flmrun lacks {' and '.join(lacking)}: {'; '.join(notes)}.")
        theirs = report.versions.get("cloudpickle", "")
        if theirs and theirs != codec.CLOUDPICKLE_VERSION:
            said.append(
                f"Flame's flmrun has cloudpickle {theirs}, this notebook {codec.CLOUDPICKLE_VERSION}: "
                "values pickled by value (functions, classes) may not load there."
            )
        return said

    def task_input(self, data: bytes) -> bytes:
        return runner_request("run", codec.frame(data))

    def cell_result(self, task: types.Task) -> bytes | None:
        data = self.output(task)
        return None if data is None else codec.unframe(data, "Flame's flmrun")

    def output(self, task: types.Task) -> bytes | None:
        """What the evaluator returned for a finished task (read from the cache, then deleted there)."""
        if not (task.spec.HasField("output") and task.spec.output):
            return None
        try:
            ref = ObjectRef.decode(task.spec.output)
            stored = bytes(self.cache.read(ref))
        except CacheError as exc:
            raise FlameError(f"Cannot fetch the cell's result from Flame's object cache: {exc}") from None
        try:
            self.cache.delete(ref.key)
        except CacheError:
            pass  # deleted with the session's objects when it closes
        if not stored.startswith(CLOUDPICKLE_TAG):
            raise codec.PayloadError("Flame's flmrun stored a result that is not a pickle")
        return codec.plain_bytes(stored[len(CLOUDPICKLE_TAG) :])


def python_copy_spec(template: types.ApplicationSpec) -> types.ApplicationSpec:
    """``template`` (Flame's flmrun) with ``FLAME_PYTHON_VERSION`` set to the notebook's Python."""
    spec = types.ApplicationSpec()
    spec.CopyFrom(template)
    kept = [e for e in spec.environments if e.name != "FLAME_PYTHON_VERSION"]
    del spec.environments[:]
    spec.environments.extend(kept)
    spec.environments.add(name="FLAME_PYTHON_VERSION", value=codec.PYTHON_VERSION)
    return spec


def python_copy_name(application: str) -> str:
    """The name of the copy of ``application`` for this notebook's Python, e.g. ``flmrun-py3-11``."""
    return f"{application}-py{codec.PYTHON_VERSION.replace('.', '-')}"


def ensure_python_copy(client: FlameClient, application: str, template: types.ApplicationSpec) -> bool:
    """Register the copy of ``application`` for this notebook's Python, unless it exists.

    Returns whether it was registered now.
    """
    name = python_copy_name(application)
    existing = client.get_application(name)
    wanted = python_copy_spec(template)
    if existing is not None:
        environments = {e.name: e.value for e in existing.spec.environments}
        if environments.get("FLAME_PYTHON_VERSION") == codec.PYTHON_VERSION:
            return False
        raise FlameError(
            f"Flame at {client.endpoint} has an application {name!r} that is not flmrun for Python "
            f"{codec.PYTHON_VERSION}: remove it, or choose an application with "
            "`%config FlameMagics.application = 'NAME'`."
        )
    client.register_application(name, wanted)
    return True
