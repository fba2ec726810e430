# Two commands for a fresh machine: `make lab` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: lab demo test bench venv notebooks

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,lab]'
	touch $@

venv: $(VENV)/.installed
	$(PY) -m kernel install --sys-prefix >/dev/null

lab: venv
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root,)

demo: venv
	$(PY) -m kernel.demo

test: venv
	bash .ci/setup-services.sh
	$(PY) -m pytest tests

bench: venv
	$(PY) benchmarks/bench_pool.py

notebooks: venv
	$(VENV)/bin/jupyter nbconvert --to notebook --execute --ExecutePreprocessor.kernel_name=flamebook --output-dir /tmp/flamebook-notebooks notebooks/*.ipynb
