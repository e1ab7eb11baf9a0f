"""What travels: which modules are the notebook's own, the runner's importer, and the one-line refusals."""

from __future__ import annotations

import ast
import collections
import importlib
import importlib.machinery
import json
import sys
import traceback

import pytest

from flame_magic import codec
from flame_magic.modules import Environment, Locator, imported_tops, problems
from flame_magic.protocol import cell
from flame_magic.transfer import Shipper
from flame_magic_runner.modules import Source, SourceImporter


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A folder on sys.path, as a notebook puts one; its modules are forgotten afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


def test_a_module_in_a_folder_on_sys_path_is_local_and_installed_ones_are_not(folder):
    (folder / "mine.py").write_text("import json\n")
    (folder / "kit").mkdir()
    (folder / "kit" / "__init__.py").write_text("")
    (folder / "kit" / "tools.py").write_text("")
    (folder / "kit" / "table.csv").write_text("a,b\n")
    locator = Locator()
    mine = locator.local("mine")
    assert mine is not None and mine.files == [("mine", folder / "mine.py", False)]
    kit = locator.local("kit")
    assert kit is not None
    assert kit.files == [
        ("kit", folder / "kit" / "__init__.py", True),
        ("kit.tools", folder / "kit" / "tools.py", False),
    ]
    assert kit.left_out == [folder / "kit" / "table.csv"]
    for name in ("json", "numpy", "flame_magic", "flame_magic_runner", "cloudpickle", "no_such_module_here"):
        assert locator.local(name) is None, name
    numpy = locator.requirement("numpy")
    assert numpy is not None and numpy.version == importlib.import_module("numpy").__version__
    assert locator.requirement("json") is None and locator.requirement("cloudpickle") is None


def test_a_cell_takes_the_modules_it_imports_and_those_they_import(folder):
    (folder / "first.py").write_text("import second\n\ndef later():\n    import scipy\n")
    (folder / "second.py").write_text("import IPython\nX = 1\n")
    (folder / "third.py").write_text("")
    request = cell.CellRequest()
    tree = ast.parse("import first\nimport numpy as np")
    Environment().attach(request, tree, codec.ModulesUsed(), Shipper(None, None))
    assert [m.name for m in request.modules] == ["first", "second"]
    assert request.modules[1].source == b"import IPython\nX = 1\n"
    assert request.modules[1].filename == str(folder / "second.py")
    # What the cell and the modules it takes along import (when imported) must be on the runner.
    assert sorted(r.distribution.lower() for r in request.requires) == ["ipython", "numpy"]


def test_pickles_name_the_modules_of_what_they_hold():
    def uses_a_module_when_called():
        import some_helper  # noqa: F401

    with codec.record_modules() as used:
        codec.dumps([collections.OrderedDict(), uses_a_module_when_called])
    assert "collections" in used.modules
    assert "some_helper" in used.names


def test_the_importer_imports_sent_sources_by_name_and_takes_edits():
    importer = SourceImporter()
    sys.meta_path.insert(0, importer)
    try:
        importer.update(
            [
                Source(
                    "sentpkg", "d1", b"from .inner import value\n", "/nb/sentpkg/__init__.py", package=True
                ),
                Source("sentpkg.inner", "d2", b"def value():\n    return 1\n", "/nb/sentpkg/inner.py"),
            ]
        )
        import sentpkg

        assert sentpkg.value() == 1 and sentpkg.__file__ == "/nb/sentpkg/__init__.py"
        assert importer.has("sentpkg.inner", "d2") and not importer.has("sentpkg.inner", "d3")
        replaced = importer.update(
            [
                Source(
                    "sentpkg.inner",
                    "d3",
                    b"def value():\n    raise ValueError('new')\n",
                    "/nb/sentpkg/inner.py",
                )
            ]
        )
        assert replaced == ["sentpkg.inner"] and "sentpkg" not in sys.modules
        import sentpkg  # noqa: F811 - the new source

        with pytest.raises(ValueError) as caught:
            sentpkg.value()
        text = "".join(traceback.format_exception(caught.value))
        assert 'File "/nb/sentpkg/inner.py", line 2' in text and "raise ValueError('new')" in text
    finally:
        sys.meta_path.remove(importer)
        for name in ("sentpkg", "sentpkg.inner"):
            sys.modules.pop(name, None)


def test_a_mismatch_or_a_missing_package_is_one_line_with_the_way_out():
    requires = [
        cell.Requirement(module="a", distribution="alpha", version="1.0"),
        cell.Requirement(module="b", distribution="Beta", version="2.0"),
        cell.Requirement(module="c", distribution="gamma", version="3.0"),
    ]
    runner = {"alpha": "1.0", "Beta": "2.1"}
    line = problems(requires, lambda r: runner.get(r.distribution))
    assert "\n" not in line and line.startswith("Not run: Beta is 2.0 in the notebook but 2.1 on the runner")
    assert "`--pip Beta==2.0`" in line and "the runner lacks gamma (3.0 in the notebook)" in line
    assert "alpha" not in line
    assert problems(requires[:1], lambda r: "1.0") == ""


