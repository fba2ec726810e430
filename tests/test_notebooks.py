"""Every notebook in notebooks/ runs clean, headless, through nbclient with the flamebook kernel."""
from __future__ import annotations

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT

# slurm.ipynb runs against the test cluster in its own test below.
NOTEBOOKS = sorted(p for p in glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb"))
                   if not p.endswith("slurm.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_runs_clean(path):
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, kernel_name="flamebook", timeout=300,
                   resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors


def test_quickstart_streams_and_displays():
    path = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, kernel_name="flamebook", timeout=300).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "training on runner pid" in text and "[##########] 10/10" in text
    assert "caught ZeroDivisionError" in text
    shown = [o["data"].get("text/plain") for c in nb.cells if c.cell_type == "code" for o in c.outputs
             if o.get("output_type") in ("display_data", "execute_result")]
    assert "30" in shown and "100" in shown


def test_attach_notebook_runs_cells_in_the_app():
    path = os.path.join(ROOT, "notebooks", "attach.ipynb")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, kernel_name="flamebook", timeout=120,
                   resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    outs = [c.outputs for c in nb.cells if c.cell_type == "code"]
    pid_line = "".join(o.get("text", "") for o in outs[2])
    assert "running in pid" in pid_line and str(os.getpid()) not in pid_line
    shown = [o["data"]["text/plain"] for c in outs for o in c if o.get("output_type") == "execute_result"]
    assert "{'apples': 3, 'pears': 5}" in shown


def test_slurm_notebook_runs_against_a_real_cluster(slurm):
    path = os.path.join(ROOT, "notebooks", "slurm.ipynb")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, kernel_name="flamebook", timeout=300).execute()  # SLURM_CONF is inherited
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "No Slurm cluster" not in text
    assert "task 0 in job" in text and "jobs used:" in text
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]


def test_attach_async_notebook_awaits_on_the_apps_loop():
    path = os.path.join(ROOT, "notebooks", "attach_async.ipynb")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, kernel_name="flamebook", timeout=120,
                   resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "orders grew while we waited: True" in text
    shown = [o["data"]["text/plain"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
             if o.get("output_type") in ("display_data", "execute_result")]
    assert "True" in shown  # the awaited coroutine ran on the app's own loop


def test_remote_notebook_keeps_values_on_runners():
    path = os.path.join(ROOT, "notebooks", "remote.ipynb")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, kernel_name="flamebook", timeout=180,
                   resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    results = [o["data"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
               if o.get("output_type") == "execute_result"]
    assert "<table" in results[0]["text/html"] and "customer" in results[0]["text/plain"]
    assert "([0, 3, 6, 9, 12], 5)" in [r["text/plain"] for r in results]
    assert any("<th>objects</th>" in r.get("text/html", "") for r in results)
