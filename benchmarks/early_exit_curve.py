"""Early exit's speed/accuracy curve on a real task: FastBERT exits trained on a fine-tuned teacher
(`bertforge distill --method early-exit`), then the dev set scored at each entropy threshold.

Each threshold is timed over the whole dev set, all thresholds one after another, repeated --repeats
times (so the machine's noise hits every threshold alike); a row's wall time is the median and its
speed-up is against threshold 0 (every layer runs) in the same repetition. Batch size 1 is the
serving case, where a sample that leaves early really skips the rest; larger batches only gain when
the whole batch has left.

Reads benchmarks/results/teachers/<task>/ (finetune_teachers.py); writes the exits to
benchmarks/results/students/<task>/early-exit/ (git-ignored) and the curve to
benchmarks/results/early_exit_<task>.json.

    python benchmarks/early_exit_curve.py --task cola --threads 1
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import command_line, write_results
from pipeline.artifacts import read_manifest
from pipeline.data import dev_split, get_task, load_glue
from pipeline.distill import distill
from pipeline.distill.config import DistillConfig
from pipeline.distill.early_exit import DEFAULT_THRESHOLDS, EarlyExitBert, parse_thresholds, speed_accuracy_curve
from pipeline.models import load_tokenizer
from pipeline.training import LoopConfig

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    logging.getLogger("torchao").setLevel(logging.ERROR)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR", "../shared/glue_data"))
    p.add_argument("--task", default="cola")
    p.add_argument("--epochs", type=int, default=2, help="self-distillation epochs of the exits")
    p.add_argument("--thresholds", default=DEFAULT_THRESHOLDS)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="default: results/early_exit_<task>.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.task)
    teacher = RESULTS / "teachers" / task.name
    folder = RESULTS / "students" / task.name / "early-exit"
    manifest = read_manifest(folder)
    if manifest is None or manifest.stage != "distill":
        cfg = DistillConfig(stage="task", teacher=str(teacher), out=str(folder), method="early-exit", task=task.name,
                            glue_dir=args.glue_dir, num_threads=args.threads,
                            loop=LoopConfig(epochs=args.epochs, batch_size=32, learning_rate=1e-4, checkpoint_every=100))
        manifest = distill(cfg, resume=(folder / "checkpoints").is_dir())
    model = EarlyExitBert.from_pretrained(folder).eval()
    tokenizer = load_tokenizer(str(folder))
    dev = load_glue(task.name, dev_split(task), args.glue_dir)
    thresholds = parse_thresholds(args.thresholds)
    curves = {}
    for batch_size in args.batch_sizes:
        runs = []
        for r in range(args.repeats + 1):  # the first is a warm-up, not kept
            start = time.perf_counter()
            rows = speed_accuracy_curve(model, tokenizer, task.name, dev, thresholds, task.default_max_length, batch_size)
            print(f"batch {batch_size}, repetition {r}: {time.perf_counter() - start:.1f}s")
            if r:
                runs.append(rows)
        curve = []
        for i, row in enumerate(runs[0]):
            walls = [run[i]["wall_s"] for run in runs]
            speedups = [run[0]["wall_s"] / run[i]["wall_s"] for run in runs]
            curve.append({**{k: row[k] for k in ("threshold", "score", "metrics", "mean_exit_layer", "layer_fraction")},
                          "wall_s_median": round(statistics.median(walls), 4), "wall_s": walls,
                          "speedup_median": round(statistics.median(speedups), 3)})
        curves[str(batch_size)] = curve
    teacher_manifest = read_manifest(teacher)
    report = {
        "task": task.name, "teacher": str(teacher.relative_to(RESULTS.parent.parent)),
        "teacher_score": teacher_manifest.score if teacher_manifest else None,
        "layers": model.num_layers, "exits_train_wall_s": manifest.wall_s, "dev_examples": len(dev),
        "repeats": args.repeats, "threads": torch.get_num_threads(), "curves": curves, "command": command_line(),
    }
    write_results(args.out or RESULTS / f"early_exit_{task.name}.json", report)
    for batch_size, curve in curves.items():
        print(f"batch {batch_size}:")
        for row in curve:
            print(f"  threshold {row['threshold']:.2f}: score {row['score']:.4f}, mean exit layer "
                  f"{row['mean_exit_layer']:.2f}, speed-up {row['speedup_median']:.2f}x")


if __name__ == "__main__":
    main()
