#!/usr/bin/env bash
# bertforge's GPU suite: every GPU path in one command, for the one short call a lent device allows
# (under 8 minutes on an H100/H200). The work is in benchmarks/gpu_bench.py; read its docstring.
#
# What it assumes of the device machine (the `nvidia-h200` kind, as described for this workplace):
# - `python3` holds torch with CUDA, transformers, accelerate, onnx, onnxruntime, tokenizers,
#   safetensors, scipy and scikit-learn; there is no network and nothing is pip-installed.
# - Its onnxruntime is the CPU package: no CUDAExecutionProvider and no TensorRT. The ORT CUDA and
#   TensorRT rows are then skipped with that reason (an onnxruntime-gpu wheel is far over the 64 MiB
#   a call may carry); where an onnxruntime-gpu is installed they run, with IO binding.
# - optimum, fastapi, uvicorn, locust and the packaged teacher are absent: the export uses torch's
#   own exporter, the serving path is timed without HTTP, and the teacher (all-MiniLM-L6-v2 in fp16,
#   45 MB) travels in .gpu_carry/ with the commit (the working tree arrives without .git).
#
#   bash benchmarks/gpu_suite.sh --prepare   # here, before the call: writes .gpu_carry/ (git-ignored)
#   bash benchmarks/gpu_suite.sh             # on the device, carrying .gpu_carry: benchmarks/results/gpu.json
#   bash benchmarks/gpu_suite.sh --dry-run   # anywhere: the whole flow on the CPU at tiny sizes (temp file)
#
# Extra arguments go to gpu_bench.py (--out, --teacher, --glue-dir, --seed, --budget-s). PYTHON picks
# the interpreter (default python3). Where $OUT is set (the device tool), gpu.json and the log are
# copied there so that they come back.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

dry=0
for a in "$@"; do [ "$a" = "--dry-run" ] && dry=1; done
log="${TMPDIR:-/tmp}/bertforge-gpu-suite.log"
[ -n "${OUT:-}" ] && log="$OUT/gpu_suite.log"

# The driver stops starting steps after its budget (360 s); this is the last resort. Its result
# file is rewritten after every step, so even a killed run leaves what it measured.
timeout --signal=INT --kill-after=15 470 "$PY" -m benchmarks.gpu_bench "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ] && [ "$dry" = 0 ] && [ -f benchmarks/results/gpu.json ]; then
    cp benchmarks/results/gpu.json "$OUT/gpu.json"
fi
exit "$rc"
