"""Which notebook names a cell reads and binds, and how its values are packed."""

from __future__ import annotations

import ast
import threading

import pytest

from flame_magic import codec
from flame_magic.capture import ShipError, analyse, check_size, format_size, pack
from flame_magic.protocol import cell


def names(source: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    result = analyse(ast.parse(source))
    return result.reads, result.binds


def test_reads_before_assignment_and_not_after():
    reads, binds = names("y = x + 1\nz = y * 2\nprint(z)")
    assert reads == ("x", "print")
    assert binds == ("y", "z")


def test_augmented_assignment_reads_the_old_value():
    reads, binds = names("counter += 1")
    assert reads == ("counter",)
    assert binds == ("counter",)
    reads, _ = names("for v in values:\n    total += v")
    # Inside a loop the analysis is conservative: `v` may be sent too, never less.
    assert {"values", "total"} <= set(reads)


def test_rebinding_after_use_still_reads():
    reads, _ = names("a = b\nb = 2")
    assert reads == ("b",)


def test_functions_lambdas_classes_and_comprehensions_read_globals():
    source = (
        "def f(v):\n    return scale * v + offset(v)\n"
        "g = lambda: base\n"
        "class C:\n    k = klass_default\n    def m(self):\n        return method_global\n"
        "squares = [i * factor for i in items]\n"
    )
    reads, binds = names(source)
    assert set(reads) == {"scale", "offset", "base", "klass_default", "method_global", "factor", "items"}
    assert binds == ("f", "g", "C", "squares")


def test_function_parameters_and_locals_are_not_reads():
    reads, _ = names("def f(a, *args, b=1, **kw):\n    c = a + b\n    return c, args, kw\n")
    assert reads == ()


def test_imports_bind_and_are_not_read():
    reads, binds = names("import numpy as np\nfrom os import path\narr = np.ones(3)\npath.join")
    assert reads == ()
    assert binds == ("np", "path", "arr")


def test_conditional_bindings_do_not_hide_notebook_values():
    # The loop may run zero times, so `last` may still be the notebook's.
    reads, binds = names("for item in things:\n    last = item\nprint(last)")
    assert "last" in reads and "things" in reads
    assert "last" in binds


def test_decorators_and_defaults_are_read():
    reads, _ = names("@deco(level)\ndef h(x=default_x):\n    pass")
    assert set(reads) == {"deco", "level", "default_x"}


def test_del_reads_and_does_not_bind():
    reads, binds = names("del old")
    assert reads == ("old",)
    assert binds == ()


def test_pack_sends_present_names_only_and_skips_notebook_machinery():
    namespace = {"x": 41, "get_ipython": object(), "In": [], "f": lambda: 1}
    values = pack(["x", "missing", "get_ipython", "In", "f"], namespace)
    assert [v.name for v in values] == ["x", "f"]
    assert codec.loads(values[0].pickle) == 41
    assert codec.loads(values[1].pickle)() == 1


def test_pack_names_an_unpicklable_value_and_says_what_to_do():
    with pytest.raises(ShipError) as info:
        pack(["lock"], {"lock": threading.Lock()})
    message = str(info.value)
    assert "`lock`" in message and "_thread.lock" in message
    assert "inside the %%flmrun cell" in message


def test_check_size_names_the_largest_values():
    request = cell.CellRequest(
        inputs=[
            cell.Value(name="big", pickle=b"x" * 3000),
            cell.Value(name="small", pickle=b"y" * 10),
        ]
    )
    check_size(request, limit=10_000)
    with pytest.raises(ShipError) as info:
        check_size(request, limit=2000)
    message = str(info.value)
    assert "`big` (2.9 KiB)" in message
    assert message.index("big") < message.index("small")


def test_format_size():
    assert format_size(512) == "512 B"
    assert format_size(3 * 1024 + 512) == "3.5 KiB"
    assert format_size(12 * 1024 * 1024) == "12.0 MiB"
