"""Every notebook in notebooks/ runs clean, headless, through nbclient with the flamebook kernel."""
from __future__ import annotations

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT

# slurm.ipynb runs against the test cluster, sweep and batch with their checks, in their own tests below.
NOTEBOOKS = sorted(p for p in glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb"))
                   if not p.endswith(("slurm.ipynb", "sweep.ipynb", "batch.ipynb", "mesh.ipynb")))
VEGALITE = "application/vnd.vegalite.v5+json"


def run(name, timeout=300):
    """``notebooks/name`` executed through nbclient; its code cells' outputs, cell by cell."""
    path = os.path.join(ROOT, "notebooks", name)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, kernel_name="flamebook", timeout=timeout,
                   resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    outputs = [c.outputs for c in nb.cells if c.cell_type == "code"]
    errors = [o for outs in outputs for o in outs if o.get("output_type") == "error"]
    assert not errors, errors
    return outputs


def texts(outs):
    return "".join(o.get("text", "") for o in outs if o.get("output_type") == "stream")


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


def test_sweep_notebook_draws_every_variant_and_keeps_the_best_on_its_runner():
    outputs = run("sweep.ipynb")
    spawn = next(outs for outs in outputs if any(VEGALITE in o.get("data", {}) for o in outs))
    charts = [o for o in spawn if VEGALITE in o.get("data", {})]
    assert len(charts) == 1, "one chart, updated in place (nbclient applies the updates)"
    values = charts[0]["data"][VEGALITE]["data"]["values"]
    assert {v["series"] for v in values} == {"cautious", "steady", "bold", "reckless"}
    assert len(values) == 4 * 40 * 2, "every epoch of every variant, loss and accuracy"
    text = texts(spawn)
    assert "best: " in text and "kept on runner sweep-" in text
    shown = "".join(texts(outs) for outs in outputs)
    predicted = eval(shown.split("predicted:")[1].split("\n")[0])
    actual = eval(shown.split("actual:")[1].split("\n")[0])
    assert len(predicted) == 10 and sum(p == a for p, a in zip(predicted, actual)) >= 8


def test_batch_notebook_shows_each_image_with_its_result():
    outputs = run("batch.ipynb")
    batch = next(outs for outs in outputs if "of 24 right" in texts(outs))
    figures = [o for o in batch if "<figure" in o.get("data", {}).get("text/html", "")]
    assert len(figures) == 24 and all("data:image/png;base64," in o["data"]["text/html"] for o in figures)
    right = int(texts(batch).split(" of 24 right")[0].split()[-1])
    assert right == sum("✓" in o["data"]["text/html"] for o in figures) and right >= 18


def test_mesh_notebook_merges_across_runners_and_serves_a_model_to_another_pool():
    outputs = run("mesh.ipynb")
    text = "".join(texts(outs) for outs in outputs)
    orders = text.split("orders on ")[1].split("\n")[0]
    customers = text.split("customers on ")[1].split("\n")[0]
    assert orders != customers, "two runners"
    assert "rows: 100" in text, "merged on id: 100 customers with orders"
    assert "encoded: [[1, 2], [3], [4, 1], [2], [3], [2, 1]]" in text
    assert "the model answered 6 calls" in text
    views = [o for outs in outputs for o in outs if "GPU use" in o.get("data", {}).get("text/html", "")]
    assert views, "the pool view"
