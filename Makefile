# Two entry points: `make run` (default experiment) and `make test` (test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install bench clean

$(STAMP): setup.cfg pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/mlml reproduce baselines --profile quick --jobs 2

test: $(STAMP)
	$(BIN)/python -m pytest -q

# CPU benchmark suite (never part of `make test`): benchmarks/results/<machine>.json and .md, ~6-9 min on 2 cores.
# On a GPU machine: $(BIN)/python benchmarks/gpu_suite.py
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs
