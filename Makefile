# Two entry points on a fresh machine with Python 3.11+: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Users get whatever torch build suits their machine; the test environment pins the
# CPU build so that CI installs in seconds and results are reproducible.
TORCH ?= torch
# The test environment adds the eval extra (lm-eval), so that CI runs the benchmark tests too.
EXTRAS ?= test

.PHONY: run demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

run: $(VENV)/.installed
	$(BIN)/frankenmoe

demo: $(VENV)/.installed
	$(BIN)/frankenmoe --demo

test: TORCH = torch==2.13.0
test: EXTRAS = test,eval
test: $(VENV)/.installed
	$(BIN)/ruff check app tests bench packaging
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check app tests bench packaging

clean:
	rm -rf $(VENV) build dist .pytest_cache
