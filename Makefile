# tryon_lab — the two commands a new user needs are `make setup` then `make demo` (run) / `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast lint sync verify data

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
