"""The report's real-text section, the accurate baseline and the published reference rows.

- Real text (`bertforge bench --texts`): per artifact, batch-1 p50/p99 on the texts at their own lengths and
  length-sorted throughput, each beside the s128 grid's ratio against the same BERT-base baseline, all
  from one bench run. The decision page quotes the final artifact's real-text p99 at batch 1.
- The accurate baseline: a baseline built from a fine-tuned classifier carries a dev score; the decision
  page sets the final artifact's score against it.
- Published figures: GLUE scores from the papers, as reference rows of their own table, never mixed with
  the measured rows (other data, other split, other hardware).
"""
from __future__ import annotations

from typing import Any

# From the TinyBERT paper: Jiao et al., "TinyBERT: Distilling BERT for Natural Language Understanding",
# Findings of EMNLP 2020 (arXiv:1909.10351). Main results are GLUE *test* scores (the GLUE server); the dev
# figures are from its ablation study. The BERT-base row is the paper's BERT-base teacher. Scores as fractions.
TINYBERT_PAPER = "Jiao et al. 2020, TinyBERT (Findings of EMNLP 2020), arXiv:1909.10351"
PUBLISHED = [
    *({"model": "BERT-base (teacher)", "task": t, "split": "test", "score": s, "source": TINYBERT_PAPER}
      for t, s in {"sst2": 0.934, "mrpc": 0.875, "cola": 0.528, "stsb": 0.852, "rte": 0.670, "qnli": 0.909}.items()),
    *({"model": "TinyBERT-4 (4 layers, hidden 312)", "task": t, "split": "test", "score": s, "source": TINYBERT_PAPER}
      for t, s in {"sst2": 0.926, "mrpc": 0.864, "cola": 0.441, "stsb": 0.804, "rte": 0.666, "qnli": 0.877}.items()),
    *({"model": "TinyBERT-4 (4 layers, hidden 312)", "task": t, "split": "dev", "score": s,
       "source": TINYBERT_PAPER + ", ablation study"} for t, s in {"cola": 0.508, "mrpc": 0.858}.items()),
]


def _ratio(num, den):
    return float(f"{num / den:.4g}") if num and den else None


def published_rows(task: str | None) -> list[dict[str, Any]]:
    """The published rows for `task` (all tasks when None)."""
    return [dict(r) for r in PUBLISHED if task is None or r["task"] == task]


def accurate_baseline(arts: list[dict]) -> dict | None:
    """The scored baseline (built from a fine-tuned classifier), PyTorch fp32 first."""
    scored = [a for a in arts if a.get("baseline") and a.get("fine_tuned") and a.get("score") is not None]
    scored.sort(key=lambda a: a["baseline"] != "torch_fp32")
    if not scored:
        return None
    a = scored[0]
    return {"name": a["name"], "score": a["score"], "source": (a.get("params") or {}).get("source"), "role": a["baseline"]}


def real_text_section(bench: dict, rep: dict) -> dict | None:
    """Real-text rows of the report's device, with ratios against both baselines beside the s128 ones."""
    rows = [r for r in bench.get("text_results", []) if r["device"] == rep["device"]]
    if not rows:
        return None
    by = {(r["artifact"], r["batch_size"]): r for r in rows}
    batches = sorted({r["batch_size"] for r in rows if r["batch_size"] > 1})
    base = rep["baselines"]
    out = []
    for h in rep["headline"]:
        one = by.get((h["artifact"], 1))
        if one is None:
            continue
        entry = {"artifact": h["artifact"], "role": h["role"], "baseline": h["baseline"],
                 "mean_tokens": one["mean_tokens"], "texts": one["texts"], "complete": one["complete"],
                 "p50_ms": one["p50_ms"], "p90_ms": one["p90_ms"], "p99_ms": one["p99_ms"],
                 "shape_cost": one.get("shape_cost", {}),
                 "throughput_seq_s": {b: by[(h["artifact"], b)]["throughput_seq_s"] for b in batches if (h["artifact"], b) in by},
                 "mean_padded_tokens": {b: by[(h["artifact"], b)]["mean_padded_tokens"] for b in batches if (h["artifact"], b) in by}}
        for role, label in (("torch_fp32", "bert_base_torch_fp32"), ("ort_int8", "bert_base_ort_int8")):
            b1 = by.get((base.get(role), 1))
            entry[f"faster_p50_vs_{label}"] = _ratio(b1 and b1["p50_ms"], one["p50_ms"])
            entry[f"faster_p99_vs_{label}"] = _ratio(b1 and b1["p99_ms"], one["p99_ms"])
            entry[f"s128_faster_p50_vs_{label}"] = h.get(f"faster_vs_{label}")
            if batches:
                big = by.get((base.get(role), batches[-1]))
                mine = by.get((h["artifact"], batches[-1]))
                entry[f"throughput_b{batches[-1]}_vs_{label}"] = _ratio(mine and mine["throughput_seq_s"], big and big["throughput_seq_s"])
        out.append(entry)
    final = next((e for e in out if e["artifact"] == rep["final"]), None)
    texts = bench.get("texts", {})
    return {"source": texts.get("source") or rows[0].get("texts_source"), "texts": texts.get("texts"),
            "max_length": texts.get("max_length"), "sha256": texts.get("sha256"), "batch_sizes": batches,
            "rows": out, "final": final,
            "per_shape_cost": sorted(e["artifact"] for e in out if e["shape_cost"].get("per_shape_cost"))}


