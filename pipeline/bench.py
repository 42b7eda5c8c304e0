"""Latency, throughput, size, memory and cold start of a set of artifacts, measured side by side.

Every artifact is loaded once; then, for each device and each (batch size, sequence length) point of
the grid, the artifacts take turns in short time slices (round robin) until each has its minimum
number of iterations and seconds. On a shared, noisy machine that keeps the ratios between artifacts
honest: a slow minute hits them all alike. Raw per-iteration times are kept for the report's
distributions. Size, parameters, score and lineage come from each artifact's `bertforge.json`.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import MANIFEST, package_versions, read_manifest
from pipeline.data.glue import GLUE_DIR_HELP
from pipeline.errors import BertforgeError
from pipeline.providers import select_providers, torch_device
from pipeline.settings import setting

WEIGHT_SUFFIXES = (".onnx", ".onnx_data", ".data", ".safetensors", ".bin", ".pt", ".pth")
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
             "amx_tile", "amx_int8", "amx_bf16")
INT8_OPS = {"MatMulInteger", "DynamicQuantizeLinear", "QLinearMatMul", "QAttention", "DynamicQuantizeMatMul",
            "QuantizeLinear", "QGemm", "MatMulIntegerToFloat"}


@dataclass
class BenchConfig:
    batch_sizes: list[int] = setting(help="batch sizes of the grid", factory=lambda: [1, 32])
    seq_lens: list[int] = setting(help="sequence lengths of the grid", factory=lambda: [128])
    warmup: int = setting(3, "untimed calls before measuring")
    min_iters: int = setting(10, "timed calls per artifact and grid point, at least")
    min_seconds: float = setting(1.0, "measured seconds per artifact and grid point")
    max_seconds: float = setting(60.0, "cap per artifact and grid point (a BERT-base at batch 32 on 2 cores)")
    slice_seconds: float = setting(0.1, "one artifact's turn in the rotation")
    threads: int | None = setting(None, "intra-op threads for torch and ONNX Runtime (default: every usable core)")
    device: str = setting("auto", "auto: cpu, plus cuda when present", choices=("cpu", "cuda", "auto"))
    cold_start: str = setting("subprocess", "measure load + first call in a fresh process (honest peak memory) or in "
                                            "this one", choices=("subprocess", "inprocess"))
    seed: int = setting(0, "seed of the random input ids")
    # Real text, beside the padded grid: what a user's traffic costs (pipeline/bench_text.py)
    texts: str | None = setting(None, "also time real text at its own lengths: a GLUE task's dev sentences, or a file "
                                      "(one text per line, a tab splits a pair)", metavar="TASK|FILE")
    texts_limit: int | None = setting(None, "real text: the first N texts only (default: all)")
    text_batch_sizes: list[int] = setting(help="real text: batch sizes of the length-sorted throughput",
                                          factory=lambda: [8, 32])
    glue_dir: str | None = setting(None, GLUE_DIR_HELP + "; real text of a task comes from its dev split", env="GLUE_DIR")
    max_length: int | None = setting(None, "real text: word pieces per text at most (default: the task's, 128 for a file)")

    def __post_init__(self):
        if not self.batch_sizes or not self.seq_lens or min(self.batch_sizes) < 1 or min(self.seq_lens) < 2:
            raise BertforgeError("batch sizes must be >= 1 and sequence lengths >= 2")
        if not self.text_batch_sizes or min(self.text_batch_sizes) < 1 or (self.texts_limit is not None and self.texts_limit < 1):
            raise BertforgeError("real-text batch sizes and texts_limit must be >= 1")
        if self.device not in ("cpu", "cuda", "auto"):
            raise BertforgeError(f"device must be cpu, cuda or auto, not {self.device!r}")
        if self.cold_start not in ("subprocess", "inprocess"):
            raise BertforgeError(f"cold_start must be subprocess or inprocess, not {self.cold_start!r}")


@dataclass
class ArtifactSpec:
    name: str
    path: Path

    @classmethod
    def parse(cls, text: str) -> "ArtifactSpec":
        """`NAME=PATH` or `PATH` (named after the folder)."""
        name, sep, path = text.partition("=")
        if not sep:
            name, path = "", text
        path = Path(path).expanduser()
        if not path.is_dir() or not (path / "config.json").is_file():
            raise BertforgeError(f"{path} is not an artifact folder (no config.json)")
        return cls(name or path.name, path)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def resolve_devices(device: str) -> list[str]:
    import torch

    if device == "cuda":
        torch_device(device)  # a clear error when torch sees no GPU
    if device == "auto":
        return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    return [device]


# ---------------------------------------------------------------- what is measured on (hardware, versions)

def hardware_info() -> dict[str, Any]:
    import psutil
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "logical_cores": os.cpu_count(), "usable_cores": usable_cores(),
                            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        text = cpuinfo.read_text(errors="replace")
        fields = {}
        for line in text.splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        flags = set(fields.get("flags", "").split())
        info["cpu_model"] = fields.get("model name", platform.processor())
        info["cpu_flags"] = [f for f in CPU_FLAGS if f in flags]
    else:
        info["cpu_model"], info["cpu_flags"] = platform.processor(), []
    info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    info["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    try:
        import onnxruntime as ort

        info["ort_providers"] = ort.get_available_providers()
    except ImportError:
        info["ort_providers"] = []
    return info


def versions() -> dict[str, str]:
    from importlib import metadata

    out = package_versions()
    for name in ("psutil", "matplotlib"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------- static facts of an artifact

def artifact_info(spec: ArtifactSpec) -> dict[str, Any]:
    """What the artifact is (format, precision, size, params, score, lineage), without running it."""
    from pipeline.inference import is_onnx_artifact

    manifest = read_manifest(spec.path)
    fmt = "onnx" if is_onnx_artifact(spec.path) else "pytorch"
    files = [p for p in spec.path.rglob("*") if p.is_file() and p.relative_to(spec.path).parts[0] not in ("checkpoints", "logs")]
    weights = [p for p in files if p.name.endswith(WEIGHT_SUFFIXES)]
    if fmt == "onnx":
        weights = _onnx_weight_files(spec.path, weights)
    info: dict[str, Any] = {
        "name": spec.name, "path": str(spec.path), "format": fmt,
        "size_bytes": sum(p.stat().st_size for p in files if p.name != MANIFEST),
        "model_bytes": sum(p.stat().st_size for p in weights),
        "has_manifest": manifest is not None,
    }
    params = manifest.params if manifest else {}
    info.update({
        "stage": manifest.stage if manifest else None,
        "task": manifest.task if manifest else None,
        "precision": manifest.precision if manifest else _guess_precision(spec.path, fmt),
        "score": manifest.score if manifest else None,
        "metrics": manifest.metrics.get("dev", {}) if manifest else {},
        "num_parameters": manifest.num_parameters if manifest else None,
        "parent": manifest.parent if manifest else None,
        "lineage": manifest.lineage if manifest else [],
        "params": {k: v for k, v in params.items() if isinstance(v, (str, int, float, bool, type(None)))},
        "shape_only": bool(params.get("shape_only", False)),
        "baseline": baseline_role(manifest, fmt),
        "fine_tuned": bool(params.get("fine_tuned", False)),
    })
    if info["baseline"] and not info["fine_tuned"]:
        info["score"] = None  # an untrained head: speed and size only, never accuracy
    if info["num_parameters"] is None and fmt == "onnx":
        info["num_parameters"] = _onnx_parameters(spec.path)
    return info


def baseline_role(manifest, fmt: str) -> str | None:
    if manifest is None or manifest.stage != "baseline":
        return None
    role = manifest.params.get("baseline_role")
    return role or f"{'ort' if fmt == 'onnx' else 'torch'}_{manifest.precision}"


def _onnx_weight_files(folder: Path, weights: list[Path]) -> list[Path]:
    """The model's own .onnx (and its external data): a folder may also hold unfused or fp32 siblings."""
    from pipeline.inference import onnx_file

    main = folder / onnx_file(folder)
    keep = [main]
    keep += [p for p in weights if not p.name.endswith(".onnx") and p.name.startswith(main.name)]
    return keep


