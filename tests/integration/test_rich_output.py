"""Rich output of %%flmrun cells through a real IPython shell: figures, HTML, file descriptors."""

from __future__ import annotations

import base64


def test_remote_matplotlib_figure_arrives_as_png(run):
    ran = run("%%flmrun --no-assign\nimport matplotlib.pyplot as plt\nplt.plot([1, 4, 9])\nprint('plotted')")

    assert ran.error is None
    assert "plotted" in ran.stdout
    [figure] = [output.data for output in ran.outputs if "image/png" in output.data]
    assert base64.b64decode(figure["image/png"]).startswith(b"\x89PNG")
    assert figure["text/plain"].startswith("<Figure size")


def test_remote_html_table_arrives_as_html(run):
    ran = run(
        "%%flmrun --no-assign\n"
        "import pandas as pd\n"
        "from IPython.display import display\n"
        "display(pd.DataFrame({'a': [1, 2], 'b': ['x', 'y']}))"
    )

    assert ran.error is None
    [table] = [output.data for output in ran.outputs if "text/html" in output.data]
    assert "<table" in table["text/html"] and "<td>x</td>" in table["text/html"]


def test_representation_shows_without_the_objects_library_in_the_notebook(run, shell):
    # A class of a module that exists only on the runner: its value cannot be loaded in
    # the notebook, which shows the runner's rendering instead.
    ran = run(
        "%%flmrun --no-assign\n"
        "import sys, types\n"
        "module = types.ModuleType('runner_only_library')\n"
        "sys.modules['runner_only_library'] = module\n"
        "class Table:\n"
        "    def _repr_html_(self):\n"
        "        return '<table><tr><td>remote</td></tr></table>'\n"
        "    def __repr__(self):\n"
        "        return 'Table()'\n"
        "Table.__module__ = module.__name__\n"
        "module.Table = Table\n"
        "Table()"
    )

    assert ran.error is None
    data, _ = ran.value._repr_mimebundle_()
    assert data == {"text/html": "<table><tr><td>remote</td></tr></table>", "text/plain": "Table()"}


def test_subprocess_output_reaches_the_cell(run):
    ran = run("%%flmrun --no-assign\nimport os, subprocess\nprint('a')\nos.system('echo b')\nprint('c')")

    assert ran.error is None
    assert "a\nb\nc\n" in ran.stdout
