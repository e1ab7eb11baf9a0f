"""Run the embedded Flame: serve Frontend on an endpoint until told to stop, then clean up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import grpc

from flame_magic import protocol
from flame_magic.deploy import DEFAULT_NAME
from flame_magic.embedded import executor
from flame_magic.embedded.frontend import FrontendService
from flame_magic.embedded.session_manager import SessionManager

if TYPE_CHECKING:
    from flame_magic.embedded.cache_server import CacheServer

log = logging.getLogger(__name__)

PARENT_POLL_INTERVAL = 0.5  # seconds between checks that our parent is still alive
FRONTEND_SOCKET = "flame.sock"


@dataclass(frozen=True)
class Listen:
    """Where to serve: the address given to gRPC and the endpoint to tell clients."""

    bind: str
    endpoint: str  # may hold "{port}", filled in once the port is known
    unix_path: Path | None = None


def parse_listen(listen: str | None, state_dir: Path) -> Listen:
    """Parse ``http(s)://HOST:PORT`` or ``unix:///path`` (default: a socket in the state dir).

    Raises
    ------
    ValueError
        For anything else.
    """
    if not listen:
        path = state_dir / FRONTEND_SOCKET
        return Listen(f"unix://{path}", f"unix://{path}", path)
    if listen.startswith("unix:"):
        raw = listen[len("unix:") :]
        if raw.startswith("//"):
            raw = raw[2:]
        if not raw.startswith("/"):
            raise ValueError(f"unix endpoint needs an absolute path: {listen}")
        return Listen(f"unix://{raw}", f"unix://{raw}", Path(raw))
    parts = urlsplit(listen)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"endpoint must be http(s)://HOST:PORT or unix:///PATH, got: {listen}")
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    port = parts.port if parts.port is not None else 8080
    return Listen(f"{shown}:{port}", f"{parts.scheme}://{shown}:{{port}}")


def make_state_dir(state_dir: str | None) -> Path:
    """Create the private (0700) state directory: sockets, logs, per-executor directories."""
    if state_dir is None:
        return Path(tempfile.mkdtemp(prefix="flame-embedded-"))
    path = Path(state_dir).resolve()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def remove_state(state_dir: Path, owned: bool) -> None:
    """Remove what the embedded Flame made in ``state_dir``, then the directory if it is empty."""
    if owned:
        shutil.rmtree(state_dir, ignore_errors=True)
        return
    for name in ("sock", "work", "logs", "cache", "apps", "tasks"):
        shutil.rmtree(state_dir / name, ignore_errors=True)
    for name in (FRONTEND_SOCKET, "cache.sock"):
        with contextlib.suppress(FileNotFoundError):
            (state_dir / name).unlink()
    with contextlib.suppress(OSError):
        state_dir.rmdir()  # only if nothing else is left in it


async def serve(
    *,
    listen: str | None,
    working_directory: str,
    state_dir: str | None,
    keep_state: bool,
    parent_pid: int | None,
    on_ready: Callable[[str, dict[str, str]], None],
    tls: tuple[bytes, bytes] | None = None,
) -> None:
    """Serve the Frontend until SIGTERM/SIGINT (or the parent's death), then release everything.

    Parameters
    ----------
    listen
        ``http://HOST:PORT`` (port 0 picks a free one) or ``unix:///path``; None for a
        Unix socket in the state directory.
    working_directory
        Absolute working directory of flame-magic's runner (application ``flame-magic``).
    state_dir
        Directory for sockets, logs and per-executor directories; None for a fresh one.
    keep_state
        Leave the state directory (logs included) behind on exit.
    parent_pid
        Stop when this process is no longer our parent (None: never).
    on_ready
        Called once the server accepts calls, with the endpoint and the variables that name
        the object cache (``FLAME_CACHE_ENDPOINT``, ``FLAME_CACHE_STORAGE``; none if it
        could not start).
    tls
        PEM private key and certificate chain, for an ``https://`` listen endpoint.
    """
    owned = state_dir is None
    root = make_state_dir(state_dir)
    executor.install_exit_hook()
    manager = SessionManager(root, working_directory)
    # No size options: gRPC's default 4 MiB receive limit applies, as on Flame. No
    # SO_REUSEPORT: a second Flame on a taken port must fail, not share the port.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    protocol.add_FrontendServicer_to_server(FrontendService(manager), server)
    where: Listen | None = None
    bound = False
    orphaned = asyncio.Event()
    early = not listen and await _start_runner_early(manager, root)
    with _private_files():
        cache = _start_cache(root)
    cache_variables = {}
    if early and (
        cache is None
        or (cache.endpoint, str(cache.storage)) != (manager.cache_endpoint, manager.cache_storage)
    ):
        manager.spares.drop(DEFAULT_NAME)  # started with a cache that is not there
        early = False
    manager.cache_endpoint = manager.cache_storage = None
    if cache is not None:
        manager.cache_endpoint, manager.cache_storage = cache.endpoint, str(cache.storage)
        cache_variables = {"FLAME_CACHE_ENDPOINT": cache.endpoint, "FLAME_CACHE_STORAGE": str(cache.storage)}
    try:
        where = parse_listen(listen, root)
        if (tls is not None) != where.endpoint.startswith("https:"):
            raise ValueError("an https:// endpoint needs --tls-cert and --tls-key, and only it takes them")
        if where.unix_path is not None:
            _remove_stale_socket(where.unix_path)
        with _private_files():
            if tls is not None:
                port = server.add_secure_port(where.bind, grpc.ssl_server_credentials([tls]))
            else:
                port = server.add_insecure_port(where.bind)
        if not port:
            raise RuntimeError(f"cannot listen on {where.bind}")
        bound = True
        manager.endpoint = where.endpoint.format(port=port)
        if not early:
            manager.register_default_applications()
            manager.start_spare(DEFAULT_NAME)  # the notebook's first cell will want it
        await server.start()
        _make_private(where.unix_path, cache)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stop.set)
        # Watching on through the shutdown: a parent that dies meanwhile cuts it short.
        watcher = asyncio.create_task(_watch_parent(stop, parent_pid, orphaned)) if parent_pid else None
        log.info("serving flame.v1.Frontend on %s (state in %s)", manager.endpoint, root)
        on_ready(manager.endpoint, cache_variables)
        await stop.wait()
        log.info("stopping")
        if not orphaned.is_set():
            await server.stop(0.2)
            await manager.shutdown()
        if watcher is not None:
            watcher.cancel()
    finally:
        executor.kill_all_groups()
        if cache is not None:
            from flame_magic.embedded import cache_server

            cache_server.stop(cache, timeout=0.2 if orphaned.is_set() else 2.0)
        if bound and where is not None and where.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                where.unix_path.unlink()
        if not keep_state:
            remove_state(root, owned)


@contextlib.contextmanager
def _private_files() -> Iterator[None]:
    """Sockets made meanwhile are the user's only (0600) from their creation, like the runners'."""
    umask = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(umask)


def _make_private(frontend: Path | None, cache: CacheServer | None) -> None:
    """Exactly 0600 on the Frontend and cache sockets, whatever the umask let through."""
    paths = [frontend] if frontend is not None else []
    if cache is not None and cache.endpoint.startswith("grpc+unix://"):
        paths.append(Path(cache.endpoint[len("grpc+unix://") :]))
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path, 0o600)


async def _start_runner_early(manager: SessionManager, state_dir: Path) -> bool:
    """Register the applications and start flame-magic's runner ahead of its session (see
    ``spare``) before the object cache starts, with the endpoints both will have: the cache's
    start (importing pyarrow, half a second on a busy machine) and the runner's overlap."""
    manager.endpoint = parse_listen(None, state_dir).endpoint
    manager.cache_endpoint = f"grpc+unix://{state_dir / 'cache.sock'}"  # as cache_server.start makes them
    manager.cache_storage = str(state_dir / "cache")
    manager.register_default_applications()
    starting = manager.start_spare(DEFAULT_NAME)
    if starting is not None:
        await starting  # forked: it starts while this process goes on
    return True


def _start_cache(state_dir: Path) -> CacheServer | None:
    """Start the object cache in the state directory; without it, large values are refused."""
    try:
        from flame_magic.embedded import cache_server

        return cache_server.start(state_dir)
    except Exception as exc:  # pyarrow missing or broken: Flame still runs cells
        log.warning("no object cache (values over 4 MiB cannot travel): %s", exc)
        return None


def _remove_stale_socket(path: Path) -> None:
    """Remove a Unix socket left by a dead server; refuse one that is still served."""
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: a leftover
        return
    finally:
        probe.close()
    raise RuntimeError(f"{path} is in use by another server")


async def _watch_parent(stop: asyncio.Event, parent: int, orphaned: asyncio.Event) -> None:
    # Polling getppid, not PR_SET_PDEATHSIG: the latter fires when the *thread* that started
    # us exits, and a kernel may start us from a short-lived thread.
    while os.getppid() == parent:
        await asyncio.sleep(PARENT_POLL_INTERVAL)
    log.info("parent process %d is gone; stopping at once", parent)
    # Nobody is left to wait for: no goodbyes to the runners, which go now, and we with them.
    executor.kill_all_groups()
    orphaned.set()
    stop.set()
