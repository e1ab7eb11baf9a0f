"""What a user reads in a real Jupyter kernel (issue 15): syntax errors, tracebacks, top-level
await, `%flame connect` endpoints, --assign, --map expressions, remote exceptions, usage line."""

from __future__ import annotations

import os
import re

import pytest
import yaml
from jupyter_client.manager import start_new_kernel
from test_kernel import execute, messages_until_idle
from test_live import interrupt_on

from flame_magic.embedded import EmbeddedFlame

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def shown(outputs: list[dict]) -> str:
    """Everything the cell showed, as plain text (tracebacks without colours)."""
    parts = []
    for output in outputs:
        if "traceback" in output:
            parts.append("\n".join(output["traceback"]))
        elif "text" in output:
            parts.append(output["text"])
        elif "data" in output:
            parts.append(output["data"].get("text/plain", ""))
    return ANSI.sub("", "\n".join(parts))


def loaded(kernel):
    _, client = kernel
    reply, _ = execute(client, "%load_ext flame_magic")
    assert reply["status"] == "ok"
    return client


@pytest.fixture
def home_kernel(tmp_path):
    """A kernel with its own HOME, whose ~/.flame/flame.yaml a test may write."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLAME_")}
    manager, client = start_new_kernel(kernel_name="python3", env={**env, "HOME": str(home)})
    yield home, (manager, client)
    client.stop_channels()
    if manager.is_alive():
        manager.shutdown_kernel(now=True)


def write_config(home, current: str, contexts: dict[str, dict]) -> None:
    (home / ".flame").mkdir(exist_ok=True)
    document = {
        "current-context": current,
        "contexts": [{"name": name, **fields} for name, fields in contexts.items()],
    }
    (home / ".flame" / "flame.yaml").write_text(yaml.safe_dump(document))


@pytest.mark.parametrize(
    ("body", "line", "message"),
    [("x = (", "x = (", "'(' was never closed"), ("return 5", "return 5", "'return' outside function")],
)
def test_a_syntax_error_looks_like_a_local_one(kernel, body, line, message):
    client = loaded(kernel)
    reply, outputs = execute(client, f"%%flmrun\n{body}")
    assert reply["status"] == "error" and reply["ename"] == "SyntaxError"
    text = shown(outputs)
    number = reply["execution_count"]
    # The cell's line and a caret, named as IPython names a local cell; nothing of the magic.
    assert f"Cell In[{number}], line 2" in text, text
    assert line in text and "^" in text and f"SyntaxError: {message}" in text, text
    for internal in ("Traceback", "magics.py", "interactiveshell.py", "<string>", "run_cell_magic"):
        assert internal not in text, text
    reply, outputs = execute(client, "%%flmrun\n'next cell runs'")
    assert reply["status"] == "ok" and outputs[-1]["data"]["text/plain"] == "'next cell runs'"


def test_a_syntax_error_raised_on_the_runner_shows_the_cell_not_the_magic(kernel):
    client = loaded(kernel)
    reply, outputs = execute(client, '%%flmrun\nexec("y = (")')
    assert reply["status"] == "error" and reply["ename"] == "SyntaxError"
    text = shown(outputs)
    assert f'File "<flmrun-cell-{reply["execution_count"]}>", line 2' in text, text
    assert "'(' was never closed" in text
    assert "magics.py" not in text and "interactiveshell.py" not in text, text


def test_top_level_await_runs_on_the_runner(kernel):
    client = loaded(kernel)
    _, outputs = execute(client, "import os\nprint(os.getpid())\ndelay = 0.01\nbase = 20")
    kernel_pid = int(outputs[-1]["text"])
    reply, outputs = execute(
        client,
        "%%flmrun\nimport asyncio, os\n"
        "async def double(v):\n    await asyncio.sleep(delay)\n    return 2 * v\n"
        "async def count():\n    yield base\n"
        "value = await double(base)\nresults = [r async for r in count()]\n"
        "(await double(value), os.getpid())",
    )
    assert reply["status"] == "ok", shown(outputs)
    doubled, pid = eval(outputs[-1]["data"]["text/plain"])
    assert doubled == 80 and pid != kernel_pid  # it ran on the runner
    # What it read (delay, base) was sent and what it bound inside awaits came back.
    _, outputs = execute(client, "print(value, results)")
    assert outputs[-1]["text"].strip() == "40 [20]"


def test_connect_takes_host_port_as_an_endpoint_and_lists_the_contexts(home_kernel):
    home, kernel = home_kernel
    client = loaded(kernel)
    reply, outputs = execute(client, "%flame connect 127.0.0.1:1")
    text = shown(outputs)
    assert reply["status"] == "error"
    assert "http://127.0.0.1:1" in text and "flame.yaml" not in text.split(". Check")[0], text
    write_config(home, "lab", {"lab": {"cluster": {"endpoint": "http://lab:8080"}}, "prod": {}})
    reply, outputs = execute(client, "%flame connect production")
    text = shown(outputs)
    assert "'production' is neither an endpoint nor a context" in text and "lab, prod" in text, text
    assert len(text.strip().splitlines()) == 1, text
    reply, outputs = execute(client, "print('still works')")
    assert reply["status"] == "ok" and outputs[-1]["text"].strip() == "still works"


def test_connect_name_with_a_ca_file_uses_that_contexts_cache(home_kernel, tmp_path):
    home, kernel = home_kernel
    with EmbeddedFlame.start() as flame:  # a Flame for the contexts, outliving the kernel's connections
        write_config(
            home,
            "main",
            {
                "main": {
                    "cluster": {"endpoint": flame.endpoint},
                    "cache": {"endpoint": "grpc://127.0.0.1:8"},
                },
                "other": {
                    "cluster": {"endpoint": flame.endpoint},
                    "cache": {"endpoint": "grpc://127.0.0.1:9"},
                },
            },
        )
        client = loaded(kernel)
        ca_file = tmp_path / "ca.pem"
        ca_file.write_text("not read for this endpoint")
        reply, outputs = execute(client, f"%flame connect other --ca-file {ca_file}")
        assert reply["status"] == "ok", shown(outputs)
        magics = "get_ipython().magics_manager.registry['FlameMagics']"
        _, outputs = execute(client, f"print({magics}.connection().cache().endpoint)")
        assert outputs[-1]["text"].strip() == "grpc://127.0.0.1:9"


def test_tracebacks_name_the_cell_by_its_prompt_number(kernel):
    client = loaded(kernel)
    reply, outputs = execute(client, "%%flmrun\nvalue = 1\nvalue / 0")
    number = reply["execution_count"]
    text = shown(outputs)
    assert f'File "<flmrun-cell-{number}>", line 3' in text, text


def test_a_remote_keyboard_interrupt_shows_no_runner_frame(kernel):
    manager, client = kernel
    loaded(kernel)
    msg_id = client.execute("%%flmrun\nimport time\nprint('waiting', flush=True)\ntime.sleep(60)")
    started: list[float] = []
    messages = messages_until_idle(
        client, msg_id, timeout=60, on_message=interrupt_on(manager, "waiting", started)
    )
    errors = [m for m in messages if m["msg_type"] == "error" and m["parent_header"]["msg_id"] == msg_id]
    assert started and errors and errors[0]["content"]["ename"] == "KeyboardInterrupt", errors
    text = ANSI.sub("", "\n".join(errors[0]["content"]["traceback"]))
    assert "time.sleep(60)" in text, text
    for internal in ("live.py", "_on_interrupt", "evaluate.py", "flame_magic_runner"):
        assert internal not in text, text


def test_assign_names_what_the_cell_did_not_bind(kernel):
    client = loaded(kernel)
    reply, outputs = execute(client, "%%flmrun --assign a,b\na = 1")
    assert reply["status"] == "ok"
    lines = [line for line in shown(outputs).splitlines() if "`b`" in line]
    assert len(lines) == 1 and "did not bind `b`" in lines[0], shown(outputs)
    assert "`a`" not in shown(outputs)
    _, outputs = execute(client, "print(a, 'b' in dir())")
    assert outputs[-1]["text"].strip() == "1 False"


def test_map_takes_any_expression_and_iterators_of_unknown_length(kernel):
    client = loaded(kernel)
    reply, outputs = execute(client, "%%flmrun --map x=range(200) --into squares --instances 2\nx * x")
    assert reply["status"] == "ok", shown(outputs)
    _, outputs = execute(client, "print(squares == [x * x for x in range(200)])")
    assert outputs[-1]["text"].strip() == "True"
    execute(client, "offset = 10")
    msg_id = client.execute(
        "%%flmrun --map n=(i + offset for i in range(20)) --into got --instances 1\nn * 2"
    )
    mine = [m for m in messages_until_idle(client, msg_id) if m["parent_header"].get("msg_id") == msg_id]
    first = next(m for m in mine if m["msg_type"] == "display_data")["content"]["data"]
    # No total while the generator runs: a count, and an indeterminate bar.
    assert re.search(r"flmrun --map n=\(i \+ offset for i in range\(20\)\): \d+ done", first["text/plain"]), (
        first
    )
    assert first["text/plain"].split(": ", 1)[1].startswith("0 done"), first
    assert "value=" not in first["text/html"], first
    assert not [m for m in mine if m["msg_type"] == "error"], mine
    _, outputs = execute(client, "print(got)")
    assert outputs[-1]["text"].strip() == str([2 * (i + 10) for i in range(20)])


def test_a_cells_exception_class_keeps_its_builtin_bases(kernel):
    client = loaded(kernel)
    source = "class MyErr(KeyError):\n    pass\nraise MyErr('missing')\n"
    reply, outputs = execute(
        client,
        f"try:\n    get_ipython().run_cell_magic('flmrun', '', {source!r})\n"
        "except LookupError as exc:\n    print('caught', type(exc).__name__, isinstance(exc, KeyError))",
    )
    assert reply["status"] == "ok", shown(outputs)
    assert outputs[-1]["text"].strip() == "caught MyErr True"


def test_remote_exceptions_kept_by_a_map_can_be_sent_to_a_later_cell(kernel):
    client = loaded(kernel)
    reply, outputs = execute(
        client,
        "%%flmrun --map x=[1, 0, 2] --return-exceptions --into out\n"
        "class Odd(ValueError):\n    pass\nif x == 2:\n    raise Odd(x)\n10 // x",
    )
    assert reply["status"] == "ok", shown(outputs)
    reply, outputs = execute(
        client,
        "%%flmrun\n[(type(e).__name__, isinstance(e, ArithmeticError), isinstance(e, ValueError)) "
        "if isinstance(e, Exception) else e for e in out]",
    )
    assert reply["status"] == "ok", shown(outputs)
    assert (
        outputs[-1]["data"]["text/plain"] == "[10, ('ZeroDivisionError', True, False), ('Odd', False, True)]"
    )
    _, outputs = execute(client, "import pickle\nprint(str(pickle.loads(pickle.dumps(out))[1]))")
    assert outputs[-1]["text"].strip() == "integer division or modulo by zero"


def test_usage_line_of_flmrun_has_two_percent_signs(kernel):
    client = loaded(kernel)
    reply, _ = execute(client, "%%flmrun?")
    page = ANSI.sub("", reply["payload"][0]["data"]["text/plain"])
    usage = next(line.strip() for line in page.split("Docstring:", 1)[1].splitlines() if "--assign" in line)
    assert usage.startswith("%%flmrun [--assign NAMES]"), page
