# The two commands a user needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

RUN_DIR := runs/make-run-$(shell date +%Y%m%d-%H%M%S)

.PHONY: run test bench lint clean setup

setup: $(STAMP)

# torch==2.13.0 is installed first and explicitly: it is the CPU build this project is
# tested with, and pinning it keeps pip from resolving a multi-GB CUDA build for the range
# in pyproject.toml.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	touch $(STAMP)

# The main job: train the default MoE on tiny Shakespeare (5 minutes), then sample from it.
run: $(STAMP)
	$(VENV)/bin/moekit train --out $(RUN_DIR)
	$(VENV)/bin/moekit sample $(RUN_DIR) --prompt "ROMEO:" --tokens 400 --temperature 0.8 --top-k 40

bench: $(STAMP)
	$(VENV)/bin/moekit bench layer

test: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
