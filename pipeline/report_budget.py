"""The accuracy-budget section of the report, from a search's `budget.json` (pipeline/budget.py): every
candidate's validation score against its batch-1 latency (marker area = size on disk), the budget drawn as
a line, the Pareto front joined, the chosen artifact marked with its one dev score beside it, and a table
of the front (with the share of validation answers that differ from the teacher's: an accuracy drop can be no
larger, and on a few hundred rows it says how far the measured drop can be trusted). The templates include it from `report_budget.html.j2` / `report_budget.md.j2`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline.errors import BertforgeError

COLUMNS = ["candidate", "depth", "heads", "ffn", "vocab", "graph", "quantization", "validation score",
           "drop (points)", "answers changed", "latency b1 ms", "size MB", "fits"]


def load_budget(path: str | Path) -> dict:
    path = Path(path)
    path = path / "budget.json" if path.is_dir() else path
    if not path.is_file():
        raise BertforgeError(f"{path}: no budget search result (run `bertforge run --max-drop POINTS`)")
    return json.loads(path.read_text())


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def budget_section(path: str | Path) -> dict:
    """The section's numbers and the table of the Pareto front (what report.json keeps)."""
    data = load_budget(path)
    b, rows = data["budget"], data["candidates"]
    front = sorted((r for r in rows if r.get("on_front")), key=lambda r: r["latency_ms"])
    table = []
    for r in front:
        s = r["settings"]
        heads, ffn = s.get("prune", (0, 0))
        table.append({"name": r["name"], "chosen": r["name"] == data["chosen"], "cells": [
            r["name"], str(s.get("depth", "—")), f"{heads:.0%}", f"{ffn:.0%}", s.get("vocab", "full"), s.get("graph", "—"),
            s.get("quantize", "—"), _fmt(100 * r["validation_score"], ".2f"), _fmt(r["validation_drop_points"] or 0.0, ".2f"),
            _fmt(r.get("validation_answers_changed"), ".1%"), _fmt(r["latency_ms"], ".3g"), _fmt(r["size_bytes"] / 1e6, ".2f"), "yes" if r["feasible"] else "no"]})
    dev = data.get("dev") or {}
    teacher_val = 100 * data["teacher"]["validation_score"]
    summary = (f"Budget: at most {b['max_drop']:g} points below the teacher's validation score ({teacher_val:.2f})"
               + (f", held against the drop's one-sided {b['confidence']:.0%} upper bound (paired bootstrap over the "
                  f"validation rows)" if b.get("confidence") else "") + ", "
               f"objective: {'lowest batch-1 latency' if b['objective'] == 'latency' else 'smallest size on disk'}"
               + (f", latency ≤ {b['max_latency_ms']:g} ms" if b.get("max_latency_ms") else "")
               + (f", size ≤ {b['max_size_mb']:g} MB" if b.get("max_size_mb") else "")
               + f". {len(rows)} candidates, {sum(r['feasible'] for r in rows)} within the budget, "
               f"{len(front)} on the Pareto front")
    if data.get("skipped"):
        summary += f"; {len(data['skipped'])} nodes not built (below a PyTorch model already out of the budget)"
    summary += "."
    chosen = next((r for r in rows if r["name"] == data.get("chosen")), None)
    if chosen:
        summary += (f" Chosen: {chosen['name']}, validation {100 * chosen['validation_score']:.2f} "
                    f"(drop {chosen['validation_drop_points'] or 0.0:.2f} points"
                    + (f", upper bound {chosen['validation_drop_bound_points']:.2f}"
                       if chosen.get("validation_drop_bound_points") is not None else "") + ")")
        if dev:
            summary += (f"; dev, scored once after the choice: {100 * dev['chosen']['score']:.2f} against the "
                        f"teacher's {100 * dev['teacher']['score']:.2f} (drop {dev['dev_drop_points'] or 0.0:.2f} points"
                        + (", 90% interval [{:.2f}, {:.2f}]".format(*dev["dev_drop_interval_90"])
                           if dev.get("dev_drop_interval_90") else "") + ")")
        summary += "."
    split = data["split"]
    notes = (f"Selection split: {split['validation_examples']} training rows carved with seed {split['seed']} "
             f"(sha256 {split['validation_sha256']}); the students trained on {split['train_examples']} other rows"
             + (f" and kept their checkpoints on {split['checkpoint_examples']} more, carved apart. "
                if split.get("checkpoint_examples") else ". ") +
             f"Latency: median at batch 1, sequence {data['latency']['seq_len']}, {data['latency']['threads']} "
             f"threads, candidates taking turns. Search wall time {data.get('wall_s_total', 0):.0f} s in all "
             f"({data.get('wall_s_this_run', 0):.0f} s in the last run; finished candidates are cached).")
    return {"summary": summary, "notes": notes, "columns": COLUMNS, "front": table, "chosen": data.get("chosen"),
            "dev": dev, "budget_line_validation": data["budget_line_validation"], "path": str(path)}


