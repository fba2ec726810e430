"""The runner side stays light and separate from the parent side."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PARENT_SIDE = {"flame.pool", "flame.runner", "flame.call", "flame.backends", "kernel"}


def test_node_imports_nothing_from_the_parent_side():
    for path in Path(ROOT, "flame", "node").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = ("flame." if node.level else "") + (node.module or "")
                if node.level == 2:
                    module = "flame." + (node.module or "")
                names = [module] if node.module else [f"flame.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert not any(name == p or name.startswith(p + ".") for p in PARENT_SIDE), (path, name)


def test_starting_a_runner_loads_nothing_heavy():
    code = ("import sys, flame.node.node as n; "
            "bad = [m for m in ('flame.pool', 'flame.runner', 'flame.backends', 'IPython', 'numpy', 'psutil', 'kernel') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=30)
    assert out.stdout.strip() == "[]", out.stderr


def test_wire_int_flags_match_zmq():
    import zmq

    from flame import wire
    assert (wire._EVENTS, wire._POLLIN, wire._SNDMORE) == (int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.SNDMORE))
