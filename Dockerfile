# bertforge CPU image: serves an artifact with `bertforge serve` by default, and runs any other command
# (the whole pipeline included).
#
#   docker build -t bertforge .
#   docker run --rm -p 8080:8080 -v "$PWD/runs/quickstart/int8:/model:ro" bertforge
#   curl -s localhost:8080/predict -H 'content-type: application/json' -d '{"inputs": "a gripping film"}'
#   docker run --rm -v "$PWD/runs:/work/runs" bertforge bertforge run --config /app/configs/quickstart.yaml
#
# The model folder is any bertforge artifact (ONNX or PyTorch); mount it read-only at /model. Serving flags
# go after the image name: `docker run ... bertforge bertforge serve --model /model --host 0.0.0.0
# --port 8080 --threads 2`. The API key, if any, comes from $BERTFORGE_API_KEY.

# ---- build: a virtual environment with the CPU build of torch (a bare `torch` pulls several GB of CUDA)
FROM python:3.11-slim AS build
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
RUN pip install . && find /opt/venv -name "__pycache__" -type d -prune -exec rm -rf {} +

# ---- runtime: the environment only, no compilers or build files, an unprivileged user
FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HOME=/home/bertforge/.cache/huggingface
RUN useradd --create-home --uid 10001 bertforge && mkdir -p /work /model && chown bertforge /work
COPY --from=build /opt/venv /opt/venv
COPY configs /app/configs
USER bertforge
WORKDIR /work
EXPOSE 8080
# slim has no curl: Python asks the liveness route
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
CMD ["bertforge", "serve", "--model", "/model", "--host", "0.0.0.0", "--port", "8080"]
