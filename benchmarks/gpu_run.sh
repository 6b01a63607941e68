#!/usr/bin/env bash
# Prepared GPU benchmark (one GPU, <= ~8 minutes): Llama-3.1-8B-shaped LlamaForCausalLM with
# random bf16 weights built on the device (speed and memory do not depend on the weights),
# offline tiny tokenizer (ids < vocab). Two runs:
#   1. reference KV already on the GPU (--kv-placement device), lengths 2k..16k, memory sweep at 4k;
#   2. reference KV as pageable host numpy, as from the object store (--kv-placement host): full and
#      semshare plus host_staging whole vs layered (benchmarks/sweeps/gpu-staging.yaml).
# Each prints JSON lines as it goes (kept in $OUT/*.jsonl even if a run is cut by its timeout) and
# writes <name>.json/.md/_*.png into $OUT. Needs torch + transformers only (no faiss/ray/fastapi).
#
#   OUT=/some/dir bash benchmarks/gpu_run.sh            # on the GPU machine
#   SMOKE=1 OUT=/tmp/x bash benchmarks/gpu_run.sh       # tiny CPU rehearsal of the same commands
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PY=${PY:-python}
mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [[ "${SMOKE:-0}" == "1" ]]; then
  COMMON=(--model llama3-8b-random --model-shape small --device cpu --dtype float32 --threads 1 --jsonl --no-progress)
  RUN1=(--lengths 64,128 --edits replace --ratios 0.3 --new-tokens 2 --reps 1 --memory-length 128 --budget-s 60
        --sweep benchmarks/sweeps/gpu.yaml)
  RUN2=(--lengths 128 --edits replace --ratios 0.3 --new-tokens 2 --reps 1 --memory-retentions 1.0 --budget-s 30
        --methods full,semshare --sweep benchmarks/sweeps/gpu-staging.yaml)
  T1=120 T2=90
else
  COMMON=(--model llama3-8b-random --device cuda --dtype bfloat16 --quick --jsonl --no-progress)
  RUN1=(--budget-s "${B1:-170}" --sweep benchmarks/sweeps/gpu.yaml)
  RUN2=(--lengths 4096,16384 --edits replace --ratios 0.1 --memory-retentions 1.0 --budget-s "${B2:-90}"
        --methods full,semshare --sweep benchmarks/sweeps/gpu-staging.yaml)
  T1=${T1:-270} T2=${T2:-190}
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } > "$OUT/gpu_info.csv" 2>&1 || true
fi
$PY -c "import torch, transformers, sys; print(torch.__version__, transformers.__version__, torch.cuda.is_available(), sys.version)" \
  | tee "$OUT/versions.txt"

echo "== run 1: reference KV on the device ==" >&2
timeout "$T1" $PY -m benchmarks "${COMMON[@]}" "${RUN1[@]}" --kv-placement device \
  --name gpu-llama3-8b-device --out-dir "$OUT" | tee "$OUT/gpu-llama3-8b-device.jsonl"
rc1=${PIPESTATUS[0]}

echo "== run 2: reference KV in pageable host memory ==" >&2
timeout "$T2" $PY -m benchmarks "${COMMON[@]}" "${RUN2[@]}" --kv-placement host \
  --name gpu-llama3-8b-host --out-dir "$OUT" | tee "$OUT/gpu-llama3-8b-host.jsonl"
rc2=${PIPESTATUS[0]}

echo "exit codes: device=$rc1 host=$rc2" | tee "$OUT/exit_codes.txt"
[[ $rc1 == 0 && $rc2 == 0 ]]
