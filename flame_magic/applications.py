"""Telling Flame applications apart: flame-magic's runner, Flame's stock ``flmrun``, or neither.

Recognition only, from an application's spec as Flame reports it: the engine picks its
backend and the automatic application with it, ``%flame status`` describes with it, and
:mod:`flame_magic.deploy` (which builds and registers the runner) updates only what it
recognises as ours.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flame_magic import protocol
from flame_magic.protocol import types

if TYPE_CHECKING:
    from flame_magic.client import FlameClient

#: The name flame-magic's runner is registered under (embedded Flame, ``%flame deploy``).
DEFAULT_NAME = "flame-magic"
RUNNER_MODULE = "flame_magic_runner"
# What flame-magic 0.1 registered (``-m runner``): still recognised, and updated by deploy.
OLD_RUNNER_MODULE = "runner"
STOCK_RUNNER_MODULE = "flamepy.runner.runpy"


def _mentions(spec: types.ApplicationSpec, module: str) -> bool:
    words = [spec.command, *spec.arguments]
    return any(module in word.split() or word.endswith(module) for word in words if word)


def is_stock_runner(spec: types.ApplicationSpec) -> bool:
    """Whether the application runs flamepy's runner (Flame's default ``flmrun``)."""
    return _mentions(spec, STOCK_RUNNER_MODULE)


def is_our_runner(spec: types.ApplicationSpec) -> bool:
    """Whether the application runs flame-magic's runner (``-m flame_magic_runner``, its old
    name ``-m runner``, or ``flame-magic-runner``)."""
    arguments = list(spec.arguments)
    modules = (RUNNER_MODULE, OLD_RUNNER_MODULE)
    module = any(a == "-m" and b in modules for a, b in zip(arguments, arguments[1:], strict=False))
    return module or spec.command.endswith("flame-magic-runner")


def describe(application: types.Application) -> str:
    """A few words on an application for ``%flame status``."""
    notes = []
    if application.status.state == types.Disabled:
        notes.append("disabled")
    if is_our_runner(application.spec):
        notes.append("flame-magic's runner")
    elif is_stock_runner(application.spec):
        notes.append("Flame's flmrun: flamepy's runner")
    return f"{application.metadata.name} ({', '.join(notes)})" if notes else application.metadata.name


def check_application(application: types.Application | None, name: str, endpoint: str) -> str | None:
    """What stops ``name`` from running cells, saying what to do; None when nothing is known to.

    Parameters
    ----------
    application
        What Flame reports for ``name`` (None when it has no such application).
    name, endpoint
        For the message.
    """
    choose = "or choose another application with `%config FlameMagics.application = 'NAME'`"
    if application is None:
        return (
            f"Flame at {endpoint} has no application {name!r}. Run `%flame deploy` to register "
            f"flame-magic's runner there and use it, {choose}."
        )
    if application.status.state == types.Disabled:
        return (
            f"Application {name!r} on Flame at {endpoint} is disabled: ask the cluster's "
            f"administrator to enable it, run `%flame deploy --name NAME` to register flame-magic's "
            f"runner under another name, {choose}."
        )
    return None


def automatic_application(client: FlameClient) -> str:
    """The application automatic selection picks on the Flame behind ``client``.

    flame-magic's runner registered under its own name (:data:`DEFAULT_NAME`, as the
    embedded Flame and ``%flame deploy`` register it) when the Flame has it, else
    Flame's default ``flmrun``.
    """
    ours = client.get_application(DEFAULT_NAME)
    if ours is not None and is_our_runner(ours.spec):
        return DEFAULT_NAME
    return protocol.FLMRUN
