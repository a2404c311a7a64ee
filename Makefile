# Two entry points for a fresh clone (see README):
#   make run    installs into .venv, verifies the theory, runs the quick studies and experiments,
#               and writes the HTML report to report/
#   make test   installs into .venv (and Chromium where apt-get can) and runs the fast test suite
# torch is pinned to 2.13.0: on our machines that is a local CPU build; an unpinned
# torch would pull gigabytes of CUDA wheels.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

# Datasets: --data-dir, else $DROPKEY_DATA, else ~/.local/share/dropkey-lab (see dropkey/lab/data.py).
# The project's own machines keep a shared copy next to the checkout: use it unless DROPKEY_DATA is set.
SHARED_DATA := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED_DATA)),)
export DROPKEY_DATA ?= $(SHARED_DATA)
endif

.PHONY: install browser run test test-all test-slow test-gpu bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet "triton==3.9.0" || echo "triton not installed: the Triton kernel tests will be skipped"
	touch $(STAMP)

install: $(STAMP)

# Debian's Chromium renders the report in the browser tests (they skip without it). Best effort:
# only where apt-get exists and we may use it (CI runs as root); never fails the build.
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  { apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null 2>&1; }; }; } || \
	  echo "chromium not installed: the browser tests will be skipped"

run: $(STAMP)
	$(BIN)/dropkey-lab theory
	$(BIN)/dropkey-lab report --quick --out report

test: $(STAMP) browser
	$(BIN)/python -m ruff check .
	HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest

test-all: $(STAMP)
	HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest -m "not gpu"

test-slow: $(STAMP)
	HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest -m slow

# tests marked gpu (they need CUDA; without it they are reported as skipped)
test-gpu: $(STAMP)
	HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest -m gpu

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_theory.py
	$(BIN)/python benchmarks/bench_expected_attention.py
	$(BIN)/python benchmarks/bench_attention.py
	$(BIN)/python benchmarks/bench_training.py
	$(BIN)/python benchmarks/bench_cpu_alternatives.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
