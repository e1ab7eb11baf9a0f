"""Two CPU-bound processes beside a benchmark, as on a busy machine (``--load``).

The burners spin until their parent (the benchmark) is gone, so a benchmark that is killed
leaves none behind; :func:`cpu_load` stops them when its block ends.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

BURNERS = 2
BURNER = """
import os, sys
parent = int(sys.argv[1])
while os.getppid() == parent:
    for _ in range(200_000):
        pass
"""


@contextlib.contextmanager
def cpu_load(on: bool = True, burners: int = BURNERS) -> Iterator[None]:
    """Run the block beside ``burners`` CPU-bound processes (none when ``on`` is False)."""
    command = [sys.executable, "-c", BURNER, str(os.getpid())]
    started = [subprocess.Popen(command) for _ in range(burners if on else 0)]
    try:
        yield
    finally:
        for burner in started:
            burner.kill()
            burner.wait()


def load_label(on: bool) -> str:
    return f"under load ({BURNERS} CPU-bound processes beside it)" if on else "quiet"
