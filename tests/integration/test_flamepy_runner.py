"""The embedded Flame as Flame 0.6, with flamepy 0.6.0 as the peer: its Runner, url applications,
batch sessions, native Arrow tables in the object cache, and Flame's default applications.

flamepy runs in its own processes (its protobuf modules and ours cannot load in one), as a
user's script would, against a standalone embedded Flame on TCP loopback with its object cache.
The embedded Flame is started with a package index that cannot be reached, so an application
it installs must have been installed offline.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from flame_magic import protocol
from flame_magic.embedded import EmbeddedFlame

types = protocol.types
fe = protocol.frontend

REPO_ROOT = Path(__file__).resolve().parents[2]
NO_INDEX = "http://127.0.0.1:9/simple"  # nothing listens on port 9 (discard): pip cannot reach it


@pytest.fixture(scope="module")
def flame(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedFlame]:
    saved = {name: os.environ.get(name) for name in ("PIP_INDEX_URL", "PIP_RETRIES", "PIP_TIMEOUT")}
    os.environ.update(PIP_INDEX_URL=NO_INDEX, PIP_RETRIES="0", PIP_TIMEOUT="5")
    try:
        workdir = tmp_path_factory.mktemp("flame06-cwd")
        with EmbeddedFlame.start(working_directory=str(workdir), listen="http://127.0.0.1:0") as started:
            yield started
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def stub(flame: EmbeddedFlame) -> Iterator[protocol.FrontendStub]:
    with grpc.insecure_channel(flame.endpoint.removeprefix("http://")) as channel:
        yield protocol.FrontendStub(channel)


def run_flamepy(
    flame: EmbeddedFlame, cwd: Path, script: str, *args: str, storage: bool = True
) -> dict[str, Any]:
    """Run a flamepy script in ``cwd`` (flamepy's Runner packages it) and return its last JSON line.

    ``storage``: give flamepy the cache's shared storage directory, as the embedded Flame
    gives its processes; without it, flamepy streams every object through Flight.
    """
    path = cwd / "main.py"
    path.write_text(textwrap.dedent(script))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["FLAME_ENDPOINT"] = flame.endpoint
    assert flame.cache_endpoint and flame.cache_storage
    env["FLAME_CACHE_ENDPOINT"] = flame.cache_endpoint
    env.pop("FLAME_CACHE_STORAGE", None)
    if storage:
        env["FLAME_CACHE_STORAGE"] = flame.cache_storage
    env["HOME"] = str(cwd)  # no ~/.flame/flame.yaml
    done = subprocess.run(
        [sys.executable, str(path), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=240
    )
    assert done.returncode == 0, f"{done.stderr}\n--- the embedded Flame's log:\n{flame.log()[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# -- flamepy's Runner ------------------------------------------------------------------------

SHAPES = '''
import pandas as pd


class Counter:
    """A service object whose state stays in the runner between calls."""

    def __init__(self, start=0):
        self.total = start

    def add(self, amount):
        self.total += amount
        return self.total


def square(x):
    return x * x


def frame(n):
    return pd.DataFrame({"i": list(range(n)), "sq": [i * i for i in range(n)]})
'''

RUNNER = """
import json
import flamepy
from flamepy.runner import Runner
from shapes import Counter, frame, square

SIXTEEN_MB = 16 << 20


def count_sevens(blob):
    return blob.count(7)


def make_blob(n):
    return bytes([7]) * n


with Runner("shapes") as rr:
    results = {"square": rr.service(square)(12).get()}
    counter = rr.service(Counter(10))  # an instance: its state stays between calls
    results["instance"] = [counter.add(5).get(), counter.add(1).get()]
    made = rr.service(Counter)  # a class: the runner makes the instance
    results["class"] = [made.add(3).get(), made.add(4).get()]
    df = rr.service(frame)(5).get()  # a DataFrame comes back as a native Arrow table
    results["frame"] = {"type": type(df).__name__, "sq": df["sq"].tolist()}
    blob = bytes([7]) * SIXTEEN_MB
    ref = rr.put_object(blob)  # 16 MB, by reference: far over a task's 4 MiB
    results["by_reference"] = rr.service(count_sevens)(ref).get()
    results["big_result"] = len(rr.service(make_blob)(SIXTEEN_MB).get())
    results["registered"] = flamepy.get_application("shapes") is not None
results["after_close"] = flamepy.get_application("shapes") is not None
print(json.dumps(results))
"""


@pytest.mark.parametrize("storage", [True, False], ids=["shared-storage", "flight-only"])
def test_flamepy_runner_works_unchanged(flame: EmbeddedFlame, tmp_path: Path, storage: bool) -> None:
    (tmp_path / "shapes.py").write_text(SHAPES)
    results = run_flamepy(flame, tmp_path, RUNNER, storage=storage)
    assert results["square"] == 144
    assert results["instance"] == [15, 16]
    assert results["class"] == [3, 7]
    assert results["frame"] == {"type": "DataFrame", "sq": [0, 1, 4, 9, 16]}
    assert results["by_reference"] == 16 << 20
    assert results["big_result"] == 16 << 20
    # The Runner registered "shapes" from flmrun with its package uploaded through the
    # cache (grpc://), the embedded Flame installed it, and closing unregistered it.
    assert results["registered"] and not results["after_close"]
    assert "installing application shapes from grpc" in flame.log()


# -- native Arrow tables in the object cache -------------------------------------------------

DATAFRAME = """
import json
import pandas as pd
from flamepy.core.cache import get_object, put_object

df = pd.DataFrame({"city": ["Oslo", "Lima", "Pune"], "temp": [3.5, 19.0, 31.25], "n": [1, 2, 3]})
ref = put_object("tables/frames", df)
back = get_object(ref)
again = get_object(ref)  # flamepy holds this version: the cache answers "not modified"
print(json.dumps({
    "key": ref.key,
    "version": ref.version,
    "same": bool(back.equals(df)) and bool(again.equals(df)),
    "type": type(back).__name__,
}))
"""


@pytest.mark.parametrize("storage", [True, False], ids=["shared-storage", "flight-only"])
def test_dataframe_round_trips_through_the_cache_as_a_native_table(
    flame: EmbeddedFlame, tmp_path: Path, storage: bool
) -> None:
    result = run_flamepy(flame, tmp_path, DATAFRAME, storage=storage)
    assert result["same"] and result["type"] == "DataFrame" and result["version"] == 1
    # Stored as the table it is, with its own columns, not as a pickle.
    app, session, object_id = result["key"].split("/")
    assert flame.cache_storage is not None
    path = Path(flame.cache_storage) / app / session / f"{object_id}.arrow"
    with pa.memory_map(str(path)) as source:
        table = ipc.open_file(source).read_all()
    assert table.column_names[:3] == ["city", "temp", "n"]
    assert table.schema.metadata[b"flame.cache.format"] == b"arrow-table-v1"
    assert table.column("temp").to_pylist() == [3.5, 19.0, 31.25]


# -- applications with a url -----------------------------------------------------------------

ECHO_SERVICE = """
import json
import os

import flamepy


class Echo(flamepy.FlameService):
    def on_session_enter(self, context):
        pass

    def on_task_invoke(self, context):
        return json.dumps({
            "module": __file__,
            "pythonpath": os.environ.get("PYTHONPATH", ""),
            "python_version": os.environ.get("FLAME_PYTHON_VERSION"),
            "input": (context.input or b"").decode(),
        }).encode()

    def on_session_leave(self):
        pass


if __name__ == "__main__":
    flamepy.run(Echo())
"""


def make_package(tmp_path: Path, name: str, dependencies: list[str]) -> Path:
    """A Python project with module ``name`` (a flamepy service), packed as Flame wants it."""
    src = tmp_path / f"{name}-src"
    (src / name).mkdir(parents=True)
    (src / name / "__init__.py").write_text("")
    (src / name / "__main__.py").write_text(ECHO_SERVICE)
    (src / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [build-system]
            requires = ["setuptools>=61"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{name.replace("_", "-")}"
            version = "0.1.0"
            dependencies = {json.dumps(dependencies)}

            [tool.setuptools]
            packages = ["{name}"]
            """
        )
    )
    archive = tmp_path / f"{name}.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for item in src.iterdir():
            tar.add(item, arcname=item.name)
    return archive


