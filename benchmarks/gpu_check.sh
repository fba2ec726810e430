#!/usr/bin/env bash
# GPU check on a machine with an NVIDIA GPU, PyTorch and cloudpickle but without pyzmq,
# jupyter_client or ipykernel: those come as wheels in .whl/ (made here by
# benchmarks/gpu_wheels.sh). Takes about a minute. Usage: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 JUPYTER_PLATFORM_DIRS=1
nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv
python3 benchmarks/gpu_check.py; rc=$?
python3 -m kernel install --user >/dev/null && python3 - <<'PY' || rc=1
import time, nbformat
from nbclient import NotebookClient
nb = nbformat.read("notebooks/gpu.ipynb", as_version=4)
t = time.perf_counter()
NotebookClient(nb, kernel_name="flamebook", timeout=600).execute()
print(f"notebooks/gpu.ipynb ran headless with the flamebook kernel in {time.perf_counter() - t:.1f} s; outputs:")
for cell in nb.cells:
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            print("  " + out["text"].replace("\r", "\n  ").strip().replace("\n", "\n  "))
        elif out.get("output_type") == "error":
            print("  ERROR", out["ename"], out["evalue"]); raise SystemExit(1)
        elif "text/html" in out.get("data", {}):
            print("  [html]", out["data"]["text/plain"][:200])
PY
echo "gpu_check rc=$rc"
exit $rc
