"""Take the teacher and a distilled student through every compression stage and measure them side by side.

For each task (default SST-2 and MRPC) and each source model (teacher, student):
  export (plain ONNX) -> fused ONNX (O2) -> int8 dynamic, int8 accuracy-aware (1% tolerance),
  fp16 (GPU graph: no CPU latency); plain ONNX -> int8 static (QDQ, U8S8);
  PyTorch -> neural-compressor int8 (PT2E, uncompiled);
and for the student: structured pruning (half the heads, half the FFN neurons, optional recovery
distillation) -> fused ONNX -> int8 dynamic.
Artifacts go under benchmarks/results/compress/<task>/ (git-ignored); rows go to
benchmarks/results/compress.json:
  {"task", "artifact", "parent", "format", "precision", "score", "size_bytes", "params",
   "latency_ms_b1_s128", "latency_ms_b32_s128"}
Latencies are medians measured in this run, every artifact of a task interleaved with the others (warm-up,
then round-robin time slices: pipeline.bench), so a noisy minute on the shared CPU hits them all alike.
Resumable: a stage whose folder already has its bertforge.json is not rebuilt.

    python benchmarks/compress_glue.py --glue-dir ../shared/glue_data
    python benchmarks/compress_glue.py --tasks sst2 --student sst2=benchmarks/results/students/sst2/tinybert-L3-H384-from-teacher
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from benchmarks.common import command_line, write_results

RESULTS = Path(__file__).resolve().parent / "results"
PREFERRED_STUDENT = "tinybert-L3-H384-from-teacher"


def build_artifacts(task: str, source: str, name: str, work: Path, args, prune_it: bool) -> list[tuple[str, Path]]:
    """Every stage for one source model; returns (artifact name, folder) in build order."""
    from pipeline.artifacts import read_manifest
    from pipeline.export import ExportConfig, export
    from pipeline.prune import PruneConfig, prune
    from pipeline.quantize import QuantizeConfig, quantize
    from pipeline.training import LoopConfig

    def stage(folder: Path, make):
        if read_manifest(folder) is None:
            t0 = time.perf_counter()
            make(str(folder))
            log(f"{task} {folder.name}: built in {time.perf_counter() - t0:.0f} s")
        return folder

    g = args.glue_dir
    built = [(f"{name}", Path(source))]
    plain = stage(work / f"{name}-onnx", lambda o: export(ExportConfig(model=source, out=o, task=task, glue_dir=g, optimize="none"), progress=False))
    fused = stage(work / f"{name}-onnx-o2", lambda o: export(ExportConfig(model=source, out=o, task=task, glue_dir=g), progress=False))
    built += [(f"{name}-onnx", plain), (f"{name}-onnx-o2", fused)]
    built.append((f"{name}-onnx-o2-int8-dynamic", stage(work / f"{name}-onnx-o2-int8-dynamic", lambda o: quantize(
        QuantizeConfig(model=str(fused), out=o, mode="dynamic", task=task, glue_dir=g), progress=False))))
    if not args.skip_aware:
        built.append((f"{name}-onnx-o2-int8-aware", stage(work / f"{name}-onnx-o2-int8-aware", lambda o: quantize(
            QuantizeConfig(model=str(fused), out=o, mode="dynamic", task=task, glue_dir=g, tolerance=args.tolerance,
                           eval_examples=args.aware_eval_examples), progress=False))))
    built.append((f"{name}-onnx-int8-static", stage(work / f"{name}-onnx-int8-static", lambda o: quantize(
        QuantizeConfig(model=str(plain), out=o, mode="static", task=task, glue_dir=g), progress=False))))
    built.append((f"{name}-onnx-o2-fp16", stage(work / f"{name}-onnx-o2-fp16", lambda o: quantize(
        QuantizeConfig(model=str(fused), out=o, mode="fp16", task=task, glue_dir=g), progress=False))))
    if not args.skip_inc:
        built.append((f"{name}-inc-int8-static", stage(work / f"{name}-inc-int8-static", lambda o: quantize(
            QuantizeConfig(model=source, out=o, mode="inc-static", task=task, glue_dir=g), progress=False))))
    if prune_it:
        loop = LoopConfig(epochs=max(args.recover_epochs, 1), batch_size=32, learning_rate=args.recover_lr,
                          max_steps_per_epoch=args.recover_max_steps, checkpoint_every=100)
        pruned = stage(work / f"{name}-pruned", lambda o: prune(PruneConfig(
            model=source, task=task, out=o, glue_dir=g, heads=args.prune_heads, ffn=args.prune_ffn,
            recover_epochs=args.recover_epochs, max_train_examples=args.recover_max_examples, loop=loop), resume=True, progress=False))
        pfused = stage(work / f"{name}-pruned-onnx-o2", lambda o: export(ExportConfig(model=str(pruned), out=o, task=task, glue_dir=g), progress=False))
        pint8 = stage(work / f"{name}-pruned-onnx-o2-int8-dynamic", lambda o: quantize(
            QuantizeConfig(model=str(pfused), out=o, mode="dynamic", task=task, glue_dir=g), progress=False))
        built += [(f"{name}-pruned", pruned), (f"{name}-pruned-onnx-o2", pfused), (f"{name}-pruned-onnx-o2-int8-dynamic", pint8)]
    return built


def load_runner(path: Path, threads: int):
    """A runtime for any artifact here (pruned PyTorch and neural-compressor folders included); None for fp16."""
    from pipeline.artifacts import read_manifest
    from pipeline.inference import OrtClassifier, TorchClassifier, is_onnx_artifact
    from pipeline.models import load_tokenizer
    from pipeline.models import load_model
    from pipeline.quantize import PT2_FILE, Pt2Classifier

    manifest = read_manifest(path)
    if manifest and manifest.precision == "fp16":
        return None  # a GPU graph: ONNX Runtime's CPU provider lacks fp16 kernels for it
    if is_onnx_artifact(path):
        return OrtClassifier(str(path), num_threads=threads)
    if (path / PT2_FILE).is_file():
        return Pt2Classifier(str(path), num_threads=threads)
    return TorchClassifier.from_model(load_model(str(path)).eval(), load_tokenizer(str(path)))


def describe(task: str, name: str, path: Path) -> dict:
    from pipeline.artifacts import read_manifest

    m = read_manifest(path)
    weights = [p for p in path.rglob("*") if p.is_file() and p.suffix in (".onnx", ".safetensors", ".bin", ".pt2")]
    return {"task": task, "artifact": name, "parent": m.parent if m else None, "format": m.format if m else "pytorch",
            "precision": m.precision if m else "fp32", "score": m.score if m else None,
            "size_bytes": sum(p.stat().st_size for p in weights), "params": m.num_parameters if m else None,
            "path": str(path)}


def measure(rows: list[dict], paths: list[Path], args) -> None:
    """Median latency at (b1, s128) and (b32, s128), all artifacts of a task interleaved."""
    import torch

    from pipeline.bench import BenchConfig, make_inputs, run_grid_point

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    runners = []
    for row, path in zip(rows, paths):
        runtime = load_runner(path, threads)
        if runtime is None:
            row["latency_note"] = "fp16 graph for GPUs: not timed on this CPU"
        else:
            runners.append((row["artifact"], runtime, row))
            if row["params"] is None and hasattr(runtime, "model"):
                row["params"] = sum(p.numel() for p in runtime.model.parameters())
    cfg = BenchConfig(warmup=args.warmup, min_iters=args.min_iters, min_seconds=args.min_seconds,
                      max_seconds=args.max_seconds)
    for batch, key in ((1, "latency_ms_b1_s128"), (32, "latency_ms_b32_s128")):
        inputs = {name: make_inputs(rt.config.vocab_size, batch, min(128, rt.config.max_position_embeddings), 0)
                  for name, rt, _ in runners}
        samples = run_grid_point([(name, rt) for name, rt, _ in runners], inputs, "cpu", cfg)
        for name, _, row in runners:
            row[key] = round(float(sorted(samples[name])[len(samples[name]) // 2] * 1000), 3)
            row[key.replace("latency", "iters")] = len(samples[name])
        log("b%d: " % batch + ", ".join(f"{n} {r[key]:.1f} ms" for n, _, r in runners))
    for row in rows:
        row.setdefault("latency_ms_b1_s128", None)
        row.setdefault("latency_ms_b32_s128", None)
    for row in rows:
        row["threads"] = threads


def default_student(task: str) -> Path | None:
    root = RESULTS / "students" / task
    if (root / PREFERRED_STUDENT / "bertforge.json").is_file():
        return root / PREFERRED_STUDENT
    done = sorted(p.parent for p in root.glob("*/bertforge.json"))
    return done[0] if done else None


def log(msg: str) -> None:
    print(f"[compress] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("neural_compressor").setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["sst2", "mrpc"])
    p.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR"))
    p.add_argument("--teacher", action="append", default=[], metavar="TASK=DIR", help="default: results/teachers/TASK")
    p.add_argument("--student", action="append", default=[], metavar="TASK=DIR",
                   help=f"default: results/students/TASK/{PREFERRED_STUDENT} (else the first finished one)")
    p.add_argument("--work", default=str(RESULTS / "compress"), help="artifact folders (git-ignored)")
    p.add_argument("--out", default=str(RESULTS / "compress.json"))
    p.add_argument("--prune-heads", type=float, default=0.5)
    p.add_argument("--prune-ffn", type=float, default=0.5)
    p.add_argument("--prune-teacher", action="store_true", help="prune the teacher too (default: the student only)")
    p.add_argument("--recover-epochs", type=int, default=1)
    p.add_argument("--recover-max-examples", type=int, default=8000)
    p.add_argument("--recover-max-steps", type=int, default=None)
    p.add_argument("--recover-lr", type=float, default=5e-5)
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--aware-eval-examples", type=int, default=None)
    p.add_argument("--skip-aware", action="store_true")
    p.add_argument("--skip-inc", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-iters", type=int, default=10)
    p.add_argument("--min-seconds", type=float, default=2.0)
    p.add_argument("--max-seconds", type=float, default=60.0)
    args = p.parse_args()

    teachers = dict(s.split("=", 1) for s in args.teacher)
    students = dict(s.split("=", 1) for s in args.student)
    out = Path(args.out)
    table = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    for task in args.tasks:
        sources = []
        teacher = Path(teachers.get(task, RESULTS / "teachers" / task))
        if (teacher / "config.json").is_file():
            sources.append(("teacher", teacher, args.prune_teacher))
        else:
            log(f"{task}: no teacher at {teacher}, skipped")
        student = Path(students[task]) if task in students else default_student(task)
        if student and (student / "config.json").is_file():
            sources.append(("student", student, True))
        else:
            log(f"{task}: no student (pass --student {task}=DIR)")
        if not sources:
            continue
        work = Path(args.work) / task
        work.mkdir(parents=True, exist_ok=True)
        built = []
        for name, source, prune_it in sources:
            built += build_artifacts(task, str(source), name, work, args, prune_it)
        rows = [describe(task, name, path) for name, path in built]
        measure(rows, [path for _, path in built], args)
        for row in rows:  # per row: a later run of another task rewrites the file but keeps these rows
            row["command"] = command_line()
        table["rows"] = [r for r in table["rows"] if r["task"] != task] + rows
        table.update(created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                     note="latencies: medians in ms, artifacts of a task interleaved in one run on this CPU; "
                          "compare ratios within a task, not absolute times across runs")
        write_results(out, table, indent=1)
        log(f"{task}: {len(rows)} rows -> {out}")


if __name__ == "__main__":
    main()