URL_APP = """
import json, sys
import flamepy

name, module, url, python = sys.argv[1:5]
flamepy.register_application(
    name,
    {"url": url, "installer": "python", "command": python, "arguments": ["-m", module]},
)
session = flamepy.create_session(name)
output = json.loads(session.invoke(b"over the url"))
session.close()
app = flamepy.get_application(name)
flamepy.unregister_application(name)
print(json.dumps({"output": output, "url": app.url, "installer": app.installer}))
"""


@contextlib.contextmanager
def served(directory: Path) -> Iterator[str]:
    """An http:// server of ``directory`` on loopback, for the test's duration."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("scheme", ["file", "http"])
def test_url_application_is_installed_offline(flame: EmbeddedFlame, tmp_path: Path, scheme: str) -> None:
    # Its one dependency is installed here already, so nothing needs the (unreachable) index.
    archive = make_package(tmp_path, "flame_url_echo", ["cloudpickle>=3"])
    name = f"url-echo-{scheme}"
    with contextlib.ExitStack() as stack:
        if scheme == "http":
            url = f"{stack.enter_context(served(tmp_path))}/{archive.name}"
        else:
            url = archive.as_uri()
        result = run_flamepy(flame, tmp_path, URL_APP, name, "flame_url_echo", url, sys.executable)
    assert result["url"] == url and result["installer"] == "python"
    output = result["output"]
    assert output["input"] == "over the url"
    deps, src = output["pythonpath"].split(os.pathsep)[:2]
    apps = Path(flame.state_dir) / "apps"
    assert Path(deps).parent.parent == apps and Path(deps).name == "deps" and Path(src).name == "src"
    # The module ran from the installed copy, not from the archive's source.
    assert Path(output["module"]).is_relative_to(deps)
    assert output["python_version"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    install_log = (Path(flame.state_dir) / "logs" / "install" / f"{name}.log").read_text()
    assert "--no-index" in install_log


def test_url_application_that_cannot_install_fails_to_bind_as_on_flame(
    flame: EmbeddedFlame, stub: protocol.FrontendStub, tmp_path: Path
) -> None:
    archive = make_package(tmp_path, "flame_url_needy", ["flame-magic-no-such-distribution>=1"])
    name = "needy"
    spec = types.ApplicationSpec(
        url=archive.as_uri(), installer="python", command=sys.executable, arguments=["-m", "flame_url_needy"]
    )
    stub.RegisterApplication(fe.RegisterApplicationRequest(name=name, application=spec))
    try:
        sid = stub.CreateSession(
            fe.CreateSessionRequest(session=types.SessionSpec(application=name, min_instances=1))
        ).metadata.id
        # The first bind waits for pip (which needs the index); the next four fail at once.
        events = _wait_for_pause(stub, sid)
        codes = [e.code for e in events]
        assert codes == [protocol.EVENT_BIND_FAILED] * 5 + [protocol.EVENT_SESSION_PAUSED]
        message = events[0].message
        assert "return_code <10>" in message and "application installation failed" in message
        assert "Python installation failed for app <needy>" in message and "See log:" in message
        stub.CloseSession(fe.CloseSessionRequest(session_id=sid))
    finally:
        stub.UnregisterApplication(fe.UnregisterApplicationRequest(name=name))


def _wait_for_pause(stub: protocol.FrontendStub, sid: str, timeout: float = 180.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        events = list(stub.GetSession(fe.GetSessionRequest(session_id=sid)).status.events)
        if any(e.code == protocol.EVENT_SESSION_PAUSED for e in events):
            return events
        assert time.monotonic() < deadline, f"no pause event within {timeout} s: {events}"
        time.sleep(0.1)


# -- Flame's default applications and batch sessions -----------------------------------------

DEFAULTS = """
import json
import flamepy
from flamepy.core.types import FlameError, SessionAttributes