def fake_distribution(site, name, top, editable):
    """A distribution's metadata as pip leaves it (direct_url.json says whether it is editable)."""
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "top_level.txt").write_text(f"{top}\n")
    (info / "RECORD").write_text("")
    url = {"url": "file:///src", "dir_info": {"editable": True}} if editable else {"url": "file:///x.whl"}
    (info / "direct_url.json").write_text(json.dumps(url))


def test_an_editable_install_travels_and_a_regular_one_is_required(folder):
    source = folder / "src"
    for top in ("ownproject", "theirproject"):
        (source / top).mkdir(parents=True)
        (source / top / "__init__.py").write_text("")
    sys.path.insert(0, str(source))
    try:
        fake_distribution(folder, "ownproject", "ownproject", editable=True)
        fake_distribution(folder, "theirproject", "theirproject", editable=False)
        locator = Locator()
        own = locator.local("ownproject")
        assert own is not None and own.files == [("ownproject", source / "ownproject" / "__init__.py", True)]
        assert locator.requirement("ownproject") is None
        assert locator.local("theirproject") is None
        their = locator.requirement("theirproject")
        assert their is not None and (their.distribution, their.version) == ("theirproject", "0.1")
    finally:
        sys.path.remove(str(source))


def test_compiled_extensions_stay_behind_with_one_notice(folder):
    (folder / "fastkit").mkdir()
    (folder / "fastkit" / "__init__.py").write_text("")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    (folder / "fastkit" / f"_speedups{suffix}").write_bytes(b"")
    notes = []
    environment = Environment(notify=notes.append)
    for _ in range(2):
        request = cell.CellRequest()
        environment.attach(request, ast.parse("import fastkit"), codec.ModulesUsed(), Shipper(None, None))
        assert [m.name for m in request.modules] == ["fastkit"]
    assert len(notes) == 1 and f"_speedups{suffix}" in notes[0] and "install it on the executors" in notes[0]


def test_only_imports_that_surely_run_are_required():
    tree = ast.parse(
        "import numpy\ntry:\n    import pandas\nexcept ImportError:\n    pandas = None\n"
        "def later():\n    import scipy\nif True:\n    from json import dumps\n"
    )
    assert imported_tops(tree, surely=True) == ["numpy", "json"]
    assert set(imported_tops(tree)) == {"numpy", "pandas", "scipy", "json"}


def test_the_runner_refuses_before_unpickling_and_reports_its_packages_once():
    from flame_magic_runner.evaluate import Evaluator

    evaluator = Evaluator()
    try:
        numpy = importlib.import_module("numpy")
        request = cell.CellRequest(
            header=codec.local_header(),
            source="from inlined import WHERE\nWHERE",
            modules=[
                cell.Module(
                    name="inlined", digest="d1", source=b"WHERE = 'sent inline'\n", filename="/nb/inlined.py"
                )
            ],
            requires=[cell.Requirement(module="numpy", distribution="numpy", version=numpy.__version__)],
        )
        first = evaluator.evaluate(request)
        assert not first.HasField("refused") and not first.HasField("error")
        assert json.loads(first.result.data_json)["text/plain"] == "'sent inline'"
        assert {p.name: p.version for p in first.packages}["numpy"] == numpy.__version__
        # A value the runner cannot have loaded: the refusal comes first, nothing is unpickled.
        request.requires[0].version = "0.0.1"
        request.inputs.add(name="x", pickle=b"not a pickle")
        second = evaluator.evaluate(request)
        assert second.refused.startswith(f"Not run: numpy is 0.0.1 in the notebook but {numpy.__version__}")
        assert not second.HasField("error") and len(second.packages) == 0
    finally:
        evaluator.close()
        sys.modules.pop("inlined", None)


def test_a_local_file_that_shadows_an_installed_name_is_the_notebooks_own(folder, monkeypatch):
    mine, site = folder / "mine", folder / "site"
    (mine / "shadowed").mkdir(parents=True)
    (mine / "shadowed" / "__init__.py").write_text("")
    (site / "shadowed").mkdir(parents=True)
    (site / "shadowed" / "__init__.py").write_text("")
    fake_distribution(site, "shadowed", "shadowed", editable=False)
    monkeypatch.syspath_prepend(str(site))
    locator = Locator()
    assert locator.distributions("shadowed") == ["shadowed"]
    assert (
        locator.local("shadowed") is None and locator.requirement("shadowed") is not None
    )  # the installed one
    monkeypatch.syspath_prepend(str(mine))
    importlib.invalidate_caches()
    locator = Locator()
    assert locator.local("shadowed") is not None and locator.requirement("shadowed") is None  # the local one
