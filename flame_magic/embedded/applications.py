"""The embedded Flame's registered applications, with Flame's checks on registering and changing them."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc

from flame_magic import protocol
from flame_magic.embedded.apps import default_applications
from flame_magic.embedded.errors import FrontendError
from flame_magic.embedded.installer import Installer
from flame_magic.embedded.records import ApplicationRecord, validate_application
from flame_magic.embedded.spare import Spares

log = logging.getLogger(__name__)

types = protocol.types


class Applications:
    """The applications by name; a change forgets the application's installation and spare.

    Parameters
    ----------
    installer, spares
        The session manager's (what it installed, what it started ahead).
    open_sessions
        How many open sessions an application has (it cannot change or go while it has some).
    """

    def __init__(self, installer: Installer, spares: Spares, open_sessions: Callable[[str], int]) -> None:
        self.records: dict[str, ApplicationRecord] = {}
        self._installer = installer
        self._spares = spares
        self._open_sessions = open_sessions

    def register_defaults(self, working_directory: str) -> None:
        """Register Flame's defaults (``flmrun``, ``flmexec``, ``flmping``) and flame-magic's runner.

        They run on this Python: ``flmrun`` is flamepy's runner, installed with flame-magic;
        ``flmexec`` and ``flmping`` are our servers with the task contracts of Flame's; and
        flame-magic's runner is ``flame-magic``, starting in the notebook's directory.
        """
        for name, spec in default_applications(working_directory).items():
            self.register(name, spec)

    def register(self, name: str, spec: protocol.types.ApplicationSpec) -> None:
        """Register a Host-shim application; its working_directory must be absolute."""
        validate_application(name, spec)
        if name in self.records:
            raise FrontendError(grpc.StatusCode.ALREADY_EXISTS, f"application <{name}> already exists")
        self.records[name] = ApplicationRecord(name=name, spec=spec)
        log.info("registered application %s: %s %s", name, spec.command, list(spec.arguments))
        if spec.shim != types.Host:
            log.warning(
                "application %s asks for the %s shim: the embedded Flame has only Host executors, "
                "so the tasks of its sessions stay pending",
                name,
                types.Shim.Name(spec.shim),
            )

    def get(self, name: str) -> ApplicationRecord:
        app = self.records.get(name)
        if app is None:
            raise FrontendError(grpc.StatusCode.NOT_FOUND, f"application <{name}> not found")
        return app

    def _check_no_open_sessions(self, name: str) -> None:
        count = self._open_sessions(name)
        if count:
            raise FrontendError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{count} open sessions in the application <{name}>; close them first",
            )

    def unregister(self, name: str) -> None:
        """Remove an application without open sessions (its closed sessions are the caller's)."""
        self.get(name)
        self._check_no_open_sessions(name)
        del self.records[name]
        self._installer.forget(name)
        self._spares.drop(name)
        log.info("unregistered application %s", name)

    def update(self, name: str, spec: protocol.types.ApplicationSpec) -> None:
        """Replace the spec of an application without open sessions."""
        app = self.get(name)
        validate_application(name, spec)
        self._check_no_open_sessions(name)
        app.spec = spec
        self._installer.forget(name)
        self._spares.drop(name)
