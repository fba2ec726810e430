"""A real JupyterLab in headless Chromium: remote output appears line by line, the stop button stops."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import ROOT

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = os.path.join(ROOT, "artifacts")

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is installed by `make test`")
if not os.path.exists(CHROMIUM):
    pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)",
                pytrace=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    home = tmp_path_factory.mktemp("lab")
    nb_dir = home / "nb"
    shutil.copytree(os.path.join(ROOT, "notebooks"), nb_dir)
    port, token = _free_port(), os.urandom(8).hex()
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(home / "runtime"), JUPYTER_CONFIG_DIR=str(home / "config"),
               JUPYTER_DATA_DIR=str(home / "data"), IPYTHONDIR=str(home / "ipython"))
    log = open(home / "lab.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--allow-root", "--no-browser",
                             f"--port={port}", f"--IdentityProvider.token={token}", "--ServerApp.ip=127.0.0.1",
                             f"--ServerApp.root_dir={nb_dir}"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("JupyterLab did not start:\n" + (home / "lab.log").read_text())
    yield url, token
    proc.terminate()  # the server shuts its kernels down, and they their runners
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


ACTIVE = ".jp-NotebookPanel:not(.lm-mod-hidden)"


def _open(p, url, token, notebook, height):
    """Chromium showing ``notebook`` in the lab, once its flamebook kernel is idle."""
    browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
    page = browser.new_page(viewport={"width": 1280, "height": height})
    page.goto(f"{url}/lab/tree/{notebook}?reset&token={token}")
    page.wait_for_function(
        "() => { const k = document.querySelector('" + ACTIVE + " .jp-KernelName'),"
        " s = document.querySelector('" + ACTIVE + " .jp-Notebook-ExecutionIndicator');"
        " return k && k.innerText.includes('flamebook') && s && s.getAttribute('data-status') === 'idle'; }",
        timeout=90000)
    return browser, page


def _run_new_cell(page, code):
    """Insert a cell below the active one, type ``code`` and run it; return the cell's locator."""
    page.keyboard.press("Escape")
    page.keyboard.press("b")
    index = page.evaluate("() => Array.from(document.querySelectorAll('" + ACTIVE + " .jp-Cell'))"
                          ".findIndex(c => c.classList.contains('jp-mod-active'))")
    cell = page.locator(f"{ACTIVE} .jp-Cell").nth(index)  # stays put when the active cell moves on
    cell.locator(".cm-content").click()
    page.keyboard.insert_text(code)
    page.keyboard.press("Shift+Enter")
    return cell


def _finished(cell):
    prompt = cell.locator(".jp-InputArea-prompt").inner_text()
    return "*" not in prompt and any(ch.isdigit() for ch in prompt)


