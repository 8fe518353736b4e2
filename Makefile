# The two set-up commands of the README: `make run` (install + main job) and `make test` (install dev + tests).
# torch is installed first, pinned, so pip never resolves a multi-GB CUDA build on a CPU machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_AUTH_MODE ?= disabled

.PHONY: install install-dev run test lint

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.torch: | $(PY)
	$(PIP) install -q torch==2.13.0
	touch $@

install: $(VENV)/.torch
	$(PIP) install -q -e .

install-dev: $(VENV)/.torch
	$(PIP) install -q -e '.[dev,bench]'
	PYTHON=$(PY) bash benchmarks/install_bfcl.sh >/dev/null

run: install
	$(VENV)/bin/mosaic-ray train

test: install-dev
	$(PY) -m pytest -q

lint: install-dev
	$(VENV)/bin/ruff check mosaic_ray actors learners benchmarks tests
