"""A notebook on a Flame cluster: connecting, choosing and deploying the runner, never hanging.

The cluster is an embedded Flame started as its own process on TCP loopback (or TLS), as a
session manager on another machine would be; the notebook is the real IPython shell of
``conftest.py``. Each test checks what the user sees: the cell's value, its error, and
what ``%flame`` prints.
"""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import json
import os
import re
import site
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from IPython.core.error import UsageError
from jupyter_client.manager import start_new_kernel

from flame_magic import protocol
from flame_magic.client import FlameClient, new_session_id
from flame_magic.embedded import EmbeddedFlame
from flame_magic.errors import CellFailed

types = protocol.types
fe = protocol.frontend

REPO_ROOT = Path(__file__).resolve().parents[2]
APPS = Path(__file__).parent / "apps"
FLAMEPY_SERVICE = APPS / "flamepy_service.py"
# A cell that fails when something is wrong must fail, not wait: each test asserts the reason
# it failed for (which names no timeout); this bound only guards against a hang, not speed.
FAILS_WITHIN = 60.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedFlame]:
    """A Flame as a cluster would be: its own process, serving Frontend on TCP loopback."""
    workdir = tmp_path_factory.mktemp("cluster-cwd")
    with EmbeddedFlame.start(working_directory=str(workdir), listen="http://127.0.0.1:0") as flame:
        yield flame


@pytest.fixture(scope="module")
def admin(cluster: EmbeddedFlame) -> Iterator[FlameClient]:
    """The cluster as its administrator (flmctl) sees it."""
    client = FlameClient(cluster.endpoint)
    yield client
    client.close()


@pytest.fixture
def magics(shell):  # type: ignore[no-untyped-def]
    """The notebook's FlameMagics; afterwards back to the configured Flame and application."""
    magics = shell.magics_manager.registry["FlameMagics"]
    yield magics
    magics.shutdown()  # the next cell connects again, from the configuration (the embedded Flame)
    magics.application = type(magics).application.default_value
    magics.connect_timeout = type(magics).connect_timeout.default_value


def timed(run, source: str):  # type: ignore[no-untyped-def]
    """Run a cell; return what it showed and how long it took."""
    started = time.monotonic()
    ran = run(source)
    return ran, time.monotonic() - started


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_config(home: Path, current: str, contexts: dict[str, dict]) -> Path:
    path = home / ".flame" / "flame.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"current-context": current, "contexts": [{"name": k, **v} for k, v in contexts.items()]}
    path.write_text(yaml.safe_dump(document))
    return path


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


# -- connecting ----------------------------------------------------------------------------


def test_connect_to_an_endpoint_runs_cells_there_and_status_shows_them(run, magics, cluster, admin):
    connected = run(f"%flame connect {cluster.endpoint}")
    assert connected.error is None, connected.error
    assert f"Connected to Flame at {cluster.endpoint} [%flame connect]" in connected.stdout
    assert "flame-magic (flame-magic's runner)" in connected.stdout

    ran = run("%%flmrun\nimport os\nos.environ['FLAME_ENDPOINT']")
    assert ran.value == cluster.endpoint  # the runner was started by that Flame

    status = run("%flame status").stdout
    assert f"Flame: {cluster.endpoint} [%flame connect]" in status
    assert "flame-magic (flame-magic's runner)" in status and "Application: flame-magic" in status
    pattern = r"Session (flame-magic-\w{6}) \(flame-magic, Open\): 0 pending, 0 running, 1 succeeded"
    match = re.search(pattern, status)
    assert match, status
    assert admin.get_session(match.group(1)).status.succeed == 1  # the cluster agrees

    misplaced = run(f"%flame status {cluster.endpoint}")
    assert isinstance(misplaced.error, UsageError) and "options of `%flame connect`" in str(misplaced.error)

    assert f"Closed 1 session(s): {match.group(1)}" in run("%flame close").stdout
    assert admin.get_session(match.group(1)).status.state == types.Closed


