#!/usr/bin/env bash
# Downloads, into .whl/, the wheels gpu_check.sh needs on the GPU machine (Python 3.12, x86_64),
# at the versions this project is tested with. Run here, where pip reaches the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS="pyzmq==27.3.0 jupyter_client==8.10.0 jupyter_core==5.9.1 ipykernel==7.4.0 ipython==9.18.1
traitlets tornado comm debugpy nest_asyncio matplotlib_inline jedi parso pexpect ptyprocess
prompt_toolkit wcwidth stack_data asttokens executing pure_eval ipython_pygments_lexers decorator
nbclient==0.11.0 nbformat==5.11.1 fastjsonschema jsonschema referencing rpds_py jsonschema_specifications
platformdirs"
mkdir -p .whl
for p in $PKGS; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$p"
done
du -sh .whl
