# tryon_lab — a new user needs `make setup`, then `make demo` (run), `make lab` (JupyterLab) or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo lab test test-fast lint sync verify data

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: the CPU build; an unpinned torch would pull a multi-GB CUDA build.
# (On a GPU machine, install the torch build for your CUDA first; this line then keeps it.)
setup: $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q "torch>=2.6"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null

# The main job: every notebook, headless, on the default model, into runs/<date>-demo/.
demo:
	$(PY) -m tryon_lab.runs run --all --name demo

# JupyterLab from the venv on the notebooks (the try-on widget is notebook 04).
lab:
	$(PY) -m jupyter lab notebooks/

test:
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slow"

lint:
	$(VENV)/bin/ruff check .
	$(PY) -m tryon_lab.runs sync --check

sync:
	$(PY) -m tryon_lab.runs sync

verify:
	$(PY) -m tryon_lab.runs verify $(RUN)

data:
	$(PY) scripts/make_sample_data.py --out data --seed 1234 --count 8
