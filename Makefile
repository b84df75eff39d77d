# Two entry points on a fresh machine with Python 3.11+: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# `make run` gets the torch build that suits the machine: the CPU build without an NVIDIA driver,
# the CUDA build with one, PyPI's on macOS. `make test` gets the CPU build of torch 2.13 on every
# machine, so that the suite runs the same everywhere. Both share .venv: packaging/choose_torch.py
# checks the torch installed there before every run and test, and replaces it when it is not the
# build (or version) wanted, then says what it chose. TORCH=SPEC overrides the version for run.
TORCH ?= torch
TEST_TORCH := torch==2.13.0
CHOOSE_TORCH = $(BIN)/python packaging/choose_torch.py $(TORCH_FLAGS) "$(TORCH)"

.PHONY: run demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The stamp stands for the app and its dependencies; torch is checked separately, every time.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(CHOOSE_TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

# Tests also install the eval extra (lm-eval), so that CI runs the lm-eval tests.
$(VENV)/.installed-eval: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[test,eval]"
	touch $@

run: $(VENV)/.installed
	$(CHOOSE_TORCH)
	$(BIN)/frankenmoe

demo: $(VENV)/.installed
	$(CHOOSE_TORCH)
	$(BIN)/frankenmoe --demo

test: TORCH = $(TEST_TORCH)
test: TORCH_FLAGS = --cpu
test: $(VENV)/.installed-eval
	$(CHOOSE_TORCH)
	$(BIN)/ruff check app tests bench packaging
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check app tests bench packaging

clean:
	rm -rf $(VENV) build dist .pytest_cache
