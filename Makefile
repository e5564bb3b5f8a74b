# segpipe: `make demo` and `make test` each set up .venv when missing, then run.
# On a machine without an NVIDIA GPU torch is installed as `torch==2.13.0` (the CPU build);
# with a GPU, plain `torch` from the index (a CUDA build). Override with TORCH_SPEC=...
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
STAMP := $(VENV)/.segpipe-installed

.PHONY: setup demo test test-all lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/segpipe demo

test: $(STAMP)
	$(VENV)/bin/ruff check pipeline tests benchmarks
	$(PY) -m pytest -q -n auto --maxprocesses 4 -m "not slow" --durations=12 tests

# the slow tier too: compiled training on real data, kill-and-resume loops, bundle runs as processes
test-all: $(STAMP)
	$(VENV)/bin/ruff check pipeline tests benchmarks
	$(PY) -m pytest -q -n auto --maxprocesses 4 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
