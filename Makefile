# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-k manifest"`.
PYTEST_ARGS ?=
# Extra bench arguments, e.g. `make bench BENCH_ARGS="--quick --json /tmp/bench.json"`.
BENCH_ARGS ?=

.PHONY: venv demo test test-fast bench clean-demo

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

clean-demo:
	rm -rf runs/demo
