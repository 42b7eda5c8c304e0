# bertforge CPU images. Two targets:
#   serve (the default, last stage): the slim install — onnxruntime, tokenizers, the HTTP stack, no torch —
#          serving an ONNX artifact with `bertforge serve`.
#   pipeline: the whole pipeline (`bertforge[all]`, CPU torch) for every other command.
#
#   docker build -t bertforge .                                  # the serving image
#   docker build --target pipeline -t bertforge-pipeline .
#   docker run --rm -p 8080:8080 --cpus 2 -v "$PWD/runs/quickstart/int8:/model:ro" bertforge
#   curl -s localhost:8080/ -H 'content-type: application/json' -d '{"inputs": "a gripping film"}'
#   docker run --rm -v "$PWD/runs:/work/runs" bertforge-pipeline bertforge run --config /app/configs/quickstart.yaml
#
# Mount an ONNX artifact read-only at /model (PyTorch artifacts need the pipeline image). The API key, if
# any, comes from $BERTFORGE_API_KEY; the model's Open Inference Protocol name from --model-name (default:
# "model", the mount's name).
# Threads: ONNX Runtime's default thread count follows the container's CPU quota (`--cpus`, Kubernetes CPU
# limits), not the host's cores; --threads overrides it.
# Stopping: on SIGTERM the server stops accepting, answers what is in flight for up to --graceful-timeout
# seconds, then exits. Docker kills the container 10 s after SIGTERM by default, so the image drains for 8;
# to drain longer raise both, the stop timeout above the drain time:
#   docker run --stop-timeout 40 ... bertforge bertforge serve ... --graceful-timeout 30
#   (compose: stop_grace_period: 40s; Kubernetes: terminationGracePeriodSeconds: 40)
# This Dockerfile could not be built where it was written (no Docker daemon there).

# ---- the pipeline: CPU torch first (a bare `torch` pulls several GB of CUDA), then bertforge[all]
FROM python:3.11-slim AS pipeline-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY serving ./serving
COPY benchmarks ./benchmarks
# torch==2.13.0 in pyproject is met by the 2.13.0+cpu build above, so pip keeps it
RUN pip install '.[all]' && find /opt/venv -name "__pycache__" -type d -prune -exec rm -rf {} +

FROM python:3.11-slim AS pipeline
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false \
    HF_HOME=/home/bertforge/.cache/huggingface
RUN useradd --create-home --uid 10001 bertforge && mkdir -p /work /model && chown bertforge /work
COPY --from=pipeline-build /opt/venv /opt/venv
COPY configs /app/configs
USER bertforge
WORKDIR /work
CMD ["bertforge", "--help"]

# ---- serving: the base install only (no torch, transformers, training stack or Locust)
FROM python:3.11-slim AS serve-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY serving ./serving
COPY benchmarks ./benchmarks
RUN pip install . && python -c "import importlib.util as u; assert u.find_spec('torch') is None" \
    && find /opt/venv -name "__pycache__" -type d -prune -exec rm -rf {} +

FROM python:3.11-slim AS serve
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false
RUN useradd --create-home --uid 10001 bertforge && mkdir -p /model
COPY --from=serve-build /opt/venv /opt/venv
USER bertforge
EXPOSE 8080
STOPSIGNAL SIGTERM
# Readiness, not liveness: the model is loaded and warmed up (slim has no curl: Python asks)
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=4)"]
CMD ["bertforge", "serve", "--model", "/model", "--host", "0.0.0.0", "--port", "8080", "--graceful-timeout", "8"]
