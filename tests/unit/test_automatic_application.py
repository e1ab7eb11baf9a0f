"""FlameMagics.application's automatic choice (``""``), against a fake client.

``Applications`` stands for a Flame's Frontend as :class:`flame_magic.client.FlameClient`
shows it: only ``get_application``, with the applications it was given.
"""

from __future__ import annotations

from flame_magic import deploy
from flame_magic.applications import automatic_application
from flame_magic.protocol import types


class Applications:
    def __init__(self, **specs: types.ApplicationSpec) -> None:
        self.specs = {name.replace("_", "-"): spec for name, spec in specs.items()}

    def get_application(self, name: str) -> types.Application | None:
        spec = self.specs.get(name)
        return None if spec is None else types.Application(spec=spec)


OURS = deploy.runner_spec(python="/usr/bin/python3")
STOCK = types.ApplicationSpec(command="python3", arguments=["-m", "flamepy.runner.runpy"])


def test_flame_magic_when_it_is_our_runner_else_flmrun() -> None:
    assert automatic_application(Applications(flmrun=STOCK, flame_magic=OURS)) == "flame-magic"  # type: ignore[arg-type]
    assert automatic_application(Applications(flmrun=STOCK)) == "flmrun"  # type: ignore[arg-type]
    # Another application that happens to be called flame-magic is not chosen.
    assert automatic_application(Applications(flmrun=STOCK, flame_magic=STOCK)) == "flmrun"  # type: ignore[arg-type]
