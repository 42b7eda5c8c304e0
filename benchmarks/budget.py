"""The accuracy-budget search end to end: `bertforge run --max-drop B` on SST-2 (and MRPC) at several budgets.

Per task, every run shares one run folder, so the candidates are built once (by the largest budget, run
first) and each further budget only re-chooses among them, then re-benches the chosen artifact against
BERT-base (PyTorch fp32 and ONNX Runtime dynamic int8, side by side in one bench run, one thread set).
One row per task, budget and objective goes to benchmarks/results/budget.json with the chosen settings,
validation and dev scores, the dev drop, the latency and size ratios against BERT-base and the search's
wall time.

The search can be cut to fit a shared 2-core machine (the rows' note says how): `--train-examples` training rows
for the students and the pruning recovery (default: all of them), the schedule of configs/budget.yaml, `--depths`.

    python benchmarks/budget.py --glue-dir ../shared/glue_data --teacher sst2=PATH/TO/TEACHER
    python benchmarks/budget.py --tasks mrpc --teacher mrpc=all-MiniLM-L6-v2 --finetune-teacher mrpc
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import command_line, write_results
from benchmarks.finetune_teachers import SCHEDULE

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def teacher_settings(task: str, teacher: str, finetune: bool) -> list[str]:
    """A ready-made teacher folder, or (finetune) a model the run fine-tunes on the rows outside the carved
    split with finetune_teachers.py's schedule for the task, so that it never sees the rows it is measured on."""
    if not finetune:
        return ["teacher.finetune=false", f"teacher.model={teacher}"]
    sched = SCHEDULE.get(task, dict(epochs=3, learning_rate=5e-5))
    return ["teacher.finetune=true", f"teacher.model={teacher}", "teacher.loop.batch_size=32",
            *(f"teacher.loop.{k}={v}" for k, v in sched.items())]


def run_once(task: str, teacher: str, budget: float, objective: str, args, out: Path) -> tuple[list[str], float]:
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--config", args.config, "--max-drop", str(budget),
           "--objective", objective, "--set", f"out={out}", f"task={task}", f"glue_dir={args.glue_dir}",
           *teacher_settings(task, teacher, task in args.finetune_teacher), f"seed={args.seed}",
           f"budget.max_train_examples={'null' if args.train_examples is None else args.train_examples}", f"budget.validation_examples={args.validation_examples}",
           f"budget.depths=[{','.join(map(str, args.depths))}]", *args.set]
    if args.threads:
        cmd.append(f"threads={args.threads}")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return cmd, time.perf_counter() - t0 if done.returncode == 0 else -done.returncode


def row_for(task: str, budget: float, objective: str, out: Path, cmd: list[str], wall: float, args) -> dict:
    result = json.loads((out / "budget" / "budget.json").read_text())
    row = {"task": task, "budget": budget, "objective": objective, "command": " ".join(
        ["bertforge", *cmd[cmd.index("run"):]]), "seed": args.seed, "git_commit": git_commit()}
    if result.get("chosen") is None:
        return {**row, "chosen": None, "why": result.get("why_none"), "candidates": len(result["candidates"])}
    report = json.loads((out / "report" / "report.json").read_text())
    chosen = next(r for r in result["candidates"] if r["name"] == result["chosen"])
    base = {h["baseline"]: h for h in report["headline"] if h.get("baseline")}
    final = next(h for h in report["headline"] if h["artifact"] == report["final"])
    return {
        **row, "chosen": result["chosen"], "chosen_settings": chosen["settings"],
        "validation_score": chosen["validation_score"], "teacher_validation_score": result["teacher"]["validation_score"],
        "validation_drop_points": chosen["validation_drop_points"],
        "confidence": result["budget"].get("confidence"),  # null: the budget held against the measured drop
        "validation_drop_bound_points": chosen.get("validation_drop_bound_points"),
        "validation_answers_changed": chosen.get("validation_answers_changed"),
        "dev_score": result["dev"]["chosen"]["score"], "teacher_dev_score": result["dev"]["teacher"]["score"],
        "dev_drop_points": result["dev"]["dev_drop_points"],
        "dev_drop_interval_90": result["dev"].get("dev_drop_interval_90"),
        "latency_b1_ms": final["latency_b1_p50_ms"],
        "latency_b1_vs_bert_base_torch_fp32": report["ratios"]["latency_b1_vs_bert_base_torch_fp32"],
        "latency_b1_vs_bert_base_ort_int8": report["ratios"]["latency_b1_vs_bert_base_ort_int8"],
        "bert_base_latency_b1_ms": {k: v["latency_b1_p50_ms"] for k, v in base.items()},
        "size_bytes": chosen["size_bytes"], "size_vs_bert_base_fp32": report["ratios"]["size_vs_bert_base_fp32"],
        "size_vs_bert_base_ort_int8": report["ratios"]["size_vs_bert_base_ort_int8"],
        "baseline_shape_only": report["baseline_shape_only"],
        "candidates": len(result["candidates"]), "candidates_within_budget": sum(r["feasible"] for r in result["candidates"]),
        "pareto_front": [r["name"] for r in result["candidates"] if r["on_front"]],
        "skipped_subtrees": len(result.get("skipped", [])),
        "search_wall_s_this_run": result["wall_s_this_run"], "search_wall_s_total": result["wall_s_total"],
        "run_wall_s": round(wall, 1), "latency_threads": result["latency"]["threads"],
        "selection_split": result["split"],
    }


