"""The runner process: ``python -m flame_magic_runner`` or ``flame-magic-runner``.

Flame's executor manager starts it once per session binding, in its own process group,
with ``FLAME_INSTANCE_ENDPOINT`` naming the Unix socket to serve ``flame.v1.Instance``
on. It then calls ``OnSessionEnter``, ``OnTaskInvoke`` one task at a time and
``OnSessionLeave``, and sends SIGTERM to the group. The process exits with 0 after
``OnSessionLeave`` or on SIGTERM or SIGINT, and at once if its parent (the executor
manager) dies, so that nothing outlives its launcher.
"""

from __future__ import annotations

import os
import sys

# `python -m` puts the working directory (the notebook's) first on sys.path, where a user's
# runner.py, grpc.py or flame_magic.py would shadow what the runner imports. Our own imports
# come from the installed packages; main() gives the directory back to the cells.
_CELL_PATH = os.getcwd()
if sys.path and sys.path[0] in ("", _CELL_PATH):
    del sys.path[0]

import atexit
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import FrameType

import grpc

from flame_magic.protocol import add_InstanceServicer_to_server, cell
from flame_magic_runner.service import InstanceService, MainThread

log = logging.getLogger("flame_magic.runner")

ENDPOINT_VARIABLE = "FLAME_INSTANCE_ENDPOINT"
# Seconds that in-flight calls (the OnSessionLeave reply) get to finish when stopping.
STOP_GRACE = 2.0
# Seconds a cell gets, after SIGTERM interrupted it, before the process exits anyway.
FORCE_EXIT_AFTER = 5.0
ORPHAN_POLL = 0.5
LOG_FORMAT = "%(asctime)s %(levelname)s flame-magic-runner[%(process)d]: %(message)s"
_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def socket_path(endpoint: str) -> str:
    """The socket path in ``FLAME_INSTANCE_ENDPOINT``, given as a path or ``unix://path``."""
    for prefix in ("unix://", "unix:"):
        if endpoint.startswith(prefix):
            return endpoint[len(prefix) :]
    return endpoint


def serve(
    path: str,
    evaluate: Callable[[cell.CellRequest], cell.CellResult],
    prepare: Callable[[], None] | None = None,
) -> int:
    """Serve Flame's Instance service on the Unix socket ``path`` until told to stop.

    Parameters
    ----------
    path
        Where to create the socket (private to the user: mode 0600).
    evaluate
        Runs one cell; called on this (the main) thread.
    prepare
        Warm-up run on the main thread once the socket is listening, while Flame
        connects and binds the session.

    Returns
    -------
    int
        The process's exit status.
    """
    main = MainThread()
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        main.stop()
        if not stopping.is_set():
            stopping.set()
            _exit_later(path, FORCE_EXIT_AFTER)
        if main.busy:
            # Interrupt the running cell (reported as its error) so the process exits promptly.
            raise KeyboardInterrupt(f"the runner received {signal.Signals(signum).name}")

    for signum in _SIGNALS:
        signal.signal(signum, on_signal)
    # Threads inherit the signal mask: with the signals blocked while gRPC and the guard
    # start their threads, only the main thread receives them, and its wait is interrupted.
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        _start_orphan_guard(path)
        server = grpc.server(ThreadPoolExecutor(max_workers=4, thread_name_prefix="instance"))
        add_InstanceServicer_to_server(InstanceService(evaluate, main, on_leave=main.stop), server)
        # Private from its creation (umask), then exactly 0600: only the user may connect.
        umask = os.umask(0o077)
        try:
            server.add_insecure_port(f"unix://{path}")
            os.chmod(path, 0o600)
        except (RuntimeError, OSError) as exc:
            log.error("cannot listen on unix://%s: %s", path, exc)
            return 1
        finally:
            os.umask(umask)
        server.start()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    log.info("serving flame.v1.Instance on unix://%s", path)
    try:
        if prepare is not None and not stopping.is_set():
            try:
                prepare()
            except Exception:
                log.exception("warm-up failed; the first cell will try again")
        main.run()
    finally:
        server.stop(STOP_GRACE).wait()
        _remove(path)
    log.info("stopped")
    return 0


def _start_orphan_guard(path: str) -> None:
    """Exit at once if the process that started us dies (we are then re-parented)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(ORPHAN_POLL)
            if os.getppid() != parent:
                # Not through logging: another thread may hold its lock.
                os.write(2, f"flame-magic-runner: parent process {parent} died; exiting\n".encode())
                _remove(path)
                os._exit(1)

    threading.Thread(target=watch, name="orphan-guard", daemon=True).start()


def _exit_later(path: str, delay: float) -> None:
    """Exit after ``delay`` seconds even if a cell ignores the interrupt."""

    def force() -> None:
        os.write(2, b"flame-magic-runner: a cell did not stop after SIGTERM; exiting\n")
        _remove(path)
        os._exit(0)

    timer = threading.Timer(delay, force)
    timer.daemon = True
    timer.start()


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        os.write(2, f"flame-magic-runner: cannot remove {path}: {exc}\n".encode())


def main() -> int:
    """Run the runner process (never returns once serving: see :func:`serve`)."""
    endpoint = os.environ.get(ENDPOINT_VARIABLE, "").strip()
    if not endpoint:
        print(
            f"flame-magic-runner: {ENDPOINT_VARIABLE} is not set; this program is started by "
            "Flame's executor manager, which sets it to the Unix socket to serve on.",
            file=sys.stderr,
        )
        return 2
    # Our own logger, not the root one: a cell's logging.basicConfig() must still work and
    # show in the notebook.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    from flame_magic import shm
    from flame_magic_runner import evaluate

    shm.directory()  # removes the segments of runners and kernels that were killed

    # Cells import modules from the working directory first, as in a notebook; the runner's
    # own modules are loaded by now, so a file there can no longer shadow them.
    sys.path.insert(0, _CELL_PATH)

    status = serve(socket_path(endpoint), evaluate.evaluate, prepare=evaluate.prepare)
    # Leave without joining threads a cell may have left running, which would keep the
    # process alive after Flame asked it to go; the atexit hooks of cells still run.
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed log must not change the exit status
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