names = sorted(a.name for a in flamepy.list_applications())
ping = flamepy.create_session("flmping")
pong = json.loads(ping.invoke(json.dumps({"duration": 1, "memory": 1024}).encode()))
ping.close()
execs = flamepy.create_session("flmexec")
script = {"language": "python", "code": "import sys; print(sys.stdin.read()[::-1])", "input": list(b"abc")}
python_out = json.loads(execs.invoke(json.dumps(script).encode()))
shell = {"language": "shell", "code": "echo from-$0 | tr a-z A-Z"}
shell_out = json.loads(execs.invoke(json.dumps(shell).encode()))
execs.close()

# A batch session of two: tasks start two at a time, on two instances at once.
batch = flamepy.create_session("flmping", batch_size=2)
futures = [batch.run(json.dumps({"duration": 1}).encode()) for _ in range(4)]
pongs = [json.loads(f.result())["message"] for f in futures]
same = flamepy.open_session(batch.id, SessionAttributes(application="flmping", batch_size=2)).id
try:
    flamepy.open_session(batch.id, SessionAttributes(application="flmping", batch_size=1))
    mismatch = None
except FlameError as err:
    mismatch = str(err)
batch.close()
print(json.dumps({
    "names": names,
    "ping": pong["message"],
    "python": bytes(python_out["data"]).decode(),
    "shell": bytes(shell_out["data"]).decode(),
    "batch": pongs,
    "same": same == batch.id,
    "mismatch": mismatch,
}))
"""


def test_default_applications_and_a_batch_session(flame: EmbeddedFlame, tmp_path: Path) -> None:
    result = run_flamepy(flame, tmp_path, DEFAULTS)
    assert {"flmrun", "flmexec", "flmping", "flame-magic"} == set(result["names"])
    assert result["ping"].startswith("Completed on <") and "with <1024 B> memory" in result["ping"]
    assert result["python"] == "cba\n"
    assert result["shell"].startswith("FROM-") and result["shell"].endswith("MAIN.SH\n")
    assert len(result["batch"]) == 4 and all(m.startswith("Completed on <") for m in result["batch"])
    # Reopening checks batch_size too, as Flame does.
    assert result["same"] and "batch_size differs" in result["mismatch"]