def plot_pareto(path: str | Path, plt) -> str:
    """Validation score against batch-1 latency over every candidate; `plt` is report.py's styled pyplot."""
    from pipeline.report import COLORS, _log_axis, _svg

    data = load_budget(path)
    rows = data["candidates"]
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    biggest = max((r["size_bytes"] for r in rows), default=1)
    area = lambda r: 20 + 380 * r["size_bytes"] / biggest  # noqa: E731  marker area = size on disk

    for fits, color, label in ((False, COLORS["baseline"], "outside the budget"), (True, COLORS["other"], "within the budget")):
        pts = [r for r in rows if r["feasible"] == fits]
        if pts:
            ax.scatter([r["latency_ms"] for r in pts], [100 * r["validation_score"] for r in pts], s=[area(r) for r in pts],
                       color=color, alpha=0.55, edgecolor="white", linewidth=0.6, label=label, zorder=3)
    front = sorted((r for r in rows if r.get("on_front")), key=lambda r: r["latency_ms"])
    if front:
        ax.step([r["latency_ms"] for r in front], [100 * r["validation_score"] for r in front], where="post",
                color="#39424e", lw=1, alpha=0.7, label="Pareto front", zorder=2)
    teacher = 100 * data["teacher"]["validation_score"]
    line = 100 * data["budget_line_validation"]
    ax.axhline(teacher, color=COLORS["teacher"], lw=0.8, ls=":", label="teacher (validation)")
    ax.axhline(line, color=COLORS["final"], lw=1, ls="--", label=f"budget: −{data['budget']['max_drop']:g} points")
    chosen = next((r for r in rows if r["name"] == data.get("chosen")), None)
    ys = [100 * r["validation_score"] for r in rows] + [teacher, line]
    if chosen:
        x = chosen["latency_ms"]
        ax.scatter([x], [100 * chosen["validation_score"]], s=area(chosen) + 120, facecolor="none",
                   edgecolor=COLORS["final"], linewidth=2, zorder=4, label="chosen (validation)")
        dev = (data.get("dev") or {}).get("chosen")
        if dev:
            ax.scatter([x], [100 * dev["score"]], marker="D", s=36, color=COLORS["final"], zorder=5,
                       label="chosen, dev (scored once)")
            ys.append(100 * dev["score"])
        ax.annotate(chosen["name"], (x, 100 * chosen["validation_score"]), xytext=(8, 8), textcoords="offset points",
                    fontsize=7.5, color="#39424e")
    lo, hi = min(ys), max(ys)
    pad = max(0.5, 0.08 * (hi - lo))
    ax.set_ylim(lo - pad, hi + pad)
    lats = [r["latency_ms"] for r in rows if r["latency_ms"]]
    if lats and max(lats) / min(lats) > 3:
        ax.set_xscale("log")
        _log_axis(ax.xaxis)
    lat = data["latency"]
    ax.set_xlabel(f"latency, batch 1, seq {lat['seq_len']}, median (ms)  ← faster")
    ax.set_ylabel("validation score")
    ax.set_title("Accuracy budget: every candidate (area = size on disk)")
    ax.legend(frameon=False, fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    if not math.isfinite(lo):
        ax.text(0.5, 0.5, "no candidates", transform=ax.transAxes, ha="center")
    return _svg(fig)
