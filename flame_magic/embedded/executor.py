"""The executor side of the embedded Flame: application processes, as Flame's Host shim runs them.

One :class:`Instance` is one application process bound to one session. It is launched from
the application's ``command`` and ``arguments`` in its own process group, is given a Unix
socket path in ``FLAME_INSTANCE_ENDPOINT`` on which it serves the ``flame.v1.Instance``
service, and is driven through ``OnSessionEnter``, ``OnTaskInvoke`` (one task at a time)
and ``OnSessionLeave``, after which its process group gets SIGTERM. Processes are never
reused across sessions. This module knows nothing of scheduling; the session manager
decides when to launch, use and release instances.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import re
import shutil
import signal
from collections.abc import Mapping
from pathlib import Path

import grpc

from flame_magic import protocol
from flame_magic.embedded.installer import PATH_VARIABLES, Installer, InstallError

log = logging.getLogger(__name__)

types = protocol.types

# Process groups launched and not yet reaped. Module-global on purpose: the atexit hook and
# signal handlers must reach them even when the event loop is already gone.
_LIVE_GROUPS: set[int] = set()

BIND_TIMEOUT = 30.0  # seconds for a new process to create its socket (Flame waits similarly)
TERM_GRACE = 2.0  # seconds between SIGTERM and SIGKILL
LOG_TAIL_LINES = 20

# Unix-socket reconnects are cheap; the default 1 s backoff would stall the first call when
# the socket file appears a moment before the process listens on it. No size limits are set:
# gRPC's default 4 MiB receive limit applies, as on Flame's executor manager.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 10),
    ("grpc.min_reconnect_backoff_ms", 10),
    ("grpc.max_reconnect_backoff_ms", 200),
]

# Variables the embedded Flame does not provide; inherited values would point the process
# at some other cluster's cache or CA.
_NOT_INHERITED = ("FLAME_CACHE_ENDPOINT", "FLAME_CACHE_STORAGE", "FLAME_CA_FILE", "FLAME_INSTANCE_ENDPOINT")

# Flame's bind result codes (the number in the bind-failure event's message).
BIND_INSTALL_FAILED = 10
BIND_SHIM_FAILED = 11
BIND_ENTER_FAILED = 12

_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")

# FLAME_EMBEDDED_FAULTS=flame-0.6 makes the embedded Flame fail as Flame 0.6 does, so that a
# client's handling of a real cluster can be tested here: a process that exits before its
# socket leaves its executor Binding, and one that dies keeps its session (see session_manager).
FAULTS_VARIABLE = "FLAME_EMBEDDED_FAULTS"
FLAME_06 = "flame-0.6"


def like_flame_06() -> bool:
    """Whether to fail as Flame 0.6 does (off unless ``FLAME_EMBEDDED_FAULTS=flame-0.6``)."""
    return os.environ.get(FAULTS_VARIABLE, "") == FLAME_06


def kill_all_groups(sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to every launched process group that has not been reaped yet."""
    for pgid in list(_LIVE_GROUPS):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


def install_exit_hook() -> None:
    """Kill every launched process group when this interpreter exits, however it exits."""
    atexit.register(kill_all_groups)


