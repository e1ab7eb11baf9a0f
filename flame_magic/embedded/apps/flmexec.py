"""``flmexec`` on the embedded Flame: each task runs a script and answers with what it printed.

Task input (JSON): ``{"language": "python" | "shell", "runtime": optional, "code": "...",
"input": optional list of byte values}``. The script runs in a fresh directory with the input
on its stdin; the task's output is JSON ``{"data": [byte values of its stdout]}``, whatever its
exit status (as Flame's flmexec). ``runtime`` picks the Python (``3.X``) or the shell (``bash``,
``zsh``...).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from flame_magic.embedded.apps import serve

SHELLS = ("sh", "bash", "zsh", "csh", "tcsh", "ksh", "fish")
DEFAULT_SHELL = "bash"


def _python(runtime: str | None) -> str:
    """This Python, or ``python3.X`` from PATH when another version is asked for."""
    version = (runtime or "").strip().removeprefix("python")
    if not version or version == f"{sys.version_info.major}.{sys.version_info.minor}":
        return sys.executable
    found = shutil.which(f"python{version}")
    if found is None:
        raise ValueError(f"Python {version} is not installed on this machine (no python{version} on PATH)")
    return found


def _shell(runtime: str | None) -> str:
    """The shell asked for: a known name, or its path under /bin or /usr/bin."""
    shell = (runtime or "").strip() or DEFAULT_SHELL
    name = os.path.basename(shell)
    if name not in SHELLS or ("/" in shell and shell not in (f"/bin/{name}", f"/usr/bin/{name}")):
        raise ValueError(f"Unsupported shell runtime: {shell} (one of {', '.join(SHELLS)})")
    return shell


def run_script(data: bytes | None) -> bytes:
    """Run one script task."""
    script = json.loads(data) if data else None
    if not isinstance(script, dict) or not isinstance(script.get("code"), str) or "language" not in script:
        raise ValueError('a script task takes a JSON object: {"language": "python"|"shell", "code": "..."}')
    language = str(script["language"]).lower()
    runtime = script.get("runtime")
    if language == "python":
        interpreter, entry = _python(runtime), "main.py"
    elif language == "shell":
        interpreter, entry = _shell(runtime), "main.sh"
    else:
        raise ValueError(f"Unsupported language: {script['language']}")
    stdin = bytes(script.get("input") or [])
    with tempfile.TemporaryDirectory(prefix=f"flmexec-{language}-") as workdir:
        path = os.path.join(workdir, entry)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(script["code"])
        done = subprocess.run(
            [interpreter, path], input=stdin, stdout=subprocess.PIPE, cwd=workdir, check=False
        )
    return json.dumps({"data": list(done.stdout)}).encode()


if __name__ == "__main__":
    sys.exit(serve(run_script))
