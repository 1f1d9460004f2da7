# `make bench` (the benchmark report) and `make test` (the test suite) each set up a fresh
# machine that has only python3 and pip: a virtual environment in .venv, the package with
# its extras, then the run. pip resolves torch/torchvision/timm together (no CPU-only pin).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kron_kernels-installed
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: test bench bench-ops install clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja pybind11
	$(PY) -m pip install -q torch
	$(PY) -m pip install -q --no-build-isolation -e ".[bench]"
	@touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.report $(BENCH_ARGS)

bench-ops: $(STAMP)
	$(PY) -m pytest benchmarks/ --benchmark-only $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
