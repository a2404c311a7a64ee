# Two entry points for a fresh clone (see README):
#   make run    installs into .venv, verifies the theory and writes the HTML report to report/
#   make test   installs into .venv and runs the fast test suite
# torch is pinned to 2.13.0: on our machines that is a local CPU build; an unpinned
# torch would pull gigabytes of CUDA wheels.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install run test test-all test-slow bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet "triton==3.9.0" || echo "triton not installed: the Triton kernel tests will be skipped"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/dropkey-lab theory
	$(BIN)/dropkey-lab report --quick --out report

test: $(STAMP)
	HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest

test-all: $(STAMP)
	HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest -m "not gpu"

test-slow: $(STAMP)
	HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_theory.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