def expand_vars(text: str, *envs: Mapping[str, str]) -> str:
    """Expand ``${VAR}`` and ``$VAR`` from the first mapping that defines VAR.

    Unknown variables are left as written, as Flame's shell-style expansion does.
    """

    def lookup(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        for env in envs:
            if name in env:
                return env[name]
        return match.group(0)

    return _VAR.sub(lookup, text)


def describe_exit(returncode: int | None) -> str:
    """Say how a process ended, in words (exit code or signal name)."""
    if returncode is None:
        return "still running"
    if returncode >= 0:
        return f"exit code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"killed by {name} ({-returncode})"


def log_tail(path: Path, lines: int = LOG_TAIL_LINES, max_bytes: int = 16384) -> str:
    """Return the last ``lines`` lines of a log file (empty if there is none)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


class BindError(Exception):
    """The process could not be bound to the session (start, socket or OnSessionEnter failed)."""

    def __init__(self, message: str, return_code: int = BIND_SHIM_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.return_code = return_code


class InvokeError(Exception):
    """OnTaskInvoke failed at the transport level.

    ``lost`` is True when the process died or cannot be reached any more, so the instance
    must be discarded; False when the process is alive and only this call failed (for
    example an output over gRPC's 4 MiB limit).
    """

    def __init__(self, message: str, lost: bool) -> None:
        super().__init__(message)
        self.message = message
        self.lost = lost


class Instance:
    """One application process bound to one session (Flame's executor with a Host shim).

    Parameters
    ----------
    executor_id
        Identifier shown by ``ListExecutor``; names the socket, log and work directory.
    app_name, app_spec
        The application to run.
    session_id, common_data
        The session this process is bound to, passed in ``OnSessionEnter``.
    state_dir
        The embedded Flame's private (0700) state directory.
    frontend_endpoint
        This Flame's endpoint, given to the process as ``FLAME_ENDPOINT``.
    cache_endpoint, cache_storage
        This Flame's object cache and its storage directory, given to the process as
        ``FLAME_CACHE_ENDPOINT`` (as Flame does) and ``FLAME_CACHE_STORAGE`` (flamepy's
        variable for a storage the process shares), when there is one.
    installer
        Installs the application (its ``url``) before the process starts; None: nothing to install.
    """

    def __init__(
        self,
        *,
        executor_id: str,
        app_name: str,
        app_spec: protocol.types.ApplicationSpec,
        session_id: str,
        common_data: bytes | None,
        state_dir: Path,
        frontend_endpoint: str,
        cache_endpoint: str | None = None,
        cache_storage: str | None = None,
        installer: Installer | None = None,
    ) -> None:
        self.id = executor_id
        self.app_name = app_name
        self.app_spec = app_spec
        self.session_id = session_id
        self.common_data = common_data
        self.frontend_endpoint = frontend_endpoint
        self.cache_endpoint = cache_endpoint
        self.cache_storage = cache_storage
        self.installer = installer
        self.installed: dict[str, str] = {}  # what the installation adds to the environment
        self.state: protocol.types.ExecutorState = types.ExecutorBinding
        self.socket_path = state_dir / "sock" / f"{executor_id}.sock"
        self.log_path = state_dir / "logs" / f"{executor_id}.log"
        self.own_dir = state_dir / "work" / executor_id
        self.pid: int | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._exit_watch: asyncio.Task[int] | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: protocol.InstanceAsyncStub | None = None
        self._call: grpc.aio.UnaryUnaryCall | None = None
        self._released = False
        self._late_kill: asyncio.Task[None] | None = None

    # -- process ---------------------------------------------------------------------------

    @property
    def returncode(self) -> int | None:
        """The process's exit status once it has been reaped, else None."""
        return None if self._proc is None else self._proc.returncode

    def environment(self) -> dict[str, str]:
        """Build the process environment as Flame's Host shim does, on top of ours."""
        base = os.environ
        env = {k: v for k, v in base.items() if k not in _NOT_INHERITED}
        app_env = {e.name: expand_vars(e.value, base) for e in self.app_spec.environments}
        env.update(app_env)
        for name, value in self.installed.items():
            # As Flame: an installation's paths go in front; its other variables yield to the app's.
            if name in PATH_VARIABLES and env.get(name):
                env[name] = os.pathsep.join([value, env[name]])
            elif name not in app_env:
                env[name] = value
        level = base.get("FLAME_LOG") or base.get("RUST_LOG") or "info"
        env["RUST_LOG"] = base.get("RUST_LOG", level)
        env["FLAME_LOG"] = level
        env["FLAME_INSTANCE_ENDPOINT"] = str(self.socket_path)
        env["FLAME_ENDPOINT"] = self.frontend_endpoint
        if self.cache_endpoint:
            env["FLAME_CACHE_ENDPOINT"] = self.cache_endpoint
            if self.cache_storage:
                env["FLAME_CACHE_STORAGE"] = self.cache_storage
        env["HOME"] = app_env.get("HOME") or base.get("HOME") or os.path.expanduser("~")
        tmp = str(self.own_dir / "tmp")
        for name in ("TMPDIR", "TEMP", "TMP"):
            env[name] = app_env.get(name, tmp)
        return env

    def command_line(self, env: Mapping[str, str]) -> list[str]:
        """The command and arguments with ``${VAR}`` expanded from the process environment."""
        spec = self.app_spec
        return [expand_vars(spec.command, env), *(expand_vars(a, env) for a in spec.arguments)]

    async def start(self) -> None:
        """Start the process now, before its session is known (see :mod:`flame_magic.embedded.spare`)."""
        if self._proc is None:
            await self._spawn()

    def adopt(self, session_id: str, common_data: bytes | None) -> None:
        """Give a process started ahead (:meth:`start`) the session it will bind."""
        self.session_id, self.common_data = session_id, common_data

    async def _spawn(self) -> None:
        if self.installer is not None:
            try:
                self.installed = await self.installer.install(
                    self.app_name, self.app_spec, self.cache_endpoint, self.cache_storage
                )
            except InstallError as err:
                raise BindError(f"application installation failed: {err}", BIND_INSTALL_FAILED) from None
        if not self.app_spec.command:
            # Flame starts the empty command, which fails: the bind fails, and so on each retry.
            raise BindError(
                f"shim creation failed: application <{self.app_name}> has no command to start",
                BIND_SHIM_FAILED,
            )
        env = self.environment()
        argv = self.command_line(env)
        (self.own_dir / "tmp").mkdir(parents=True, exist_ok=True)
        self.socket_path.parent.mkdir(mode=0o700, exist_ok=True)
        self.log_path.parent.mkdir(mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        cwd = self.app_spec.working_directory or str(self.own_dir)
        with open(self.log_path, "ab") as logf:
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=logf,
                    stderr=asyncio.subprocess.STDOUT,
                    cwd=cwd,
                    env=env,
                    start_new_session=True,  # own process group, so the whole tree can be killed
                )
            except OSError as err:
                raise BindError(f"failed to start {argv!r} in {cwd}: {err}") from err
        self.pid = self._proc.pid
        _LIVE_GROUPS.add(self._proc.pid)
        self._exit_watch = asyncio.create_task(self._watch_exit(self._proc))
        if self._released:  # released while the spawn was under way: nobody else will end it
            self._late_kill = asyncio.create_task(self._terminate(0))
        which = f"for session {self.session_id}" if self.session_id else "ahead of its session"
        log.info("executor %s: started pid %d %s: %s", self.id, self.pid, which, argv)

    async def _watch_exit(self, proc: asyncio.subprocess.Process) -> int:
        code = await proc.wait()
        if self._call is not None:
            # A grandchild holding the connection open must not hide the death.
            self._call.cancel()
        if not self._released:
            log.info("executor %s: pid %d ended (%s)", self.id, proc.pid, describe_exit(code))
        return code

    def _died_message(self, what: str) -> str:
        tail = log_tail(self.log_path)
        text = (
            f"The application process of executor <{self.id}> (application <{self.app_name}>, "
            f"pid {self.pid}) died {what}: {describe_exit(self.returncode)}."
        )
        if tail:
            text += f"\nLast lines of its log {self.log_path}:\n{tail}"
        else:
            text += f"\nIts log {self.log_path} is empty."
        return text

    # -- Instance service ------------------------------------------------------------------

    async def bind(self, timeout: float = BIND_TIMEOUT) -> None:
        """Launch the process, wait for its socket and call ``OnSessionEnter``.

        Raises
        ------
        BindError
            With a message saying why; the caller records it and releases the instance.
        """
        if self._proc is None:  # else started ahead as a spare
            await self._spawn()
        assert self._proc is not None and self._exit_watch is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.001
        while not self.socket_path.exists():
            if self._proc.returncode is not None:
                if like_flame_06():
                    await asyncio.Event().wait()  # Flame 0.6 waits for the socket for ever, silently
                raise BindError(self._died_message("before creating its socket"))
            if loop.time() > deadline:
                raise BindError(
                    f"The application process of executor <{self.id}> (pid {self.pid}) did not "
                    f"create its socket {self.socket_path} within {timeout:.0f} s. "
                    f"See its log {self.log_path}."
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.02)
        self._channel = grpc.aio.insecure_channel(f"unix:{self.socket_path}", options=_CHANNEL_OPTIONS)
        self._stub = protocol.InstanceStub(self._channel)
        spec = self.app_spec
        app_ctx = protocol.instance.ApplicationContext(
            name=self.app_name,
            shim=spec.shim,
            image=spec.image if spec.HasField("image") else None,
            command=spec.command if spec.HasField("command") else None,
            working_directory=spec.working_directory if spec.HasField("working_directory") else None,
            url=spec.url if spec.HasField("url") else None,
            installer=spec.installer if spec.HasField("installer") else None,
        )
        ctx = protocol.instance.SessionContext(
            session_id=self.session_id, application=app_ctx, common_data=self.common_data
        )
        call = self._stub.OnSessionEnter(ctx, wait_for_ready=True)
        self._call = call
        try:
            result = await call
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as err:
            if isinstance(err, asyncio.CancelledError) and self.returncode is None:
                raise  # our own cancellation (session closed), not a death
            if await self._exited_within(2.0):
                raise BindError(self._died_message("during OnSessionEnter")) from None
            raise BindError(f"OnSessionEnter failed: {_rpc_error_text(err)}", BIND_ENTER_FAILED) from None
        finally:
            self._call = None
        if result.return_code != 0:
            detail = result.message or f"return code {result.return_code}"
            raise BindError(f"on_session_enter failed: {detail}", BIND_ENTER_FAILED)
        self.state = types.ExecutorBound

    async def invoke(self, task_id: str, session_id: str, data: bytes | None) -> protocol.types.TaskResult:
        """Run one task through ``OnTaskInvoke``.

        Raises
        ------
        InvokeError
            When the call failed at the transport level; ``lost`` says whether the process
            died or became unreachable.
        """
        assert self._stub is not None
        call = self._stub.OnTaskInvoke(
            protocol.instance.TaskContext(task_id=task_id, session_id=session_id, input=data)
        )
        self._call = call
        try:
            return await call
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as err:
            if isinstance(err, asyncio.CancelledError) and self.returncode is None:
                raise
            what = f"while running task <{session_id}/{task_id}>"
            unreachable = not isinstance(err, grpc.aio.AioRpcError) or err.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.CANCELLED,
            )
            if await self._exited_within(2.0 if unreachable else 0.05):
                raise InvokeError(self._died_message(what), lost=True) from None
            if unreachable:
                raise InvokeError(
                    f"Lost contact with the application process of executor <{self.id}> "
                    f"(pid {self.pid}) {what}: {_rpc_error_text(err)}. See its log {self.log_path}.",
                    lost=True,
                ) from None
            raise InvokeError(f"OnTaskInvoke failed: {_rpc_error_text(err)}", lost=False) from None
        finally:
            self._call = None

    async def _exited_within(self, seconds: float) -> bool:
        if self._exit_watch is None:
            return False
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._exit_watch), seconds)
        return self.returncode is not None

    # -- release ---------------------------------------------------------------------------

    async def release(
        self, leave: bool = True, leave_timeout: float = 5.0, grace: float = TERM_GRACE
    ) -> None:
        """Unbind: ``OnSessionLeave`` (if bound), SIGTERM to the group, SIGKILL after ``grace``.

        Idempotent. Leaves the log file, removes the socket and the per-executor directory.
        """
        if self._released:
            return
        self._released = True
        if leave and self.state == types.ExecutorBound and self._stub is not None and self.returncode is None:
            self.state = types.ExecutorUnbinding
            try:
                await self._stub.OnSessionLeave(types.EmptyRequest(), timeout=leave_timeout)
            except grpc.aio.AioRpcError as err:
                log.info("executor %s: OnSessionLeave failed: %s", self.id, _rpc_error_text(err))
        self.state = types.ExecutorReleasing
        await self._terminate(grace)
        if self._channel is not None:
            await self._channel.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        shutil.rmtree(self.own_dir, ignore_errors=True)
        self.state = types.ExecutorReleased
        log.info("executor %s: released (session %s)", self.id, self.session_id)

    async def _terminate(self, grace: float) -> None:
        proc = self._proc
        if proc is None:
            return
        pgid = proc.pid
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
            if not await self._exited_within(grace):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
        assert self._exit_watch is not None
        await asyncio.shield(self._exit_watch)
        # Children the leader left behind still carry its group id.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        _LIVE_GROUPS.discard(pgid)

    def to_proto(self, node: str, resreq: protocol.types.ResourceRequirement) -> protocol.types.Executor:
        """This instance as a Flame ``Executor`` message."""
        return types.Executor(
            metadata=types.Metadata(id=self.id, name=self.id),
            spec=types.ExecutorSpec(node=node, resreq=resreq, shim=self.app_spec.shim),
            status=types.ExecutorStatus(state=self.state, session_id=self.session_id),
        )


def _rpc_error_text(err: BaseException) -> str:
    if isinstance(err, grpc.aio.AioRpcError):
        return f"{err.code().name}: {err.details()}"
    return type(err).__name__
