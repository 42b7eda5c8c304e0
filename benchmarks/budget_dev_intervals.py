"""How far each dev drop in benchmarks/results/budget.json could be from the drop on more rows like dev.

A budget row reports one dev drop (teacher minus chosen artifact), and the aims are stated in single points;
but SST-2's dev has 872 rows and MRPC's 408, so one dev figure moves by more than a point between samples of
that size. For each row's chosen artifact and its run's teacher (from the run folder named by the row's
command, as benchmarks/budget_latency.py finds them), this scores dev once more (deterministic: the same
answers the row was made from), then gives the paired 90% percentile bootstrap of the drop
(`pipeline.budget.drop_interval`, the task's own metric recomputed on each resample; new budget runs record it
themselves as `dev_drop_interval_90`). Nothing is chosen here. Writes benchmarks/results/budget_dev_intervals.json,
one row per budget.json row, with the two models' checksums.

    python benchmarks/budget_dev_intervals.py --glue-dir ../shared/glue_data
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from benchmarks.budget_latency import chosen_folder, run_result
from benchmarks.common import command_line, git_commit, input_checksums, write_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def main(argv=None) -> None:
    from pipeline.budget import drop_interval
    from pipeline.data import dev_split, get_task, load_glue
    from pipeline.evaluate import evaluate

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR", "../shared/glue_data"))
    p.add_argument("--budget", default=str(RESULTS / "budget.json"))
    p.add_argument("--level", type=float, default=0.9)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=42, help="fixes the resamples (budget runs use the run's seed, 42)")
    p.add_argument("--out", default=str(RESULTS / "budget_dev_intervals.json"))
    args = p.parse_args(argv)

    scored: dict[Path, object] = {}  # each model scored once, however many rows chose it

    def answers(folder: Path, task: str):
        if folder not in scored:
            if not folder.is_dir():
                raise SystemExit(f"{folder}: not there (run benchmarks/budget.py with the row's command first)")
            scored[folder] = evaluate(str(folder), task, args.glue_dir, progress=False)
        return scored[folder]

    gold: dict[str, list] = {}  # each task's dev labels, read once
    rows = []
    for r in json.loads(Path(args.budget).read_text())["rows"]:
        if not r.get("chosen"):
            continue
        task, search = r["task"], run_result(r)
        chosen, teacher = chosen_folder(r, search), ROOT / search["teacher"]["path"]
        if task not in gold:
            gold[task] = [ex.label for ex in load_glue(task, dev_split(get_task(task)), args.glue_dir)]
        labels = gold[task]
        t, c = answers(teacher, task), answers(chosen, task)
        drop = round(100 * (t.metrics["score"] - c.metrics["score"]), 3)
        if abs(drop - r["dev_drop_points"]) > 0.01:  # another model than the row's: never mix runs
            raise SystemExit(f"{task} {r['budget']}: dev drop {drop} here, {r['dev_drop_points']} in its row")
        rows.append({
            "task": task, "budget": r["budget"], "objective": r["objective"], "confidence": r.get("confidence"),
            "chosen": r["chosen"], "dev_rows": len(labels), "dev_drop_points": drop,
            f"dev_drop_interval_{round(100 * args.level)}": drop_interval(task, t.predictions, c.predictions, labels,
                                                                      args.level, args.resamples, args.seed),
            "inputs": input_checksums(teacher=teacher, chosen=chosen),
        })
        print(f"{task} {r['budget']:g} {r['objective']}: drop {drop:.2f}, {args.level:.0%} interval "
              f"{rows[-1][f'dev_drop_interval_{round(100 * args.level)}']}")
    write_results(Path(args.out), {
        "command": command_line(), "git_commit": git_commit(), "level": args.level, "resamples": args.resamples,
        "seed": args.seed, "method": "paired percentile bootstrap over dev rows (pipeline.budget.drop_interval)",
        "rows": rows})


if __name__ == "__main__":
    main()
