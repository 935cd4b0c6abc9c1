# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-k manifest"`.
PYTEST_ARGS ?=
# Extra bench arguments, e.g. `make bench BENCH_ARGS="--quick --json /tmp/bench.json"`.
BENCH_ARGS ?=

.PHONY: venv demo test test-fast bench gpu-check clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) jobs/demo.py

# The layering contracts (.importlinter) are checked first: a Ray import in the bottom layer fails the build.
test: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) jobs/bench.py $(BENCH_ARGS)

# One-shot GPU check (< 8 min on one GPU): training steps, U-Net + VGG16 inference, JPEG decode CPU vs GPU;
# writes runs/bench/gpu_check.json (on a machine without CUDA: a smoke run on the CPU).
gpu-check: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) jobs/bench.py --gpu $(BENCH_ARGS)

clean-demo:
	rm -rf runs/demo
