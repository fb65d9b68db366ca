# fluxlab: `make demo` trains the embedded OpenMoji default and writes a grid; `make test` runs the suite.
# Both create .venv on first use; `make test` also runs ruff (lint, import order, format). TORCH picks the PyTorch build (the CPU wheel here; `make demo TORCH=torch` elsewhere).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
PROMPTS := --prompt "red heart" --prompt "grinning face" --prompt "red apple" --prompt "sun" \
           --prompt "blue heart" --prompt "green apple" --prompt "frog" --prompt "smiling face with sunglasses"

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[test]'
	# FID/KID reference implementations for the parity tests; --no-deps because both pull in torchvision.
	$(BIN)/python -m pip install -q --no-deps pytorch-fid==0.3.0 torch-fidelity==0.4.0
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/fluxlab train --config openmoji-cpu
	$(BIN)/fluxlab sample --checkpoint runs/openmoji-cpu $(PROMPTS) --out outputs/openmoji-cpu.png

test: install-test
	$(BIN)/ruff check fluxlab tests
	$(BIN)/ruff format --check fluxlab tests
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs outputs
