"""Execute a notebook under a real Jupyter kernel and print what each cell showed.

Usage: python scripts/run_notebook.py NOTEBOOK [--save]

Exits non-zero if a cell fails that is not tagged ``raises-exception``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def show_output(output: dict) -> str:
    kind = output["output_type"]
    if kind == "stream":
        return output["text"]
    if kind == "error":
        return ANSI.sub("", "\n".join(output["traceback"])) + "\n"
    data = output.get("data", {})
    for mime in ("text/plain", "text/markdown", "text/html"):
        if mime in data:
            text = data[mime]
            return (text if isinstance(text, str) else "".join(text)) + "\n"
    return f"[{', '.join(data)}]\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook")
    parser.add_argument("--save", action="store_true", help="write the outputs back into the notebook")
    args = parser.parse_args()
    notebook = nbformat.read(args.notebook, as_version=4)
    # The kernel starts in the notebook's folder, as in Jupyter (and nbval).
    folder = os.path.dirname(os.path.abspath(args.notebook))
    client = NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        allow_errors=False,
        resources={"metadata": {"path": folder}},
    )
    started = time.perf_counter()
    try:
        client.execute()
        failed = False
    except CellExecutionError as exc:
        print(f"A cell failed:\n{ANSI.sub('', str(exc))}", file=sys.stderr)
        failed = True
    elapsed = time.perf_counter() - started
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        print(f"In [{cell.get('execution_count') or ' '}]:")
        print("    " + cell.source.replace("\n", "\n    "))
        for output in cell.get("outputs", []):
            print(show_output(output), end="")
        print()
    print(f"Executed {args.notebook} in {elapsed:.1f} s")
    if args.save and not failed:
        nbformat.write(notebook, args.notebook)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
