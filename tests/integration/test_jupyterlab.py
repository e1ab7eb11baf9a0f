"""What shows on screen, tested on screen: JupyterLab 4 in headless Chromium (issue 19).

A real JupyterLab server, a real browser (Debian's ``chromium``, driven by Playwright), a
real kernel and the embedded Flame. The test opens a notebook through the UI and runs its
cells with Shift+Enter and the toolbar's stop button, as a user does. Screenshots of every
step are kept in the test's temporary directory; a failure names it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
BOUND_MS = 120_000  # against a hang only: every wait below is for something to show
pytestmark = pytest.mark.timeout(600)

if not os.path.exists(CHROMIUM):
    pytest.skip(
        f"the browser tests need Debian's chromium at {CHROMIUM}: `apt-get install -y chromium` "
        "(.ci/run does it)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright (in the test extra) drives the browser"
)
pytest.importorskip("jupyterlab", reason="jupyterlab (in the test extra) is the UI under test")


def notebook(cells: list[str]) -> dict:
    return {
        "cells": [
            {"cell_type": "code", "metadata": {}, "source": source, "outputs": [], "execution_count": None}
            for source in cells
        ],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def lab(isolated_home, tmp_path):
    """A JupyterLab server on loopback, serving ``tmp_path/notebooks``; yields its URL and token."""
    root = tmp_path / "notebooks"
    root.mkdir()
    settings = tmp_path / "lab-settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    # Every cell in the page (no virtual scrolling), so that the test sees all of them.
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    token = secrets.token_hex(16)
    port = free_port()
    env = {
        **os.environ,
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "lab-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "lab-workspaces"),
    }
    log = open(tmp_path / "jupyterlab.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--allow-root",
            f"--port={port}",
            "--ip=127.0.0.1",
            f"--ServerApp.root_dir={root}",
            f"--IdentityProvider.token={token}",
            "--LabApp.news_url=",
            "--ServerApp.port_retries=0",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + BOUND_MS / 1000
    while True:
        assert server.poll() is None, (tmp_path / "jupyterlab.log").read_text()
        try:
            with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5):
                break
        except OSError:
            assert time.monotonic() < deadline, "JupyterLab did not start"
            time.sleep(0.2)
    yield url, token, root
    server.terminate()
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    log.close()


@pytest.fixture
def page(lab, tmp_path, request):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1400, "height": 2400})
        page = context.new_page()
        page.set_default_timeout(BOUND_MS)
        sync_api.expect.set_options(timeout=BOUND_MS)
        yield page
        context.close()
        browser.close()


class Steps:
    """Screenshots of each step under ``directory``, named in order."""

    def __init__(self, page, directory: Path) -> None:
        self.page = page
        self.directory = directory
        directory.mkdir(exist_ok=True)
        self.count = 0

    def shot(self, name: str) -> Path:
        self.count += 1
        path = self.directory / f"{self.count:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


def test_cells_as_a_user_sees_them_in_jupyterlab(lab, page, tmp_path):
    url, token, root = lab
    go = tmp_path / "go"
    cells = [
        "%load_ext flame_magic",
        # Prints every half second until the test has seen it print while busy.
        "%%flmrun\nimport os, time\ni = 0\n"
        f"while not os.path.exists({str(go)!r}):\n    print('tick', i, flush=True)\n    i += 1\n"
        "    time.sleep(0.5)\nprint('ticked')",
        "%%flmrun\nimport pandas as pd\npd.DataFrame({'left': [1, 2], 'right': [3, 4]})",
        "xs = list(range(24))",
        "%%flmrun --map x=xs --into squares --instances 2\nimport time\ntime.sleep(0.2)\nx * x",
        "%%flmrun\nimport time\nprint('sleeping', flush=True)\ntime.sleep(30)\n'not reached'",
        "%%flmrun\n'the next cell runs'",
    ]
    (root / "ui.ipynb").write_text(json.dumps(notebook(cells)))
    steps = Steps(page, tmp_path / "screenshots")
    try:
        run_the_notebook(page, steps, f"{url}/lab/tree/ui.ipynb?token={token}", go)
    except Exception as exc:
        shot = steps.shot("failure")
        raise AssertionError(f"{exc}\nScreenshots of each step: {shot.parent}") from exc
    finally:
        steps.shot("end")


def run_the_notebook(page, steps: Steps, address: str, go: Path) -> None:
    expect = sync_api.expect
    page.goto(address)
    cells = page.locator(".jp-Notebook .jp-CodeCell")
    expect(cells).to_have_count(7)
    # The kernel is ready once the toolbar's kernel status says so.
    expect(page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")).to_have_count(1)
    steps.shot("opened")

    def run(index: int) -> None:
        cells.nth(index).locator(".jp-InputArea-editor").click()
        page.keyboard.press("Control+Enter")

    def prompt(index: int):
        return cells.nth(index).locator(".jp-InputPrompt")

    def outputs(index: int):
        return cells.nth(index).locator(".jp-OutputArea-output")

    def finished(index: int) -> None:
        expect(prompt(index)).to_have_text(re.compile(r"\[\d+\]:"))

    run(0)
    finished(0)

    # Live output: lines appear while the cell is busy.
    run(1)
    expect(cells.nth(1).locator(".jp-OutputArea")).to_contain_text("tick 1")
    expect(prompt(1)).to_have_text("[*]:")
    steps.shot("printing-while-busy")
    go.touch()
    finished(1)
    expect(cells.nth(1).locator(".jp-OutputArea")).to_contain_text("ticked")

    # A DataFrame shows as its HTML table.
    run(2)
    finished(2)
    table = outputs(2).locator("table")
    expect(table).to_have_count(1)
    expect(table.locator("th").filter(has_text="left")).to_have_count(1)
    expect(table.locator("td").filter(has_text="4")).to_have_count(1)
    steps.shot("dataframe")

    # A map's progress: one output, updated in place.
    run(3)
    finished(3)
    run(4)
    expect(outputs(4).locator("progress")).to_have_count(1)
    expect(outputs(4)).to_have_count(1)
    steps.shot("map-running")
    finished(4)
    expect(outputs(4)).to_have_count(1)
    expect(outputs(4)).to_contain_text("24/24 done")
    expect(outputs(4).locator("progress")).to_have_attribute("value", "24")
    steps.shot("map-done")

    # The stop button ends a sleeping cell, and the next cell runs.
    run(5)
    # Once it shows that it sleeps on its runner, the kernel is waiting for it.
    expect(cells.nth(5).locator(".jp-OutputArea")).to_contain_text("sleeping")
    expect(prompt(5)).to_have_text("[*]:")
    steps.shot("sleeping")
    page.locator("[data-command='notebook:interrupt-kernel']").first.click()
    finished(5)
    expect(cells.nth(5).locator(".jp-OutputArea")).to_contain_text("Interrupt")
    run(6)
    finished(6)
    expect(outputs(6)).to_contain_text("the next cell runs")
    steps.shot("stopped-and-next")
