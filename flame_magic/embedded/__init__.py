"""The embedded Flame: a single-machine Flame for notebooks without a cluster.

It serves ``flame.v1.Frontend`` with Flame's semantics and runs application processes as
Flame's Host shim does (a process per session binding, in its own process group, driven
through ``flame.v1.Instance`` over a Unix socket), so a client cannot tell it from a real
Flame. It runs in its own process (``python -m flame_magic.embedded``); this module only
starts and stops that process, and imports nothing heavy.

It serves Flame's object cache too, on a Unix socket in its private state directory. It
serves TLS only when given a certificate, and it trusts this machine's users as the notebook
does: everything it launches runs as the user that started it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import selectors
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

__all__ = ["EmbeddedFlame"]

_READY_PREFIX = "FLAME_ENDPOINT="
_STDERR_TAIL = 4000
# Started in the notebook's directory: files there (grpc.py, yaml.py ...) must not shadow what
# it imports. Python 3.10 has no -P; its `python -m` still puts the directory first.
_SAFE_PATH = ["-P"] if sys.version_info >= (3, 11) else []


def _package_root() -> str | None:
    """The directory holding ``flame_magic``, if a fresh interpreter would not find it."""
    root = str(Path(__file__).resolve().parent.parent.parent)
    installed = {os.path.realpath(p) for p in [*site.getsitepackages(), site.getusersitepackages()]}
    return None if os.path.realpath(root) in installed else root


class EmbeddedFlame:
    """A running embedded Flame process, started by :meth:`start`.

    Attributes
    ----------
    endpoint : str
        Its Frontend endpoint (``unix:///...`` or ``http://127.0.0.1:PORT``).
    state_dir : str
        Its private state directory (sockets, ``logs/<executor-id>.log``); removed on stop.
    pid : int
        Its process id.
    cache_endpoint : str or None
        Its object cache (``grpc+unix:///...`` in the state directory), None if it has none.
    cache_storage : str or None
        The cache's storage directory, which this machine's processes share.
    """

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        endpoint: str,
        state_dir: str,
        stderr: IO[bytes],
        variables: dict[str, str] | None = None,
    ):
        self._process = process
        self.endpoint = endpoint
        self.cache_endpoint = (variables or {}).get("FLAME_CACHE_ENDPOINT")
        self.cache_storage = (variables or {}).get("FLAME_CACHE_STORAGE")
        self.state_dir = state_dir
        self.pid = process.pid
        self._stderr = stderr
        self._stopped = False
        atexit.register(self.stop)

    @classmethod
    def start(
        cls,
        working_directory: str | None = None,
        listen: str | None = None,
        timeout: float = 15.0,
        tls_files: tuple[str, str] | None = None,
    ) -> EmbeddedFlame:
        """Start an embedded Flame and wait until it serves.

        Parameters
        ----------
        working_directory
            Working directory of flame-magic's runner, application ``flame-magic`` (default: ours).
        listen
            ``http://127.0.0.1:PORT`` (0 picks a port), ``https://...`` with ``tls_files``, or
            ``unix:///path``; default a Unix socket in its state directory.
        timeout
            Seconds to wait for it to be ready.
        tls_files
            PEM files of the server certificate (chain) and its private key, for ``https://``.

        Returns
        -------
        EmbeddedFlame
            The running instance; stop it with :meth:`stop` or use it as a context manager.
            It also exits by itself when this process dies.

        Raises
        ------
        RuntimeError
            If it exits or is not ready in time; the message ends with its stderr.
        """
        state_dir = tempfile.mkdtemp(prefix="flame-embedded-")
        cmd = [sys.executable, *_SAFE_PATH, "-m", "flame_magic.embedded", "--state-dir", state_dir]
        # Our pid, not its getppid() at some later moment, so that dying early is noticed too.
        cmd += ["--exit-with-parent", "--parent-pid", str(os.getpid())]
        if working_directory is not None:
            cmd += ["--working-directory", os.path.abspath(working_directory)]
        if listen is not None:
            cmd += ["--listen", listen]
        if tls_files is not None:
            cmd += ["--tls-cert", tls_files[0], "--tls-key", tls_files[1]]
        env = dict(os.environ)
        root = _package_root()
        if root is not None:
            # flame_magic (and runner, beside it) may be importable here only through sys.path.
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        # An unnamed file, not a pipe: nobody reads stderr while it runs, and a full pipe
        # would block it.
        stderr = tempfile.TemporaryFile()
        # Its own session: Jupyter interrupts a kernel by signalling the kernel's whole
        # process group, and an interrupt must not stop Flame. It dies with us anyway
        # (--exit-with-parent, and stop() at exit).
        process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
            start_new_session=True,
        )
        try:
            variables = _read_ready_lines(process, timeout)
        except RuntimeError as err:
            _terminate(process, 2.0)
            message = f"{err}\n{_tail(stderr)}".rstrip()
            stderr.close()
            shutil.rmtree(state_dir, ignore_errors=True)
            raise RuntimeError(message) from None
        return cls(process, variables.pop("FLAME_ENDPOINT"), state_dir, stderr, variables)

    def log(self) -> str:
        """Everything it has logged (its stderr), also after it stopped."""
        return _tail(self._stderr, limit=None)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop it and every application process it runs (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        _terminate(self._process, timeout)
        shutil.rmtree(self.state_dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        """Whether its process is still alive."""
        return self._process.poll() is None

    def stopped(self, within: float = 0.0) -> bool:
        """Whether its process has exited, waiting up to ``within`` seconds for it to."""
        if within <= 0:  # asked several times a cell: one non-blocking waitpid
            return self._process.poll() is not None
        try:
            self._process.wait(within)
        except subprocess.TimeoutExpired:
            return False
        return True

    @property
    def exit_status(self) -> int | None:
        """Its process's exit status (negative: the signal that ended it); None while it runs."""
        return self._process.poll()

    def __enter__(self) -> EmbeddedFlame:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<EmbeddedFlame {self.endpoint} pid={self.pid} {state}>"


def _read_ready_lines(process: subprocess.Popen[bytes], timeout: float) -> dict[str, str]:
    """``FLAME_ENDPOINT`` and the lines after it (written at once), as variables."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"the embedded Flame was not ready within {timeout:g} s")
            if not sel.select(left):
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                code = process.wait(timeout=5)
                raise RuntimeError(f"the embedded Flame exited with status {code} before it was ready")
            buf += chunk
    process.stdout.close()  # it writes nothing more there
    lines = buf.decode("utf-8", errors="replace").splitlines()
    if not lines[0].startswith(_READY_PREFIX):
        raise RuntimeError(f"unexpected first line from the embedded Flame: {lines[0]!r}")
    return dict(line.strip().split("=", 1) for line in lines if "=" in line)


def _terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


def _tail(stream: IO[bytes], limit: int | None = _STDERR_TAIL) -> str:
    # pread, not seek+read: the child shares this file's offset and appends at it.
    try:
        fd = stream.fileno()
        size = os.fstat(fd).st_size
        start = 0 if limit is None else max(0, size - limit)
        return os.pread(fd, size - start, start).decode("utf-8", errors="replace")
    except (OSError, ValueError):
        return ""