def _guess_precision(folder: Path, fmt: str) -> str:
    if fmt != "onnx":
        return "fp32"
    import onnx
    from pipeline.inference import onnx_file

    model = onnx.load(str(folder / onnx_file(folder)), load_external_data=False)
    if any(n.op_type in INT8_OPS for n in model.graph.node):
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        return "fp16"
    return "fp32"


def _onnx_parameters(folder: Path) -> int:
    import onnx
    from pipeline.inference import onnx_file

    model = onnx.load(str(folder / onnx_file(folder)), load_external_data=False)
    return int(sum(np.prod(t.dims) for t in model.graph.initializer if len(t.dims) >= 1))


# ---------------------------------------------------------------- running

def make_inputs(vocab_size: int, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    """Full-length random sequences (no padding): the cost of `seq` real tokens."""
    rng = np.random.default_rng(seed)
    low = min(1000, vocab_size // 2)
    ids = rng.integers(low, vocab_size, size=(batch, seq), dtype=np.int64)
    ids[:, 0], ids[:, -1] = 101 % vocab_size, 102 % vocab_size
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def unsupported(info: dict[str, Any], device: str) -> str | None:
    """Why an artifact cannot run on `device` here (None: it can)."""
    if info["format"] == "onnx" and info["precision"] == "fp16" and device == "cpu":
        return "fp16 ONNX graph: built for GPUs"
    if info["format"] == "onnx" and device == "cuda":
        try:
            select_providers(device)
        except BertforgeError as e:
            return str(e)
    return None


def load_for_bench(path: str | Path, device: str, threads: int, precision: str):
    from pipeline.inference import load_runtime

    runtime = load_runtime(path, device, threads)
    if runtime.format == "pytorch" and device == "cuda" and precision == "fp16":
        runtime.model.half()
    return runtime


def provider_of(runtime) -> str:
    if runtime.format == "onnx":
        return runtime.session.get_providers()[0]
    return f"torch:{runtime.device}"


def _timed_call(runtime, inputs, device: str) -> float:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        t0 = time.perf_counter()
        runtime(inputs)
        torch.cuda.synchronize()  # kernels are asynchronous: stop the clock when they are done
        return time.perf_counter() - t0
    t0 = time.perf_counter()
    runtime(inputs)
    return time.perf_counter() - t0


def cold_start(path: str | Path, device: str, threads: int, precision: str, seq: int) -> dict[str, Any]:
    """Load + first inference at batch 1 in THIS process, and the resident memory they added."""
    import psutil

    proc = psutil.Process()
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        cuda0 = torch.cuda.memory_allocated()
    rss0 = proc.memory_info().rss
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    runtime = load_for_bench(path, device, threads, precision)
    t1 = time.perf_counter()
    seq = min(seq, getattr(runtime.config, "max_position_embeddings", seq))
    _timed_call(runtime, make_inputs(runtime.config.vocab_size, 1, seq, 0), device)
    t2 = time.perf_counter()
    peak1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rss1 = proc.memory_info().rss
    # ru_maxrss is the process's high-water mark: only a fresh process makes its rise this artifact's own
    peak_delta = max(peak1 - max(peak0, rss0), rss1 - rss0)
    out = {"load_s": round(t1 - t0, 4), "first_inference_s": round(t2 - t1, 4), "total_s": round(t2 - t0, 4),
           "peak_rss_delta_mb": round(peak_delta / 2**20, 1), "rss_delta_mb": round((rss1 - rss0) / 2**20, 1),
           "_runtime": runtime}
    if device == "cuda" and runtime.format == "pytorch":  # ONNX Runtime's CUDA memory is not torch's to count
        out["cuda_peak_mb"] = round((torch.cuda.max_memory_allocated() - cuda0) / 2**20, 1)
    return out


def cold_start_subprocess(path: str | Path, device: str, threads: int, precision: str, seq: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pipeline.bench", "cold-start", str(path), device, str(threads), precision, str(seq)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BertforgeError(f"cold start of {path} failed: {tail[:200]}")
    return json.loads(lines[-1])


def summarize(samples_s: list[float], batch: int) -> dict[str, Any]:
    ms = np.asarray(samples_s) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"iters": int(ms.size), "p50_ms": round(float(p50), 4), "p90_ms": round(float(p90), 4),
            "p99_ms": round(float(p99), 4), "mean_ms": round(float(ms.mean()), 4), "std_ms": round(float(ms.std()), 4),
            "min_ms": round(float(ms.min()), 4), "throughput_seq_s": round(float(batch * 1000.0 / ms.mean()), 2),
            "samples_ms": [round(float(x), 4) for x in ms]}


def run_grid_point(runners: list[tuple[str, Any]], inputs: dict[str, dict], device: str, cfg: BenchConfig) -> dict[str, list[float]]:
    """Round robin: each runner gets `slice_seconds` (at least one iteration) per turn, until every
    runner has min_iters and min_seconds (or hit max_seconds)."""
    for name, runtime in runners:
        for _ in range(cfg.warmup):
            _timed_call(runtime, inputs[name], device)
    samples: dict[str, list[float]] = {name: [] for name, _ in runners}
    spent = {name: 0.0 for name, _ in runners}

    def done(name):
        return spent[name] >= cfg.max_seconds or (len(samples[name]) >= cfg.min_iters and spent[name] >= cfg.min_seconds)

    while not all(done(name) for name, _ in runners):
        for name, runtime in runners:
            if spent[name] >= cfg.max_seconds:
                continue  # keeps the rest of the rotation going without this one
            turn = time.perf_counter()
            while True:
                dt = _timed_call(runtime, inputs[name], device)
                samples[name].append(dt)
                spent[name] += dt
                if time.perf_counter() - turn >= cfg.slice_seconds or spent[name] >= cfg.max_seconds:
                    break
    return samples


def benchmark_artifacts(paths: list[str | Path | ArtifactSpec], cfg: BenchConfig | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """Measure every artifact over cfg's grid on each device; the result is JSON-ready (see module doc)."""
    import torch

    cfg = cfg or BenchConfig()
    specs = [p if isinstance(p, ArtifactSpec) else ArtifactSpec.parse(str(p)) for p in paths]
    if not specs:
        raise BertforgeError("no artifacts to benchmark")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise BertforgeError(f"artifact names must be unique (use NAME=PATH): {names}")
    threads = cfg.threads or usable_cores()
    devices = resolve_devices(cfg.device)
    torch.set_num_threads(threads)
    log = (lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)) if progress else (lambda msg: None)

    artifacts = [artifact_info(s) for s in specs]
    ref_seq = 128 if 128 in cfg.seq_lens else max(cfg.seq_lens)
    results, skipped, text_results = [], [], []
    texts = None
    if cfg.texts:
        from pipeline.bench_text import load_texts, measure_texts

        texts = load_texts(cfg.texts, cfg.glue_dir, cfg.texts_limit, cfg.max_length)
    for device in devices:
        runtimes = {}
        for spec, info in zip(specs, artifacts):
            reason = unsupported(info, device)
            if reason:
                skipped.append({"artifact": spec.name, "device": device, "reason": reason})
                continue
            try:
                if cfg.cold_start == "subprocess":
                    cs = cold_start_subprocess(spec.path, device, threads, info["precision"], ref_seq)
                    runtime = load_for_bench(spec.path, device, threads, info["precision"])
                else:
                    cs = cold_start(spec.path, device, threads, info["precision"], ref_seq)
                    runtime = cs.pop("_runtime")
            except BertforgeError as e:
                if device == "cpu":
                    raise
                skipped.append({"artifact": spec.name, "device": device, "reason": str(e)})
                continue
            cs["method"] = cfg.cold_start
            info.setdefault("cold_start", {})[device] = cs
            if device == "cuda" and runtime.format == "onnx" and not provider_of(runtime).startswith("CUDA"):
                skipped.append({"artifact": spec.name, "device": device, "reason": "ONNX Runtime fell back to the CPU provider"})
                continue
            if info["num_parameters"] is None and runtime.format == "pytorch":
                info["num_parameters"] = sum(p.numel() for p in runtime.model.parameters())
            runtimes[spec.name] = runtime
            log(f"{spec.name}: {device} cold start {cs['total_s']:.2f} s")
        for batch in cfg.batch_sizes:
            for seq in cfg.seq_lens:
                runners, inputs = [], {}
                for name, runtime in runtimes.items():
                    limit = getattr(runtime.config, "max_position_embeddings", seq)
                    if seq > limit:
                        skipped.append({"artifact": name, "device": device, "batch_size": batch, "seq_len": seq,
                                        "reason": f"sequence length above max_position_embeddings={limit}"})
                        continue
                    runners.append((name, runtime))
                    inputs[name] = make_inputs(runtime.config.vocab_size, batch, seq, cfg.seed)
                t0 = time.perf_counter()
                samples = run_grid_point(runners, inputs, device, cfg)
                for name, runtime in runners:
                    row = {"artifact": name, "device": device, "provider": provider_of(runtime),
                           "batch_size": batch, "seq_len": seq, **summarize(samples[name], batch)}
                    results.append(row)
                log(f"{device} b{batch} s{seq}: " + ", ".join(
                    f"{r['artifact']} {r['p50_ms']:.2f} ms" for r in results[-len(runners):]) + f" ({time.perf_counter() - t0:.0f} s)")
        if texts is not None and runtimes:  # same process, same threads, right after the grid
            text_results += measure_texts(runtimes, texts, device, cfg, set(cfg.seq_lens) | {ref_seq}, log)
        del runtimes
    return {
        "bertforge_bench": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": asdict(cfg),
        "reference_seq_len": ref_seq,
        "threads": {"intra_op": threads, "torch_num_threads": torch.get_num_threads(),
                    "torch_interop_threads": torch.get_num_interop_threads(), "ort_inter_op": 1,
                    "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}},
        "hardware": hardware_info(),
        "versions": versions(),
        "devices": devices,
        "artifacts": artifacts,
        "results": results,
        "skipped": skipped,
        **({"texts": texts.describe(), "text_results": text_results} if texts is not None else {}),
    }


def write_bench(result: dict[str, Any], out: str | Path) -> Path:
    from pipeline.atomic import atomic_write_json  # never half a file, even if killed mid-write

    return atomic_write_json(out, result, indent=1)


def read_bench(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise BertforgeError(f"bench file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BertforgeError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or "results" not in data or "artifacts" not in data:
        raise BertforgeError(f"{path} is not a `bertforge bench` result")
    return data


def _cold_start_main(argv: list[str]) -> None:
    path, device, threads, precision, seq = argv
    t0 = time.perf_counter()
    # Libraries are imported first: cold start is the artifact's own cost (load + first call), not Python's
    import onnxruntime  # noqa: F401
    import torch
    import transformers.models.bert.modeling_bert  # noqa: F401
    from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401

    import pipeline.inference  # noqa: F401

    torch.set_num_threads(int(threads))
    import_s = time.perf_counter() - t0
    out = cold_start(path, device, int(threads), precision, int(seq))
    out.pop("_runtime")
    out["import_s"] = round(import_s, 3)
    print(json.dumps(out), flush=True)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "cold-start":
    _cold_start_main(sys.argv[2:])
