"""Training throughput of every recipe, before and after the loop's speed-ups, side by side in one run.

"before" is the loop as it was (plain shuffled batches, the per-parameter AdamW loop, fp32, the teacher
run on every intermediate batch); "after" is today's default (length-grouped batches, fused AdamW,
precision auto = fp32 on CPU, the teacher's layer outputs and attention scores kept across epochs);
"after-bf16" adds bf16 autocast, to show whether it pays on this CPU. TinyBERT runs 2 intermediate + 1
prediction epochs everywhere, so the teacher cache has an epoch to pay off in. Each recipe runs the same short schedule on the first
rows of SST-2 train at 1 and 2 threads, timed end to end (model loading and the dev scoring included).

Then TinyBERT task distillation in each of --score-variants (default before, after), over 3 seeds on a
longer schedule: the dev score each reaches (mean and spread) and its end-to-end time against the first
variant's, so a speed-up that costs accuracy shows.

    python benchmarks/train_speed.py --teacher runs/quickstart/teacher       # a fine-tuned SST-2 teacher
    python benchmarks/train_speed.py --teacher T --recipes tinybert --rows 256 --threads 1 --seeds 0
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import command_line, git_commit, input_checksums, write_results
from pipeline.artifacts import read_manifest
from pipeline.distill import distill
from pipeline.distill.config import DistillConfig
from pipeline.distill.students import StudentSpec
from pipeline.finetune import FinetuneConfig, finetune
from pipeline.prune import PruneConfig, prune
from pipeline.training import LoopConfig

RESULTS = Path(__file__).resolve().parent / "results"
RECIPES = ("finetune", "tinybert", "kd", "theseus", "difficulty", "early-exit", "prune-recovery")
VARIANTS = {
    "before": dict(group_by_length=False, fused_optimizer=False, precision="fp32"),
    "after": dict(group_by_length=True, fused_optimizer=True, precision="auto"),
    "after-bf16": dict(group_by_length=True, fused_optimizer=True, precision="bf16"),
}
# The distillation side of each variant: MiB for the teacher's intermediate outputs (0: recomputed every batch).
TEACHER_CACHE_MB = {"before": 0, "after": DistillConfig.teacher_cache_mb, "after-bf16": DistillConfig.teacher_cache_mb}


def run_recipe(recipe: str, variant: str, args, work: Path, rows: int, seed: int,
               intermediate_epochs: int = 2, prediction_epochs: int = 1) -> tuple[dict, float]:
    """Train `recipe` once; returns (its manifest's dev metrics and examples processed, wall seconds)."""
    loop = LoopConfig(epochs=1, batch_size=32, checkpoint_every=0, seed=seed, **VARIANTS[variant])
    out = work / f"{recipe}-{variant}-{seed}"
    start = time.perf_counter()
    if recipe == "finetune":
        m = finetune(FinetuneConfig(task="sst2", model="all-MiniLM-L6-v2", out=str(out), glue_dir=args.glue_dir,
                                    max_train_examples=rows, loop=loop), progress=False)
        examples = rows
    elif recipe == "prune-recovery":
        m = prune(PruneConfig(model=args.teacher, task="sst2", out=str(out), glue_dir=args.glue_dir, heads=0.5, ffn=0.5,
                              importance_examples=256, recover_epochs=1, max_train_examples=rows, loop=loop),
                  progress=False)
        examples = rows
    else:
        two_steps = recipe == "tinybert"
        epochs = intermediate_epochs + prediction_epochs
        cfg = DistillConfig(stage="task", teacher=args.teacher, out=str(out), method=recipe, task="sst2",
                            glue_dir=args.glue_dir, student=StudentSpec(init_from_teacher="3"),
                            max_train_examples=rows, intermediate_epochs=intermediate_epochs,
                            prediction_epochs=prediction_epochs, teacher_cache_mb=TEACHER_CACHE_MB[variant],
                            # one-loop methods run as many epochs as TinyBERT's two steps together
                            loop=replace(loop, epochs=1 if two_steps else epochs, learning_rate=5e-5))
        m = distill(cfg, progress=False)
        examples = rows * epochs
    wall = time.perf_counter() - start
    return {"dev": m.metrics["dev"], "examples": examples}, wall


def main() -> None:
    logging.getLogger("torchao").setLevel(logging.ERROR)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="a fine-tuned SST-2 classifier folder (e.g. make demo's teacher)")
    p.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR", "../shared/glue_data"))
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--bf16-recipes", nargs="*", default=["finetune", "tinybert"],
                   help="recipes that also run the after-bf16 variant (it is a probe, not the default)")
    p.add_argument("--rows", type=int, default=640, help="training rows of the throughput runs")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--score-rows", type=int, default=2000, help="training rows of the dev-score runs")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="seeds of the dev-score runs (none: skip)")
    p.add_argument("--score-variants", nargs="+", default=["before", "after"], choices=list(VARIANTS),
                   help="variants of the dev-score runs (after after-bf16: does bf16 cost accuracy?)")
    p.add_argument("--machine-note", default=None, help="what else ran on the machine meanwhile (kept in the JSON)")
    p.add_argument("--out", default=str(RESULTS / "train_speed.json"))
    args = p.parse_args()
    if read_manifest(args.teacher) is None:
        raise SystemExit(f"train_speed: {args.teacher} is not a bertforge artifact (run make demo, or pass a teacher)")

    result = {"command": command_line(), "git_commit": git_commit(), "machine_cpus": os.cpu_count(),
              "note": "wall time end to end (loading and dev scoring included); variants of a recipe run back to "
                      "back in one process, so their ratio is the claim, not the absolute rate",
              "inputs": input_checksums(teacher=args.teacher, train=Path(args.glue_dir) / "SST-2" / "train.tsv"),
              "variants": VARIANTS, "throughput": [], "speedup": {}, "dev_score": {}, "machine_note": args.machine_note}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for recipe in args.recipes:
            for threads in args.threads:
                torch.set_num_threads(threads)
                rates = {}
                for variant in args.variants:
                    if variant == "after-bf16" and recipe not in args.bf16_recipes:
                        continue
                    info, wall = run_recipe(recipe, variant, args, work, args.rows, seed=0)
                    rates[variant] = info["examples"] / wall
                    result["throughput"].append({
                        "recipe": recipe, "variant": variant, "threads": threads, "rows": args.rows,
                        "examples": info["examples"], "wall_s": round(wall, 2),
                        "examples_per_s": round(rates[variant], 1), "dev_score": round(info["dev"]["score"], 4)})
                    print(f"{recipe} {variant} {threads} threads: {rates[variant]:.1f} ex/s, "
                          f"dev {info['dev']['score']:.4f}", flush=True)
                if "before" in rates:
                    result["speedup"].setdefault(recipe, {})[f"{threads}_threads"] = {
                        v: round(r / rates["before"], 2) for v, r in rates.items() if v != "before"}
                write_results(args.out, result)

        torch.set_num_threads(max(args.threads))
        for variant in args.score_variants:
            scores, walls = [], []
            for seed in args.seeds:
                info, wall = run_recipe("tinybert", variant, args, work, args.score_rows, seed=seed,
                                        intermediate_epochs=2, prediction_epochs=1)
                scores.append(info["dev"]["score"])
                walls.append(wall)
                print(f"tinybert {variant} seed {seed}: dev {scores[-1]:.4f} in {wall:.0f}s", flush=True)
            if scores:
                result["dev_score"][variant] = {
                    "recipe": "tinybert", "rows": args.score_rows, "intermediate_epochs": 2, "prediction_epochs": 1,
                    "threads": max(args.threads), "seeds": args.seeds, "scores": [round(s, 4) for s in scores],
                    "mean": round(statistics.mean(scores), 4),
                    "sd": round(statistics.stdev(scores), 4) if len(scores) > 1 else None,
                    "wall_s": [round(w, 1) for w in walls]}
                write_results(args.out, result)
        # every later variant against the first (its time over theirs; their score minus its), from runs of one process
        first = args.score_variants[0]
        if first in result["dev_score"]:
            b = result["dev_score"][first]
            result["dev_score"]["compared_to"] = first
            for variant in args.score_variants[1:]:
                a = result["dev_score"].get(variant)
                if a is not None:
                    a["end_to_end_speedup"] = round(sum(b["wall_s"]) / sum(a["wall_s"]), 2)
                    a["mean_difference_points"] = round(100 * (a["mean"] - b["mean"]), 2)
    write_results(args.out, result)
    print(result["speedup"], {v: d.get("end_to_end_speedup") for v, d in result["dev_score"].items() if isinstance(d, dict)})


if __name__ == "__main__":
    main()