def test_lab_streams_remote_output_and_stops_remote_work(lab):
    url, token = lab
    os.makedirs(ARTIFACTS, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser, page = _open(p, url, token, "quickstart.ipynb", height=900)
        # Run the notebook's first code cell: it makes `pool`.
        page.locator(f"{ACTIVE} .jp-CodeCell").first.locator(".cm-content").click()
        page.keyboard.press("Shift+Enter")
        first = page.locator(f"{ACTIVE} .jp-CodeCell").first
        deadline = time.monotonic() + 60
        while not _finished(first) and time.monotonic() < deadline:
            time.sleep(0.1)
        page.locator(f"{ACTIVE} .jp-CodeCell").first.locator(".cm-content").click()

        cell = _run_new_cell(page, "pool.call(lambda: [(print(f'line {i}', flush=True), "
                                   "__import__('time').sleep(1)) for i in range(3)] and None)")
        seen = {}
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            text = cell.locator(".jp-OutputArea").inner_text()
            for i in range(3):
                if f"line {i}" in text and i not in seen:
                    seen[i] = time.monotonic()
            if _finished(cell):
                done = time.monotonic()
                break
            time.sleep(0.05)
        else:
            pytest.fail("the streaming cell did not finish")
        assert sorted(seen) == [0, 1, 2]
        assert seen[0] < seen[1] < seen[2], "lines appear one by one"
        assert done - seen[0] > 1.5, "the first line showed well before the cell finished"
        page.screenshot(path=os.path.join(ARTIFACTS, "lab-streaming.png"))

        cell = _run_new_cell(page, "pool.call(__import__('time').sleep, 120)")
        time.sleep(2.0)
        assert not _finished(cell)
        t0 = time.monotonic()
        page.locator(f"{ACTIVE} [data-command='notebook:interrupt-kernel']").first.click()
        while time.monotonic() - t0 < 15 and not _finished(cell):
            time.sleep(0.05)
        stopped = time.monotonic() - t0
        assert _finished(cell), "the stop button did not stop the cell"
        assert "KeyboardInterrupt" in cell.locator(".jp-OutputArea").inner_text()
        assert stopped < 5
        # the pool still works afterwards, on the same runner
        cell = _run_new_cell(page, "pool.call(lambda: 'pool still works')")
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30 and not _finished(cell):
            time.sleep(0.05)
        assert "pool still works" in cell.locator(".jp-OutputArea").inner_text()
        page.screenshot(path=os.path.join(ARTIFACTS, "lab-stopped.png"))

        # a long map shows one progress line, updated in place, final when it ends
        cell = _run_new_cell(page, "def nap(i):\n    __import__('time').sleep(0.6)\n    return i\n"
                                   "sum(pool.map(nap, range(8)))")
        during, t0 = set(), time.monotonic()
        while time.monotonic() - t0 < 60 and not _finished(cell):
            text = cell.locator(".jp-OutputArea").inner_text()
            during.update(line for line in text.splitlines() if line.startswith("map(nap)"))
            time.sleep(0.05)
        assert _finished(cell)
        assert len(during) >= 2, f"the line changed while the map ran: {during}"
        final = cell.locator(".jp-OutputArea").inner_text()
        assert final.count("map(nap)") == 1 and "8/8 done" in final, "one line, updated in place"
        assert "28" in final
        page.screenshot(path=os.path.join(ARTIFACTS, "lab-progress.png"))

        # attached to an app, a cell's value is its Out[n]
        cell = _run_new_cell(page, "import os, subprocess, sys, tempfile\n"
                                   "cf = os.path.join(tempfile.mkdtemp(), 'inv.json')\n"
                                   "app = subprocess.Popen([sys.executable, 'inventory_app.py', cf], "
                                   "stdout=subprocess.PIPE, text=True)\n"
                                   "app.stdout.readline(); app.stdout.readline(); None")
        _wait_finished(cell)
        _wait_finished(_run_new_cell(page, "%attach {cf}"))
        cell = _run_new_cell(page, "len(inventory.items) * 21")
        _wait_finished(cell)
        prompt = cell.locator(".jp-InputArea-prompt").inner_text()
        count = "".join(ch for ch in prompt if ch.isdigit())
        out = cell.locator(".jp-OutputArea-output").first
        assert out.inner_text().strip() == "21"
        assert f"[{count}]" in cell.locator(".jp-OutputArea-prompt").first.inner_text(), "shown as Out[n]"
        page.screenshot(path=os.path.join(ARTIFACTS, "lab-attached-out.png"))
        _wait_finished(_run_new_cell(page, "%detach"))
        _wait_finished(_run_new_cell(page, "app.kill(); app.wait()"))
        browser.close()


def _wait_finished(cell, timeout=60):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and not _finished(cell):
        time.sleep(0.05)
    assert _finished(cell), cell.locator(".jp-OutputArea").inner_text()


CHART = ".jp-OutputArea-output .vega-embed"


def _chart_picture(cell):
    """What the cell's Vega chart shows now (its canvas's pixels, or its SVG), or None if none is drawn."""
    return cell.evaluate("(c) => { const e = c.querySelector('" + CHART + "');"
                         " if (!e) return null; const cv = e.querySelector('canvas');"
                         " if (cv) return cv.toDataURL(); const s = e.querySelector('svg');"
                         " return s ? s.outerHTML : null; }")


def test_lab_draws_the_sweep_chart_live(lab):
    url, token = lab
    os.makedirs(ARTIFACTS, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser, page = _open(p, url, token, "sweep.ipynb", height=1000)
        cells = page.locator(f"{ACTIVE} .jp-Cell")
        cells.first.click()
        spawn_cell = None
        for i in range(cells.count()):  # run the cells in order, up to the sweep itself
            cell = cells.nth(i)
            source = cell.locator(".jp-InputArea").inner_text()
            page.keyboard.press("Shift+Enter")
            if "spawn_map" in source:
                spawn_cell = cell
                break
            if "jp-CodeCell" in (cell.get_attribute("class") or ""):
                _wait_finished(cell)
        assert spawn_cell is not None
        pictures, t0 = [], time.monotonic()
        while time.monotonic() - t0 < 90 and not _finished(spawn_cell):
            picture = _chart_picture(spawn_cell)
            if picture and (not pictures or picture != pictures[-1]):
                pictures.append(picture)
                if len(pictures) == 2:
                    page.screenshot(path=os.path.join(ARTIFACTS, "lab-sweep-running.png"))
            time.sleep(0.2)
        assert _finished(spawn_cell), spawn_cell.locator(".jp-OutputArea").inner_text()
        assert len(pictures) >= 2, "the chart was drawn, and it changed while the variants trained"
        final = _chart_picture(spawn_cell)
        assert final and final != pictures[0]
        assert "best: " in spawn_cell.locator(".jp-OutputArea").inner_text()
        spawn_cell.scroll_into_view_if_needed()
        spawn_cell.screenshot(path=os.path.join(ARTIFACTS, "lab-sweep.png"))
        _wait_finished(_run_new_cell(page, "pool.shutdown()"))
        browser.close()
