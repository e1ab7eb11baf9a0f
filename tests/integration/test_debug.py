"""``%debug`` and ``%pdb`` on a remote cell's frames, through a real kernel's stdin channel.

The debugger's prompts arrive as ``input_request`` messages on the stdin channel, as in
Jupyter; each is answered with the next command of a list, as a user would type them.
"""

from __future__ import annotations

import re

import pytest

ANSI = re.compile(r"\x1b\[[0-9;]*m")

FAILING = """%%flmrun
import threading

def inner(n):
    secret = {"found": n * 7}
    lock = threading.Lock()
    return n / 0

def outer():
    token = "OUTER-" + "1234"
    return inner(6)

outer()
"""


class Session:
    """Cells run in one kernel, with the debugger's prompts answered from a list."""

    def __init__(self, client) -> None:
        self.client = client

    def run(self, code: str, answers: tuple[str, ...] = ()) -> tuple[dict, str, list[str]]:
        """Run ``code``; return its reply, everything it showed as text, and the prompts seen."""
        texts: list[str] = []
        prompts: list[str] = []
        pending = list(answers)

        def keep(message: dict) -> None:
            content = message["content"]
            if message["msg_type"] == "stream":
                texts.append(content["text"])
            elif message["msg_type"] == "error":
                texts.append("\n".join(content["traceback"]))
            elif message["msg_type"] in ("execute_result", "display_data"):
                texts.append(content["data"].get("text/plain", ""))

        def answer(message: dict) -> None:
            prompts.append(message["content"]["prompt"])
            # A debugger still asking after the last command would hang the test: quit it.
            self.client.input(pending.pop(0) if pending else "q")

        reply = self.client.execute_interactive(
            code, timeout=120, output_hook=keep, allow_stdin=True, stdin_hook=answer
        )
        assert not pending, f"the debugger stopped asking before {pending}; it showed {''.join(texts)}"
        return reply["content"], ANSI.sub("", "".join(texts)), prompts


@pytest.fixture(params=["flame-magic", "flmrun"])
def session(kernel, request):
    """A kernel with the extension loaded, on flame-magic's runner or on Flame's stock flmrun."""
    _, client = kernel
    assert client.stdin_channel.is_alive()
    ran = Session(client)
    reply, text, _ = ran.run("%load_ext flame_magic")
    assert reply["status"] == "ok", text
    reply, text, _ = ran.run(f"%config FlameMagics.application = {request.param!r}")
    assert reply["status"] == "ok", text
    return ran


def test_debug_opens_the_remote_frames_and_their_locals(session):
    reply, _, _ = session.run(FAILING)
    assert reply["status"] == "error" and reply["ename"] == "ZeroDivisionError"
    reply, text, prompts = session.run(
        "%debug", ("p secret", "p lock", "p token", "where", "up", "p token", "ll", "q")
    )
    assert reply["status"] == "ok", text
    assert prompts and "ipdb>" in prompts[0]
    assert "debugging the remote frames" in text
    assert "{'found': 42}" in text  # a local of the innermost remote frame, as a value
    assert "<unlocked _thread.lock object" in text  # one that does not pickle: its repr
    assert "name 'token' is not defined" in text  # `token` is a local of the frame above only
    assert "'OUTER-1234'" in text  # ...which `up` reached
    assert "inner()" in text and "outer()" in text and "<module>()" in text  # `where`
    assert 'token = "OUTER-" + "1234"' in text  # `ll` shows outer()'s source
    reply, text, _ = session.run("%%flmrun\n'the next cell runs'")
    assert reply["status"] == "ok" and "'the next cell runs'" in text
    reply, text, _ = session.run("1 + 1")
    assert reply["status"] == "ok" and "2" in text


def test_pdb_on_enters_the_remote_frames_at_once(session):
    session.run("%pdb on")
    reply, text, prompts = session.run(FAILING, ("p secret['found'] + 1", "q"))
    assert reply["status"] == "error"
    assert prompts, f"%pdb on did not open the debugger; the cell showed {text}"
    assert "43" in text
    session.run("%pdb off")
    reply, text, _ = session.run("%%flmrun\n'still fine'")
    assert reply["status"] == "ok" and "'still fine'" in text


def test_debug_on_a_failed_map_item_names_the_item(session):
    session.run("xs = [1, 2, 0, 4]")
    reply, _, _ = session.run("%%flmrun --map x=xs --instances 2\nscaled = 10 * x\n100 // x")
    assert reply["status"] == "error" and reply["ename"] == "ZeroDivisionError"
    reply, text, _ = session.run("%debug", ("p x + 1000", "p scaled - 7", "q"))
    assert reply["status"] == "ok", text
    assert "item 2 of the map (x=0)" in text
    assert "1000" in text and "-7" in text
    session.run("%pdb on")
    reply, text, prompts = session.run("%%flmrun --map x=xs\n100 // (x - 4)", ("p x * 111", "q"))
    session.run("%pdb off")
    assert reply["status"] == "error" and prompts, text
    assert "item 3 of the map (x=4)" in text and "444" in text


def test_debug_on_a_failed_background_cell(session):
    session.run("%%flmrun --background job\nlimit = 3\nraise ValueError(f'over {limit}')")
    reply, text, _ = session.run("print(repr(job.exception(timeout=120)))")
    assert "over 3" in text, text
    reply, text, _ = session.run("%debug", ("p limit * 111", "q"))
    assert reply["status"] == "ok", text
    assert "debugging the remote frames" in text and "333" in text


def test_debug_says_in_one_line_when_the_runner_no_longer_has_the_frames(session):
    reply, _, _ = session.run(FAILING)
    assert reply["status"] == "error"
    session.run("%%flmrun\n'another cell ran on the runner'")
    reply, text, prompts = session.run("%debug")
    assert not prompts and reply["status"] == "ok"
    assert "cannot open the remote frames: the runner no longer keeps the frames" in text
    assert "return n / 0" in text  # the remote traceback, as text


def test_debug_after_the_session_closed_shows_the_traceback(session):
    reply, _, _ = session.run(FAILING)
    assert reply["status"] == "error"
    session.run("%flame close")
    reply, text, prompts = session.run("%debug")
    assert not prompts and reply["status"] == "ok"
    assert "cannot open the remote frames: the runner could not be asked" in text
    assert "return n / 0" in text


def test_debug_after_the_notebook_left_that_flame_starts_no_flame(session):
    reply, _, _ = session.run(FAILING)
    assert reply["status"] == "error"
    # What `%flame connect` does to the connection it leaves.
    session.run("old = get_ipython().magics_manager.registry['FlameMagics']._engine\nold.close()")
    reply, text, prompts = session.run("%debug")
    assert not prompts and reply["status"] == "ok"
    assert "no longer uses the Flame that ran the cell" in text
    reply, text, _ = session.run("print(old.connection.current_client(), old.connection._embedded)")
    assert text.strip() == "None None"


def test_a_notebook_function_shows_its_own_lines(session):
    # Defined here, it travels by value: cloudpickle names its code "<dynamic-code>".
    session.run("def helper(v):\n    doubled = v * 2\n    return doubled / 0")
    reply, _, _ = session.run("%%flmrun\nhelper(5)")
    assert reply["status"] == "error"
    reply, text, _ = session.run("%debug", ("p doubled", "ll", "q"))
    assert reply["status"] == "ok", text
    assert "10" in text and "doubled = v * 2" in text
    assert "<dynamic-code>" not in text
