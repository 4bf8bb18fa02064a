# Two entry points: `make demo` (the side-by-side comparison) and `make test`.
# Each builds .venv on first use, and rebuilds it when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is installed first, pinned: on this project's machines these two
# releases come from the local wheel store (a CUDA build that also runs on CPU).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
DEMO_ARGS ?=
# Tests: one torch thread per process and TEST_JOBS pytest workers (a file's
# tests stay on one worker, sharing its fixtures).
TEST_JOBS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_JOBS) --dist loadfile

.PHONY: venv demo test test-kernels test-gpu clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

# The comparison twice: with the digits preset's 200 exemplars, and without a
# memory (where M2KD's exemplar-free sigmoid form belongs; see README). Two jobs
# of one thread each: 87 s against 112 s for one job of two threads (30 runs,
# 2-core machine; docs/performance.md).
DEMO_JOBS ?= 2
demo: $(STAMP)
	$(PY) -m benchmarks.compare --out results/demo --jobs $(DEMO_JOBS) $(DEMO_ARGS)
	$(PY) -m benchmarks.compare --out results/demo-free --mem-size 0 --jobs $(DEMO_JOBS) $(DEMO_ARGS)

test: $(STAMP)
	$(PYTEST)

# The tests that train models (those that stepped an optimizer in the last
# `make test`; every test on a fresh clone), again with torch's AVX2 kernels:
# another CPU picks other float kernels, and nothing may depend on which.
test-kernels: $(STAMP)
	ATEN_CPU_CAPABILITY=avx2 $(PYTEST) -m "training and not slow and not gpu"

# On a machine with CUDA: training iterations must not synchronise with the host.
test-gpu: $(STAMP)
	$(PY) -m pytest -m gpu tests/test_gpu.py

clean:
	rm -rf $(VENV) results .pytest_cache
