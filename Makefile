# `make bench` (the benchmark report) and `make test` (the test suite) each set up a fresh
# machine that has only python3 and pip: a virtual environment in .venv, the package with
# its extras, then the run. pip resolves torch/torchvision/timm together (no CPU-only pin).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kron_kernels-installed
PYTEST_ARGS ?=
# the test suite runs on every core (pytest-xdist); the compile check makes each Triton report once
# (tests/test_gpu_targets.py shares it between the workers through a file lock)
TEST_PARALLEL ?= -n auto --dist loadgroup
BENCH_ARGS ?=
# The GPU machine's Triton: tests/test_gpu_targets.py compiles every kernel configuration with it
# too (a side install, first on PYTHONPATH of that test's subprocesses only)
GPU_MACHINE_TRITON ?= 3.6.0
SIDE_TRITON := $(VENV)/triton-$(GPU_MACHINE_TRITON)

# `make mutants`: the planted-bug check (mutants/mutants.py, driver mutants/run.py; not part of
# `make test` or CI): each bug in a scratch copy against its tests, and the block-size bugs
# against the compile check with the GPU machine's Triton
MUTANT_ARGS ?=

.PHONY: test bench bench-ops install clean mutants

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.cu csrc/*.cuh csrc/*.h)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja pybind11
	$(PY) -m pip install -q torch
	$(PY) -m pip install -q --no-build-isolation -e ".[bench]"
	@touch $@

$(SIDE_TRITON)/.installed: $(STAMP)
	$(PY) -m pip install -q --no-deps --upgrade --target $(SIDE_TRITON) triton==$(GPU_MACHINE_TRITON)
	@touch $@

install: $(STAMP)

test: $(STAMP) $(SIDE_TRITON)/.installed
	KRON_KERNELS_EXTRA_TRITON=$(SIDE_TRITON) $(PY) -m pytest $(TEST_PARALLEL) $(PYTEST_ARGS)

mutants: $(STAMP) $(SIDE_TRITON)/.installed
	$(PY) mutants/run.py --triton $(SIDE_TRITON) $(MUTANT_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.report $(BENCH_ARGS)

bench-ops: $(STAMP)
	$(PY) -m pytest benchmarks/ --benchmark-only $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