# ---------------------------------------------------------------- the decision page's extra figures

def decision_extras(rep: dict) -> dict:
    """The first screen's real-text p99 and its score against the accurate baseline (None where absent)."""
    from pipeline.report import fmt_ms, fmt_score

    rt, acc = rep.get("real_text"), rep.get("accurate_baseline")
    final_rt = rt and rt["final"]
    kpis = []
    if final_rt:
        kpis.append({"value": f"{fmt_ms(final_rt['p99_ms'])} ms", "target": None, "met": False,
                     "label": f"p99 latency at batch 1 on real text ({rt['source']}, mean {final_rt['mean_tokens']:.0f} tokens)"})
    keep = _ratio(rep.get("final_score"), acc and acc["score"])
    if keep:
        kpis.append({"value": f"{100 * keep:.1f}%", "target": None, "met": False,
                     "label": f"of the accurate baseline's dev score ({fmt_score(rep['final_score'])} vs "
                              f"{fmt_score(acc['score'])}, {acc['source'] or acc['name']})"})
    line = None
    if final_rt:
        line = (f"On real text ({rt['source']}, {final_rt['texts']} texts at their own lengths, mean "
                f"{final_rt['mean_tokens']:.1f} tokens), batch 1: p50 {fmt_ms(final_rt['p50_ms'])} ms, p99 "
                f"{fmt_ms(final_rt['p99_ms'])} ms; {fmt_x(final_rt['faster_p50_vs_bert_base_torch_fp32'])} faster than BERT-base "
                f"PyTorch fp32 and {fmt_x(final_rt['faster_p50_vs_bert_base_ort_int8'])} faster than BERT-base ORT int8 "
                f"(s128: {fmt_x(final_rt['s128_faster_p50_vs_bert_base_torch_fp32'])} and "
                f"{fmt_x(final_rt['s128_faster_p50_vs_bert_base_ort_int8'])}). {final_rt['shape_cost'].get('note', '').capitalize()}.")
    return {"kpis": kpis, "real_text_line": line, "accurate_baseline_retained": keep}


def fmt_x(v) -> str:
    from pipeline.report import fmt_x as fx

    return fx(v)


# ---------------------------------------------------------------- tables

def real_text_tables(rep: dict) -> list:
    """The real-text table and the published reference table, in the report's Table model."""
    from pipeline.report import Row, Table, fmt_ms, fmt_score, fmt_tp

    tables = []
    rt = rep.get("real_text")
    if rt:
        bs = rt["batch_sizes"]
        cols = ["Artifact", "Mean tokens", "p50 ms", "p99 ms", "× vs PyTorch fp32", "(s128)", "× vs ORT int8", "(s128)",
                *[f"Seq/s b{b}" for b in bs]]
        cols += [f"× seq/s b{bs[-1]} vs ORT int8"] if bs else []
        cols += ["First call, new length"]
        rows = []
        for e in rt["rows"]:
            cost = e["shape_cost"]
            shape = "—" if not cost.get("lengths_probed") else (
                f"{cost['first_vs_repeat']:.1f}× repeat" + (" (per-shape cost)" if cost["per_shape_cost"] else ""))
            cells = [e["artifact"], f"{e['mean_tokens']:.1f}", fmt_ms(e["p50_ms"]), fmt_ms(e["p99_ms"]),
                     fmt_x(e["faster_p50_vs_bert_base_torch_fp32"]), fmt_x(e["s128_faster_p50_vs_bert_base_torch_fp32"]),
                     fmt_x(e["faster_p50_vs_bert_base_ort_int8"]), fmt_x(e["s128_faster_p50_vs_bert_base_ort_int8"]),
                     *[fmt_tp(e["throughput_seq_s"].get(b)) for b in bs]]
            cells += [fmt_x(e.get(f"throughput_b{bs[-1]}_vs_bert_base_ort_int8"))] if bs else []
            rows.append(Row(cells + [shape], "baseline" if e["baseline"] else e["role"], "final" if e["role"] == "final" else None))
        tables.append(Table(f"Real text: {rt['source']} at its own lengths", cols, rows, notes=(
            f"{rt['texts']} texts tokenized by each artifact's own tokenizer (at most {rt['max_length']} word pieces), no "
            "padding at batch 1: p50 and p99 per text after every length was met once. Throughput: length-sorted "
            f"batches, each padded to its longest text (second pass). × = times faster than the BERT-base baseline on "
            "the same texts (p50); (s128) = the same ratio on the padded grid; both from this one bench run. First call, "
            "new length: the first call at an unseen length against its immediate repeat (median over lengths); "
            f"'per-shape cost' from {1.5}× on — warm every length before serving such a runtime.")))
    refs = rep.get("published") or []
    if refs:
        tables.append(Table("Published reference figures (not measured here)", ["Model", "Task", "Split", "Source", "Score"],
                            [Row([r["model"], r["task"], f"GLUE {r['split']}", r["source"], fmt_score(r["score"])], "baseline")
                             for r in refs], left=4, notes=(
            "From the papers, for orientation only: other training, other data split (GLUE test scores come from the "
            "GLUE server; this report's scores are dev), never mixed with the measured rows above.")))
    return tables