def search_summary(out: Path) -> dict:
    """Every candidate of a task's search, once (the budgets re-choose among the same ones): what it costs and
    how far it is from the teacher on the carved rows, the evidence of which budgets a task can meet at all."""
    result = json.loads((out / "budget" / "budget.json").read_text())
    keep = ("name", "settings", "validation_drop_points", "validation_answers_changed", "latency_ms", "size_bytes")
    return {"teacher_validation_score": result["teacher"]["validation_score"], "latency": result["latency"],
            "validation_examples": result["split"]["validation_examples"],
            "candidates": [{k: c.get(k) for k in keep} for c in result["candidates"]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["sst2"])
    p.add_argument("--teacher", nargs="+", required=True, metavar="TASK=FOLDER",
                   help="a fine-tuned teacher per task (with --finetune-teacher TASK: the model the run fine-tunes)")
    p.add_argument("--finetune-teacher", nargs="*", default=[], metavar="TASK",
                   help="tasks whose teacher the run fine-tunes itself, on the rows outside the carved split")
    p.add_argument("--budgets", nargs="+", type=float, default=[3.0, 2.0, 1.0], help="points; the largest runs first")
    p.add_argument("--size-budgets", nargs="*", type=float, default=[2.0], help="budgets also run with objective size")
    p.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR", str(ROOT.parent / "shared" / "glue_data")))
    p.add_argument("--config", default="configs/budget.yaml")
    p.add_argument("--depths", nargs="+", type=int, default=[3, 6])
    p.add_argument("--train-examples", type=int, default=None, help="default: every training row outside the carved split")
    p.add_argument("--validation-examples", type=int, default=500)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--set", nargs="*", default=[], help="more run-config overrides")
    p.add_argument("--work", default=str(ROOT / "runs" / "budget-bench"), help="run folders (git-ignored)")
    p.add_argument("--out", default=str(RESULTS / "budget.json"))
    args = p.parse_args()
    teachers = dict(t.split("=", 1) for t in args.teacher)
    rows, searches, start = [], {}, time.perf_counter()
    for task in args.tasks:
        if task not in teachers:
            sys.exit(f"no --teacher {task}=FOLDER")
        out = Path(args.work) / task
        plan = [(b, "latency") for b in sorted(args.budgets, reverse=True)] + [(b, "size") for b in args.size_budgets]
        for budget, objective in plan:
            cmd, wall = run_once(task, teachers[task], budget, objective, args, out)
            if wall < 0 and not (out / "budget" / "budget.json").is_file():
                sys.exit(f"bertforge run failed for {task} at {budget} points")
            rows.append(row_for(task, budget, objective, out, cmd, wall, args))
            print(json.dumps({k: rows[-1].get(k) for k in ("task", "budget", "objective", "chosen", "validation_drop_points",
                                                           "validation_drop_bound_points", "dev_drop_points", "latency_b1_vs_bert_base_torch_fp32",
                                                           "size_vs_bert_base_fp32")}), flush=True)
        searches[task] = search_summary(out)
        teacher = out / "teacher" if task in args.finetune_teacher else Path(teachers[task])
        for r in rows:
            if r["task"] == task:
                r["inputs"] = {"teacher": str(teacher), "teacher_manifest_sha256": sha256(teacher / "bertforge.json"),
                               "glue_train_sha256": r.get("selection_split", {}).get("wanted", {}).get("glue_train_sha256")}
    write_results(args.out, {
        "benchmark": "accuracy-budget search (bertforge run --max-drop)",
        "command": command_line(),
        "note": (f"Cut to fit a shared 2-core CPU machine (other sessions trained at the same time): students and "
                 f"pruning recovery train on {args.train_examples or 'all the'} training rows (outside the carved split) with the schedule of {args.config}, "
                 f"depths {args.depths} (the teacher's own depth = the teacher itself, not distilled), candidates "
                 f"scored on {args.validation_examples} train rows carved by the seed (the training stages keep their "
                 f"best checkpoints on other carved rows); dev scored once per chosen "
                 f"artifact. Budgets run largest first in one run folder: later budgets re-choose among the same "
                 f"candidates. Latency ratios against BERT-base are measured side by side within one bench run; "
                 f"absolute times across runs are not comparable."),
        "wall_s": round(time.perf_counter() - start, 1),
        "rows": rows,
        "searches": searches,
    })


if __name__ == "__main__":
    main()