def test_connect_by_context_or_environment_as_flames_own_tools(run, magics, cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    closed = f"http://127.0.0.1:{free_port()}"
    config = write_config(
        tmp_path,
        "down",
        {"lab": {"cluster": {"endpoint": cluster.endpoint}}, "down": {"cluster": {"endpoint": closed}}},
    )

    lab = run("%flame connect lab")
    assert f"Connected to Flame at {cluster.endpoint} [context 'lab' in {config}]" in lab.stdout
    assert run("%%flmrun\n'on lab'").value == "on lab"

    unknown = run("%flame connect nowhere")
    assert isinstance(unknown.error, UsageError)
    assert "'nowhere' is neither an endpoint nor a context" in str(unknown.error)
    assert "are: down, lab" in str(unknown.error)

    # No argument: back to the configuration, whose current context is down. The notebook
    # keeps the Flame it had.
    down, took = timed(run, "%flame connect")
    assert isinstance(down.error, CellFailed) and closed in str(down.error)
    assert took < FAILS_WITHIN
    assert f"Flame: {cluster.endpoint}" in run("%flame status").stdout

    monkeypatch.setenv("FLAME_ENDPOINT", cluster.endpoint)  # wins over flame.yaml, as for flamepy
    assert f"Connected to Flame at {cluster.endpoint} [FLAME_ENDPOINT]" in run("%flame connect").stdout


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signed for localhost and 127.0.0.1: (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, key, issuer: str, signer, extension, critical: bool):  # type: ignore[no-untyped-def]
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(extension, critical=critical)
            .sign(signer, hashes.SHA256())
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate(
        "test CA", ca_key, "test CA", ca_key, x509.BasicConstraints(ca=True, path_length=None), True
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    server = certificate("localhost", key, "test CA", ca_key, names, False)
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


FLAMEPY_LIST = "import flamepy, json; print(json.dumps([a.name for a in flamepy.list_applications()]))"


def test_https_uses_the_configured_ca_as_flamepy_does(run, magics, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("FLAME_CA_FILE", raising=False)
    ca, cert, key = make_certificates(tmp_path)
    with EmbeddedFlame.start(
        working_directory=str(tmp_path), listen="https://127.0.0.1:0", tls_files=(str(cert), str(key))
    ) as flame:
        assert flame.endpoint.startswith("https://127.0.0.1:")

        untrusted, took = timed(run, f"%flame connect {flame.endpoint}")
        assert isinstance(untrusted.error, CellFailed), untrusted.error
        assert flame.endpoint in str(untrusted.error) and "CA" in str(untrusted.error)
        assert took < FAILS_WITHIN

        with_ca = run(f"%flame connect {flame.endpoint} --ca-file {ca}")
        assert with_ca.error is None, with_ca.error
        assert run("%%flmrun\n'over TLS'").value == "over TLS"

        write_config(
            tmp_path,
            "secure",
            {"secure": {"cluster": {"endpoint": flame.endpoint, "tls": {"ca_file": str(ca)}}}},
        )
        assert "[context 'secure'" in run("%flame connect secure").stdout
        assert run("%%flmrun\n'context CA'").value == "context CA"

        monkeypatch.setenv("FLAME_CA_FILE", str(ca))
        assert run(f"%flame connect {flame.endpoint}").error is None

        # flamepy reads the same configuration: FLAME_ENDPOINT and FLAME_CA_FILE.
        done = subprocess.run(
            [sys.executable, "-c", FLAMEPY_LIST],
            env=subprocess_env(FLAME_ENDPOINT=flame.endpoint, FLAME_CA_FILE=str(ca), HOME=str(tmp_path)),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert "flmrun" in json.loads(done.stdout)


class _HTTPHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_unreachable_or_wrong_endpoints_fail_within_seconds_naming_them(run, magics, cluster):
    assert run(f"%flame connect {cluster.endpoint}").error is None
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HTTPHandler)  # speaks HTTP/1, not gRPC
    threading.Thread(target=web.serve_forever, daemon=True).start()
    silent = socket.socket()  # accepts connections (the kernel does) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    not_flame = grpc.server(futures.ThreadPoolExecutor(max_workers=1))  # gRPC, without Frontend
    grpc_port = not_flame.add_insecure_port("127.0.0.1:0")
    not_flame.start()
    # (reason, connect_timeout): only the silent endpoint waits for it; the others must fail
    # for their own reason, before a timeout that a loaded machine cannot reach.
    cases = {
        f"http://127.0.0.1:{free_port()}": ("Connection refused", 30.0),
        f"http://127.0.0.1:{web.server_port}": ("HTTP/2", 30.0),
        f"http://127.0.0.1:{silent.getsockname()[1]}": ("no answer within 2 s", 2.0),
        f"http://127.0.0.1:{grpc_port}": ("not a Flame session manager", 30.0),
    }
    try:
        for endpoint, (reason, connect_timeout) in cases.items():
            magics.connect_timeout = connect_timeout
            ran, took = timed(run, f"%flame connect {endpoint}")
            assert isinstance(ran.error, CellFailed), (endpoint, ran.error)
            assert f"Cannot reach Flame at {endpoint}" in str(ran.error)
            assert reason in str(ran.error)
            assert took < FAILS_WITHIN
    finally:
        web.shutdown()
        silent.close()
        not_flame.stop(0)
    # The notebook kept the Flame it had.
    assert run("%%flmrun\n'still connected'").value == "still connected"


# -- choosing and deploying the runner -----------------------------------------------------


def another_python(directory: Path) -> Path:
    """Another path to this interpreter, seeing the same packages, inside a venv or outside one.

    A bare symlink to a venv's interpreter runs the base interpreter without the venv's
    packages: Python finds a venv by the ``pyvenv.cfg`` next to (or above) the path it was
    started by. So in a venv, the link gets a ``pyvenv.cfg`` and site-packages of its own,
    the latter a link to this venv's.
    """
    link = directory / "bin" / "python"
    link.parent.mkdir(parents=True)
    link.symlink_to(sys.executable)
    if sys.prefix != sys.base_prefix:
        (directory / "pyvenv.cfg").write_text((Path(sys.prefix) / "pyvenv.cfg").read_text())
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        (directory / "lib" / version).mkdir(parents=True)
        (directory / "lib" / version / "site-packages").symlink_to(site.getsitepackages()[0])
    return link


def test_stock_flmrun_runs_cells_with_a_cache_and_deploy_switches_to_our_runner(
    run, magics, tmp_path, monkeypatch
):
    monkeypatch.delenv("FLAME_CACHE_ENDPOINT", raising=False)
    with EmbeddedFlame.start(working_directory=str(tmp_path), listen="http://127.0.0.1:0") as flame:
        # A Flame as it comes: its flmrun is flamepy's runner, and flame-magic's is not there.
        admin = FlameClient(flame.endpoint)
        with grpc.insecure_channel(flame.endpoint.removeprefix("http://")) as channel:
            unregister = protocol.frontend.UnregisterApplicationRequest(name="flame-magic")
            assert protocol.FrontendStub(channel).UnregisterApplication(unregister).return_code == 0

        connected = run(f"%flame connect {flame.endpoint}")
        assert "flmrun (Flame's flmrun: flamepy's runner)" in connected.stdout, connected.stdout

        # The notebook is not told of this Flame's cache: flmrun cannot run, and nothing starts.
        refused, took = timed(run, "%%flmrun\n1 + 1")
        assert isinstance(refused.error, CellFailed)
        assert "flmrun (flamepy's runner) needs Flame's object cache" in str(refused.error)
        assert "FLAME_CACHE_ENDPOINT" in str(refused.error) and "`%flame deploy`" in str(refused.error)
        assert took < FAILS_WITHIN
        assert admin.list_sessions() == []
        assert "needs Flame's object cache" in run("%flame status").stdout

        assert flame.cache_endpoint
        monkeypatch.setenv("FLAME_CACHE_ENDPOINT", flame.cache_endpoint)
        assert run(f"%flame connect {flame.endpoint}").error is None
        assert run("%%flmrun\n6 * 7").value == 42
        assert "Path: Flame's flmrun: 'flmrun' is flamepy's runner" in run("%flame status").stdout

        unsaid = run("%flame deploy")
        assert isinstance(unsaid.error, UsageError)
        assert "--url file:///shared/dir/" in str(unsaid.error) and "--installed" in str(unsaid.error)

        deployed = run(f"%flame deploy --installed --python {sys.executable}")
        assert deployed.error is None, deployed.error
        assert f"Application 'flame-magic' registered on Flame at {flame.endpoint}" in deployed.stdout
        assert f"`{sys.executable} -m flame_magic_runner`" in deployed.stdout
        assert magics.application == "flame-magic"
        assert run("%%flmrun\n6 * 7").value == 42
        app = admin.get_application("flame-magic")
        assert app is not None and app.spec.delay_release == 600

        pid = run("%%flmrun\nimport os\nos.getpid()").value
        again = run(f"%flame deploy --installed --python {sys.executable}")
        assert "Application 'flame-magic' unchanged" in again.stdout
        assert run("%%flmrun\nimport os\nos.getpid()").value == pid  # same session, same runner
        taken = run(f"%flame deploy --installed --name flmrun --python {sys.executable}")
        assert isinstance(taken.error, CellFailed)
        assert "'flmrun' that is not flame-magic's runner" in str(taken.error)

        status = run("%flame status").stdout
        assert "flame-magic (flame-magic's runner)" in status and "Application: flame-magic" in status

        # Another version of the runner (here: another path to Python) updates the application,
        # which Flame allows only while none of its sessions is open, another notebook's included.
        other = another_python(tmp_path / "other")
        elsewhere = new_session_id("flame-magic")
        admin.open_session(elsewhere, types.SessionSpec(application="flame-magic"))
        busy = run(f"%flame deploy --installed --python {other}")
        assert isinstance(busy.error, CellFailed)
        assert f"none of its sessions is open ({elsewhere})" in str(busy.error)
        admin.close_session(elsewhere)
        updated = run(f"%flame deploy --installed --python {other}")
        assert "Application 'flame-magic' updated" in updated.stdout, updated.error
        moved = run("%%flmrun\nimport sys\nsys.executable")
        assert moved.value == str(other), (moved.error, moved.stdout, moved.stderr)
        admin.close()


def test_deploy_on_the_embedded_flame_uses_this_kernels_runner(run, magics):
    deployed = run("%flame deploy --name my-runner")
    assert deployed.error is None, deployed.error
    assert "Application 'my-runner' registered" in deployed.stdout
    assert run("%%flmrun\nimport os\nos.getcwd()").value == os.getcwd()  # as flmrun: the notebook's


def test_the_runner_package_installs_and_runs_as_flames_python_installer_would(
    run, magics, cluster, admin, tmp_path
):
    # The administrator's way: build the package and get a manifest for flmctl.
    packages = tmp_path / "packages"
    packages.mkdir()
    built = subprocess.run(
        [sys.executable, "-m", "flame_magic.deploy", str(packages), "--name", "installed-runner"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=60,
    )
    assert built.returncode == 0, built.stderr
    manifest = yaml.safe_load(built.stdout)
    (package,) = packages.iterdir()
    assert manifest["metadata"]["name"] == "installed-runner"
    assert manifest["spec"]["url"] == package.as_uri() and manifest["spec"]["installer"] == "python"

    # What Flame's executor manager does with it: extract into src/, check for
    # pyproject.toml at the top, install into deps/ (uv pip install --target; here pip,
    # without dependencies, which this environment has).
    src, deps = tmp_path / "src", tmp_path / "deps"
    src.mkdir()
    with tarfile.open(package) as archive:
        archive.extractall(src, filter="data")
    assert (src / "pyproject.toml").is_file()
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    done = subprocess.run(
        [*install, "--target", str(deps), str(src)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    # Flame then runs the command with PYTHONPATH=deps:src:<the runtime's site-packages>.
    # `-S` keeps this environment's editable flame-magic out of the way: what runs is the package.
    pythonpath = os.pathsep.join([str(deps), str(src), *site.getsitepackages()])
    spec = types.ApplicationSpec(
        shim=types.Host,
        command=sys.executable,
        arguments=["-S", "-m", "flame_magic_runner"],
        environments=[types.Environment(name="PYTHONPATH", value=pythonpath)],
        working_directory=str(tmp_path),
    )
    admin.register_application("installed-runner", spec)
    run(f"%flame connect {cluster.endpoint}")
    magics.application = "installed-runner"
    ran = run(
        "%%flmrun\nimport flame_magic_runner, flame_magic\n"
        "[flame_magic_runner.__file__, flame_magic.__file__]"
    )
    assert ran.error is None, ran.error
    assert all(path.startswith(str(deps)) for path in ran.value), ran.value


def test_an_application_that_cannot_start_a_session_fails_the_cell_quickly(run, magics, cluster, admin):
    spec = types.ApplicationSpec(
        shim=types.Host,
        command=sys.executable,
        arguments=[str(FLAMEPY_SERVICE)],
        environments=[types.Environment(name="FLAMEPY_SERVICE_REFUSE", value="no GPU on this node")],
    )
    admin.register_application("cannot-start", spec)
    run(f"%flame connect {cluster.endpoint}")
    magics.application = "cannot-start"
    ran, took = timed(run, "%%flmrun\n1")
    assert isinstance(ran.error, CellFailed)
    assert "could not start: " in str(ran.error) and "no GPU on this node" in str(ran.error)
    assert "`%flame deploy`" in str(ran.error)
    assert took < FAILS_WITHIN
    sessions = [s for s in admin.list_sessions() if s.spec.application == "cannot-start"]
    assert [s.status.state for s in sessions] == [types.Closed]  # not left retrying


def test_missing_or_disabled_application_says_what_to_do(run, magics, cluster):
    run(f"%flame connect {cluster.endpoint}")
    magics.application = "no-such-app"
    missing = run("%%flmrun\n1")
    assert isinstance(missing.error, CellFailed)
    assert f"Flame at {cluster.endpoint} has no application 'no-such-app'" in str(missing.error)
    assert "Run `%flame deploy`" in str(missing.error)

    magics.application = "flmrun"
    fake = subprocess.Popen(
        [sys.executable, str(APPS / "fake_frontend.py")],
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        assert fake.stdout is not None
        endpoint = fake.stdout.readline().strip().removeprefix("FLAME_ENDPOINT=")
        connected = run(f"%flame connect {endpoint}")
        assert "flmrun (disabled" in connected.stdout
        disabled = run("%%flmrun\n1")
        assert isinstance(disabled.error, CellFailed)
        assert "Application 'flmrun'" in str(disabled.error) and "is disabled" in str(disabled.error)
        assert "`%flame deploy --name NAME`" in str(disabled.error)
    finally:
        fake.kill()
        fake.wait()


def test_session_closed_or_deleted_outside_the_notebook(run, magics, cluster, admin):
    run(f"%flame connect {cluster.endpoint}")
    for delete in (False, True):
        first = run("%%flmrun\nimport os\nos.getpid()")
        assert first.error is None
        session_id = magics.connection().session()
        admin.close_session(session_id)  # as `flmctl close` would
        if delete:
            with grpc.insecure_channel(cluster.endpoint.removeprefix("http://")) as channel:
                protocol.FrontendStub(channel).DeleteSession(fe.DeleteSessionRequest(session_id=session_id))
        again = run("%%flmrun\nimport os\nos.getpid()")
        assert again.error is None and again.value != first.value
        assert f"Session {session_id} was closed or deleted outside this notebook" in again.stderr
        assert "is gone" in again.stderr


# -- data over Flame's limit ---------------------------------------------------------------


def test_result_over_4_mib_stays_on_the_runner_with_a_note(run, shell, magics, cluster):
    # A cluster reached by endpoint alone has no object cache configured for this notebook.
    assert run(f"%flame connect {cluster.endpoint}").error is None
    for name in ("big_remote", "small_remote"):
        shell.user_ns.pop(name, None)
    ran = run("%%flmrun\nbig_remote = b'x' * (5 * 1024 * 1024)\nsmall_remote = len(big_remote)")
    assert ran.error is None, ran.error
    assert shell.user_ns["small_remote"] == 5 * 1024 * 1024 and "big_remote" not in shell.user_ns
    assert "`big_remote` stays on the runner" in ran.stderr and "4 MiB" in ran.stderr
    assert run("%%flmrun\nlen(big_remote)").value == 5 * 1024 * 1024  # it is there, for later cells


# -- the kernel's end ----------------------------------------------------------------------


SESSION_IDS = "print(*get_ipython().magics_manager.registry['FlameMagics'].connection().session_ids)"


def test_kernel_shutdown_closes_the_notebooks_sessions(isolated_home, cluster, admin):
    env = {**os.environ, "FLAME_ENDPOINT": cluster.endpoint}
    manager, client = start_new_kernel(kernel_name="python3", env=env)
    printed: list[str] = []

    def keep(message: dict) -> None:
        if message["msg_type"] == "stream":
            printed.append(message["content"]["text"])

    try:
        client.execute_interactive("%load_ext flame_magic", timeout=60)
        reply = client.execute_interactive("%%flmrun\n'on the cluster'", timeout=60)
        assert reply["content"]["status"] == "ok"
        client.execute_interactive(SESSION_IDS, timeout=60, output_hook=keep)
        (session_id,) = "".join(printed).split()
        assert admin.get_session(session_id).status.state == types.Open
    finally:
        client.stop_channels()
        manager.shutdown_kernel()  # a clean shutdown, as Jupyter's "Shut Down Kernel"
    assert admin.get_session(session_id).status.state == types.Closed
