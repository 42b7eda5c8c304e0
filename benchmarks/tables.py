"""Print the README's result tables as markdown, from the JSON files the benchmark scripts write.

    python benchmarks/tables.py                  # every table
    python benchmarks/tables.py distill teachers # some of them

Tables: teachers (finetune_teachers.py), distill (distill_glue.py), early-exit (early_exit_curve.py),
teacher-check (teacher_check.py), augment (augment_speed.py).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TASK_ORDER = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
METHOD_ORDER = ("tinybert", "pred-only", "labels-only", "kd", "theseus", "difficulty")


def _load(name: str):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _table(header: list[str], rows: list[list]) -> str:
    align = ["---" if i < 2 else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def teachers() -> str:
    rows = sorted(_load("teachers.json") or [], key=lambda r: TASK_ORDER.index(r["task"]))
    return _table(["task", "dev score", "metrics", "epochs", "lr", "train rows", "minutes"], [
        [r["task"], _pct(r["score"]),
         ", ".join(f"{k} {_pct(v)}" for k, v in r["metrics"].items() if k != "score"),
         r["epochs"], r.get("learning_rate", "—"), r["train_examples"], round(r["wall_s"] / 60)]
        for r in rows])


def _method_key(method: str) -> tuple:
    base, _, aug = method.partition("+")
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), aug)


def distill() -> str:
    rows = sorted(_load("distill.json") or [],
                  key=lambda r: (TASK_ORDER.index(r["task"]), _method_key(r["method"]), r["student"]))
    out = _table(["task", "method", "teacher", "student", "retention", "params (student / teacher)", "train rows",
                  "minutes"], [
        [r["task"], r["method"], _pct(r["teacher_score"]), _pct(r["student_score"]), f"{r['retention']:.3f}",
         f"{r['params'] / 1e6:.1f}M / {r['teacher_params'] / 1e6:.1f}M", r.get("schedule", {}).get("train_examples", "—"),
         round(r["wall_s"] / 60, 1)]
        for r in rows])
    by_task = {r["task"]: r["retention"] for r in rows if r["method"] == "tinybert"}
    if by_task:
        mean = sum(by_task.values()) / len(by_task)
        out += (f"\n\nMean TinyBERT retention over {', '.join(by_task)}: **{mean:.3f}** "
                f"(aim 0.97).")
    return out


def early_exit() -> str:
    return "\n\n".join(_early_exit_curve(json.loads(path.read_text()))
                       for path in sorted(RESULTS.glob("early_exit_*.json")))


def _early_exit_curve(data: dict) -> str:
    head = (f"{data['task']}, teacher {_pct(data['teacher_score'])}, {data['layers']} layers, "
            f"{data['dev_examples']} dev examples, median of {data['repeats']} runs, {data['threads']} thread(s)")
    batches = sorted(data["curves"], key=int)
    thresholds = [r["threshold"] for r in data["curves"][batches[0]]]
    rows = []
    for i, t in enumerate(thresholds):
        first = data["curves"][batches[0]][i]
        # layers / mean exit layer: the speed-up the exits allow at best (batch 1, exits cost nothing)
        rows.append([t, _pct(first["score"]), f"{first['mean_exit_layer']:.2f}",
                     f"{data['layers'] / first['mean_exit_layer']:.2f}×",
                     *(f"{data['curves'][b][i]['speedup_median']:.2f}×" for b in batches)])
    return head + "\n\n" + _table(["threshold", "dev score", "mean exit layer", "layer bound",
                                   *(f"measured b{b}" for b in batches)], rows)


def teacher_check() -> str:
    data = _load("teacher_check.json") or {}
    parts = []
    for task, entry in data.items():
        probes = entry.get("linear_probes", {})
        if probes:
            best = max(probes, key=lambda k: probes[k]["score"])
            parts.append(f"{task}: linear probes on frozen features, best {best} {_pct(probes[best]['score'])}, "
                         f"[CLS] {_pct(probes.get('cls', {}).get('score'))}")
        rows = []
        for section in ("plain_transformers", "bertforge_finetune"):
            for variant, r in entry.get(section, {}).items():
                rows.append([section.replace("_", " "), variant,
                             " / ".join(_pct(e["score"]) for e in r["per_epoch"]), _pct(r["best_score"]),
                             round(r["wall_s"] / 60)])
        if rows:
            parts.append(_table(["loop", "variant", "dev score per epoch", "best", "minutes"], rows))
    return "\n\n".join(parts)


def augment() -> str:
    rows = []
    for name in ("augment.json", "augment-mlmhead.json"):
        r = _load(name)
        if r:
            mlm = "MLM head fitted on the frozen encoder" if r["mlm"].endswith(".mlm") else \
                "untrained head on all-MiniLM-L6-v2" if r["mlm"] == "all-MiniLM-L6-v2" else r["mlm"]
            rows.append([r["task"], mlm, r["examples"], r["n"], r["batched"]["examples_per_s"],
                         r["batch1_loop"]["examples_per_s"], f"{r['speedup']:.1f}×",
                         f"{100 * r['shared_rows_fraction']:.1f}%", r["threads"]])
    return _table(["task", "masked LM", "examples", "N", "batched ex/s", "batch-1 ex/s", "speed-up",
                   "rows shared", "threads"], rows)


TABLES = {"teachers": teachers, "distill": distill, "early-exit": early_exit, "teacher-check": teacher_check,
          "augment": augment}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tables", nargs="*", metavar="TABLE", help=f"any of: {', '.join(TABLES)} (default: all)")
    args = p.parse_args()
    unknown = [t for t in args.tables if t not in TABLES]
    if unknown:
        p.error(f"unknown table {unknown[0]!r} (choose from {', '.join(TABLES)})")
    for name in args.tables or TABLES:
        print(f"<!-- {name} -->\n{TABLES[name]()}\n")


if __name__ == "__main__":
    main()
