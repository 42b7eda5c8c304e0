"""The comparison report of a `bertforge bench` result: report.md, one self-contained report.html (plots
inline as SVG) and report.json (every ratio against the BERT-base baseline, the scores, the tables).

Ratios are "times better": baseline latency / artifact latency, baseline size / artifact size,
artifact throughput / baseline throughput. All come from one bench run, measured side by side.

Both pages open on the decision (the final artifact, its score against the teacher, its ratios against
BERT-base, the command that serves it) and render the same `Table`s through the jinja2 templates in
`pipeline/templates/`.
"""
from __future__ import annotations

import io
import json
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import BertforgeError

TEACHER_STAGES = ("finetune", "teacher")
# The final artifact's ratios (analyse() computes them); `ReportConfig.targets` may set a goal for any of them.
RATIO_KEYS = ("latency_b1_vs_bert_base_torch_fp32", "latency_b1_vs_bert_base_ort_int8", "size_vs_bert_base_fp32",
              "size_vs_bert_base_ort_int8", "throughput_vs_bert_base_torch_fp32", "throughput_vs_bert_base_ort_int8",
              "score_retained_vs_teacher")
COLORS = {"final": "#e4572e", "teacher": "#2e5eaa", "other": "#17a398", "baseline": "#8d99ae"}


@dataclass
class ReportConfig:
    final: str | None = None  # artifact name; default: the bench's --final, else the last non-baseline
    teacher: str | None = None  # artifact name or path; default: a finetune-stage artifact or the final's lineage
    device: str | None = None  # device of the headline; default: cpu when measured
    command: str | None = None  # the command that made the bench, quoted in the report
    # Goals for the final artifact's ratios, e.g. {"size_vs_bert_base_fp32": 25, "score_retained_vs_teacher": 0.97}:
    # each is shown met or missed beside its number. Empty: the report grades nothing.
    targets: dict[str, float] = field(default_factory=dict)
    # Load-test sweeps (`bertforge loadtest --mode sweep --out RUN`: RUN or RUN/sweep.json, or a serving.json of
    # step rows) to show as the serving section: requests/s at the SLO, p50/p99, failures, served accuracy.
    loadtest: list[str] = field(default_factory=list)
    # A budget search's result (RUN/budget/budget.json) to draw as the Pareto-front section.
    budget: str | None = None


# ---------------------------------------------------------------- numbers

def _ratio(num, den):
    return float(f"{num / den:.4g}") if num and den else None


def analyse(bench: dict[str, Any], cfg: ReportConfig) -> dict[str, Any]:
    """Everything the three outputs show: headline rows, ratios, teacher and final, tables."""
    arts = bench["artifacts"]
    by_name = {a["name"]: a for a in arts}
    devices = bench.get("devices") or sorted({r["device"] for r in bench["results"]})
    device = cfg.device or ("cpu" if "cpu" in devices else devices[0])
    if device not in devices:
        raise BertforgeError(f"device {device} was not measured (measured: {', '.join(devices)})")
    seq = bench.get("reference_seq_len") or 128
    rows = {(r["artifact"], r["device"], r["batch_size"], r["seq_len"]): r for r in bench["results"]}
    batches = sorted({r["batch_size"] for r in bench["results"]})
    b_lat, b_tp = batches[0], batches[-1]

    base = {role: next((a for a in arts if a.get("baseline") == role), None) for role in ("torch_fp32", "ort_int8")}
    final_name = cfg.final or bench.get("final") or next((a["name"] for a in reversed(arts) if not a.get("baseline")), None)
    if final_name is not None and final_name not in by_name:
        raise BertforgeError(f"--final {final_name} is not in the bench (artifacts: {', '.join(by_name)})")
    final = by_name.get(final_name)
    unknown = sorted(set(cfg.targets) - set(RATIO_KEYS))
    if unknown:
        raise BertforgeError(f"unknown report target {unknown[0]!r} (choose from {', '.join(RATIO_KEYS)})")
    teacher = find_teacher(arts, final, cfg.teacher or bench.get("teacher"))

    def lat(a):
        r = a and rows.get((a["name"], device, b_lat, seq))
        return r["p50_ms"] if r else None

    def tp(a):
        r = a and rows.get((a["name"], device, b_tp, seq))
        return r["throughput_seq_s"] if r else None

    def size(a):
        return a and (a.get("model_bytes") or a.get("size_bytes"))

    headline = []
    for a in [a for a in arts if not a.get("baseline")] + [a for a in arts if a.get("baseline")]:
        score = a.get("score")
        tscore = teacher["score"] if teacher else None
        headline.append({
            "artifact": a["name"], "role": role_of(a, final, teacher), "stage": a.get("stage"),
            "format": a["format"], "precision": a.get("precision"), "score": score,
            "delta_vs_teacher": round(score - tscore, 4) if score is not None and tscore is not None else None,
            "retained_vs_teacher": _ratio(score, tscore) if score is not None and tscore else None,
            "size_mb": round(size(a) / 1e6, 2) if size(a) else None,
            "smaller_vs_bert_base_fp32": _ratio(size(base["torch_fp32"]), size(a)),
            "latency_b1_p50_ms": lat(a),
            "faster_vs_bert_base_torch_fp32": _ratio(lat(base["torch_fp32"]), lat(a)),
            "faster_vs_bert_base_ort_int8": _ratio(lat(base["ort_int8"]), lat(a)),
            "throughput_seq_s": tp(a),
            "throughput_vs_bert_base_torch_fp32": _ratio(tp(a), tp(base["torch_fp32"])),
            "num_parameters": a.get("num_parameters"),
            "baseline": a.get("baseline"), "shape_only": a.get("shape_only", False),
        })
    final_row = next((h for h in headline if final and h["artifact"] == final["name"]), {})
    ratios = {
        "latency_b1_vs_bert_base_torch_fp32": final_row.get("faster_vs_bert_base_torch_fp32"),
        "latency_b1_vs_bert_base_ort_int8": final_row.get("faster_vs_bert_base_ort_int8"),
        "size_vs_bert_base_fp32": final_row.get("smaller_vs_bert_base_fp32"),
        "size_vs_bert_base_ort_int8": _ratio(size(base["ort_int8"]), size(final)),
        "throughput_vs_bert_base_torch_fp32": final_row.get("throughput_vs_bert_base_torch_fp32"),
        "throughput_vs_bert_base_ort_int8": _ratio(tp(final), tp(base["ort_int8"])),
        "score_retained_vs_teacher": final_row.get("retained_vs_teacher"),
    }
    rep = {
        "ratios": ratios,
        "ratio_convention": "times better than the baseline: baseline/artifact for latency and size, artifact/baseline for throughput",
        "final": final["name"] if final else None,
        "final_score": final.get("score") if final else None,
        "final_path": final.get("path") if final else None,
        "teacher": teacher["name"] if teacher else None,
        "teacher_score": teacher["score"] if teacher else None,
        "targets": {k: {"target": float(v), "value": ratios[k], "met": ratios[k] is not None and ratios[k] >= v}
                    for k, v in cfg.targets.items()},
        "device": device, "devices": devices,
        "reference": {"latency_batch_size": b_lat, "throughput_batch_size": b_tp, "seq_len": seq},
        "baselines": {role: (a["name"] if a else None) for role, a in base.items()},
        "baseline_shape_only": any(a and a.get("shape_only") for a in base.values()),
        "baseline_shape": _shape_text(base["torch_fp32"] or base["ort_int8"]),
        "headline": headline,
        "latency_table": [{k: v for k, v in r.items() if k != "samples_ms"} for r in bench["results"]],
        "artifacts": [{k: v for k, v in a.items()} for a in arts],
        "skipped": bench.get("skipped", []),
        "hardware": bench.get("hardware", {}), "versions": bench.get("versions", {}),
        "threads": bench.get("threads", {}), "bench_config": bench.get("config", {}),
        "bench_created": bench.get("created"), "command": cfg.command or bench.get("command"),
    }
    from pipeline.report_real_text import accurate_baseline, published_rows, real_text_section

    rep.update(accurate_baseline=accurate_baseline(arts), published=published_rows((final or {}).get("task")))
    rep["real_text"] = real_text_section(bench, rep)
    return rep


def _shape_text(a: dict | None) -> str | None:
    p = (a or {}).get("params", {})
    if "layers" not in p:
        return None
    return f"{p['layers']} layers, hidden {p['hidden']}, {p['heads']} heads, FFN {p['intermediate']}"


def find_teacher(arts: list[dict], final: dict | None, wanted: str | None) -> dict | None:
    """{"name", "score", "path"} of the teacher: named, else a benched teacher-stage artifact, else the
    last teacher stage in the final artifact's lineage."""
    if wanted:
        for a in arts:
            if wanted in (a["name"], a["path"]):
                return {"name": a["name"], "score": a.get("score"), "path": a["path"]}
        for entry in (final or {}).get("lineage", []):
            if wanted == entry.get("path"):
                return {"name": Path(entry["path"]).name, "score": entry.get("score"), "path": entry["path"]}
        raise BertforgeError(f"--teacher {wanted} is neither a benched artifact nor in the final artifact's lineage")
    for a in arts:
        if a.get("stage") in TEACHER_STAGES and not a.get("baseline"):
            return {"name": a["name"], "score": a.get("score"), "path": a["path"]}
    for entry in reversed((final or {}).get("lineage", [])):
        if entry.get("stage") in TEACHER_STAGES:
            return {"name": Path(entry.get("path", "teacher")).name, "score": entry.get("score"), "path": entry.get("path")}
    return None


def role_of(a: dict, final: dict | None, teacher: dict | None) -> str:
    if a.get("baseline"):
        return "baseline"
    if final and a["name"] == final["name"]:
        return "final"
    if teacher and a["name"] == teacher["name"]:
        return "teacher"
    return "other"


# ---------------------------------------------------------------- plots (matplotlib, inline SVG)

def _style():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "svg.fonttype": "none", "font.family": "sans-serif", "font.size": 9,
        "font.sans-serif": ["Inter", "Helvetica Neue", "Arial", "DejaVu Sans"],
        "axes.spines.top": False, "axes.spines.right": False, "axes.edgecolor": "#c9ced6",
        "axes.labelcolor": "#39424e", "xtick.color": "#5b6572", "ytick.color": "#5b6572",
        "axes.grid": True, "grid.color": "#eceff3", "grid.linewidth": 0.8, "axes.axisbelow": True,
        "axes.titlesize": 10, "axes.titleweight": "bold", "axes.titlelocation": "left",
        "svg.hashsalt": "bertforge",  # stable ids: the same bench gives the same file
    })
    return plt


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    fig.clf()
    text = buf.getvalue()
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)  # RDF boilerplate: bytes, no pixels
    return text[text.index("<svg"):]


def _log_axis(axis) -> None:
    """Log scale labelled 1, 2, 5, 10 ... (plain numbers read faster than powers of ten); fewer labels
    when the data spans many decades. Call once the data is plotted."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = sorted(axis.get_view_interval())
    decades = math.log10(hi / lo) if lo > 0 else 10
    subs = (1.0, 2.0, 5.0) if decades <= 2.5 else (1.0, 3.0) if decades <= 4 else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _label(name: str, n: int = 26) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def plot_accuracy_latency(rep: dict, plt) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    rows = [h for h in rep["headline"] if h["latency_b1_p50_ms"]]
    scored = [h for h in rows if h["score"] is not None]
    for h in scored:
        ax.scatter(h["latency_b1_p50_ms"], 100 * h["score"], s=70 if h["role"] == "final" else 46,
                   color=COLORS[h["role"]], marker="D" if h["format"] == "onnx" else "o", zorder=3,
                   edgecolor="white", linewidth=0.8)
        ax.annotate(_label(h["artifact"], 22), (h["latency_b1_p50_ms"], 100 * h["score"]), xytext=(6, 4),
                    textcoords="offset points", fontsize=8, color="#39424e")
    ys = [100 * h["score"] for h in scored]
    if rep["teacher_score"] is not None:
        t = 100 * rep["teacher_score"]
        ax.axhline(t, color=COLORS["teacher"], lw=0.8, ls=":")
        ys.append(t)
        keep = rep["targets"].get("score_retained_vs_teacher")
        if keep:
            line = t * keep["target"]
            ax.axhline(line, color=COLORS["teacher"], lw=0.6, ls="--", alpha=0.5)
            ax.annotate(f"target: {keep['target']:.0%} of teacher", (0.01, line), xycoords=("axes fraction", "data"),
                        xytext=(0, 2), textcoords="offset points", fontsize=7, color="#5b6572")
            ys.append(line)
    for h in rows:
        if h["baseline"]:
            ax.axvline(h["latency_b1_p50_ms"], color=COLORS["baseline"], lw=1, ls="--")
            ax.annotate(f"BERT-base {_pretty_baseline(h['baseline'])}", (h["latency_b1_p50_ms"], 0.98),
                        xycoords=("data", "axes fraction"), rotation=90, ha="right", va="top", fontsize=7,
                        color="#5b6572", xytext=(-3, 0), textcoords="offset points")
    if not scored:
        ax.text(0.5, 0.5, "no dev scores in the manifests", transform=ax.transAxes, ha="center", color="#5b6572")
    elif ys:
        lo, hi = min(ys), max(ys)
        pad = max(1.0, 0.15 * (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xscale("log")
    _log_axis(ax.xaxis)
    ref = rep["reference"]
    ax.set_xlabel(f"latency, batch {ref['latency_batch_size']}, seq {ref['seq_len']}, p50 (ms, log)  ← faster")
    ax.set_ylabel("dev score")
    ax.set_title("Accuracy against latency")
    return _svg(fig)


def plot_sizes(rep: dict, plt) -> str:
    rows = [h for h in rep["headline"] if h["size_mb"]]
    fig, ax = plt.subplots(figsize=(6.4, max(3.8, 0.42 * len(rows) + 1.0)))
    names = [_label(h["artifact"]) for h in rows][::-1]
    vals = [h["size_mb"] for h in rows][::-1]
    ax.barh(names, vals, color=[COLORS[h["role"]] for h in rows][::-1], height=0.62)
    ax.set_xscale("log")
    ax.grid(axis="y", visible=False)
    for y, h in enumerate(rows[::-1]):
        note = f"{h['size_mb']:.1f} MB" if h["size_mb"] >= 1 else f"{h['size_mb']:.2f} MB"
        if h["smaller_vs_bert_base_fp32"] and not h["baseline"]:
            note += f"  ·  {h['smaller_vs_bert_base_fp32']:.1f}× smaller"
        ax.annotate(note, (h["size_mb"], y), xytext=(4, 0), textcoords="offset points", va="center", fontsize=8, color="#39424e")
    ax.set_xlim(min(vals) / 1.5, max(vals) * 8)
    _log_axis(ax.xaxis)
    ax.set_xlabel("model weights on disk (MB, log)")
    ax.set_title("Size")
    return _svg(fig)


def plot_latency_distribution(rep: dict, bench: dict, plt) -> str:
    ref, device = rep["reference"], rep["device"]
    samples = {r["artifact"]: r["samples_ms"] for r in bench["results"]
               if r["device"] == device and r["batch_size"] == ref["latency_batch_size"] and r["seq_len"] == ref["seq_len"]}
    rows = [h for h in rep["headline"] if samples.get(h["artifact"])]
    fig, ax = plt.subplots(figsize=(6.4, max(3.8, 0.42 * len(rows) + 1.0)))
    data = [samples[h["artifact"]] for h in rows][::-1]
    box = ax.boxplot(data, vert=False, whis=(1, 99), showfliers=False, widths=0.55, patch_artist=True,
                     medianprops={"color": "#1f2933", "linewidth": 1.2})
    for patch, h in zip(box["boxes"], rows[::-1]):
        patch.set_facecolor(COLORS[h["role"]])
        patch.set_alpha(0.75)
        patch.set_edgecolor(COLORS[h["role"]])
    ax.set_yticks(range(1, len(rows) + 1), [_label(h["artifact"]) for h in rows][::-1])
    ax.set_xscale("log")
    _log_axis(ax.xaxis)
    ax.grid(axis="y", visible=False)
    ax.set_xlabel(f"ms per call, batch {ref['latency_batch_size']}, seq {ref['seq_len']} (box: p25–p75, whiskers: p1–p99, log)")
    ax.set_title(f"Latency distribution ({device})")
    return _svg(fig)


def plot_throughput(rep: dict, bench: dict, plt) -> str | None:
    ref, device = rep["reference"], rep["device"]
    batches = sorted({r["batch_size"] for r in bench["results"]})
    if len(batches) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for h in rep["headline"]:
        pts = sorted((r["batch_size"], r["throughput_seq_s"]) for r in bench["results"]
                     if r["artifact"] == h["artifact"] and r["device"] == device and r["seq_len"] == ref["seq_len"])
        if pts:
            ax.plot(*zip(*pts), marker="D" if h["format"] == "onnx" else "o", ms=4, lw=1.6,
                    color=COLORS[h["role"]], ls="--" if h["baseline"] else "-", label=_label(h["artifact"], 22))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _log_axis(ax.yaxis)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("sequences / s (log)")
    ax.set_title(f"Throughput, seq {ref['seq_len']} ({device})")
    ax.legend(frameon=False, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    return _svg(fig)


def make_plots(rep: dict, bench: dict) -> dict[str, str]:
    plt = _style()
    plots = {"accuracy_latency": plot_accuracy_latency(rep, plt), "size": plot_sizes(rep, plt),
             "latency_distribution": plot_latency_distribution(rep, bench, plt)}
    tp = plot_throughput(rep, bench, plt)
    if tp:
        plots["throughput"] = tp
    plt.close("all")
    return plots


# ---------------------------------------------------------------- formatting

def _pretty_baseline(role: str) -> str:
    return {"torch_fp32": "PyTorch fp32", "ort_int8": "ORT int8"}.get(role, role)


def fmt_ms(v) -> str:
    if v is None:
        return "—"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def fmt_x(v) -> str:
    return "—" if v is None else f"{v:.1f}×" if v < 100 else f"{v:.0f}×"


def fmt_score(v) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def fmt_delta(v) -> str:
    return "—" if v is None else f"{100 * v:+.2f}"


def fmt_num(v) -> str:
    if v is None:
        return "—"
    return f"{v / 1e6:.1f}M" if v >= 1e6 else f"{v / 1e3:.0f}k" if v >= 1e3 else str(v)


def fmt_tp(v) -> str:
    return "—" if v is None else f"{v:,.0f}" if v >= 10 else f"{v:.2f}"


HEADLINE_COLUMNS = [
    ("artifact", "Artifact", str), ("format", "Format", str), ("precision", "Precision", str),
    ("score", "Dev score", fmt_score), ("delta_vs_teacher", "Δ vs teacher", fmt_delta),
    ("size_mb", "Size MB", lambda v: "—" if v is None else f"{v:.1f}" if v >= 1 else f"{v:.2f}"),
    ("smaller_vs_bert_base_fp32", "× smaller", fmt_x),
    ("latency_b1_p50_ms", "Latency p50 ms", fmt_ms),
    ("faster_vs_bert_base_torch_fp32", "× faster vs PyTorch fp32", fmt_x),
    ("faster_vs_bert_base_ort_int8", "× faster vs ORT int8", fmt_x),
    ("throughput_seq_s", "Throughput seq/s", fmt_tp),
]


def _lineage_chain(a: dict) -> list[dict]:
    chain = [{"stage": e.get("stage"), "name": Path(str(e.get("path", ""))).name or e.get("path"), "score": e.get("score"),
              "format": e.get("format"), "precision": e.get("precision")} for e in a.get("lineage", [])]
    chain.append({"stage": a.get("stage") or "artifact", "name": a["name"], "score": a.get("score"),
                  "format": a["format"], "precision": a.get("precision")})
    return chain


# ---------------------------------------------------------------- one table model, two templates

@dataclass
class Row:
    cells: list[str]
    role: str = ""  # final, teacher, other or baseline: the row's look
    tag: str | None = None  # a badge after the first cell ("final", "baseline · shape only")


@dataclass
class Table:
    """What both templates render: report.md as a Markdown table, report.html as an HTML one."""
    title: str
    columns: list[str]
    rows: list[Row]
    notes: str = ""
    left: int = 1  # the first `left` columns hold text (left-aligned); the rest are numbers


def _report_tables(rep: dict) -> list[Table]:
    """The headline, every grid point, and the artifacts, formatted for reading."""
    ref, device = rep["reference"], rep["device"]
    headline = []
    for h in rep["headline"]:
        tag = {"final": "final", "teacher": "teacher"}.get(h["role"])
        if h["baseline"]:
            tag = "baseline · shape only" if h["shape_only"] else "baseline"
        headline.append(Row([fn(h[key]) if h[key] is not None else "—" for key, _, fn in HEADLINE_COLUMNS], h["role"], tag))
    grid = [Row([r["artifact"], r["device"], r["provider"], str(r["batch_size"]), str(r["seq_len"]), str(r["iters"]),
                 fmt_ms(r["p50_ms"]), fmt_ms(r["p90_ms"]), fmt_ms(r["p99_ms"]), fmt_ms(r["mean_ms"]),
                 fmt_tp(r["throughput_seq_s"])]) for r in rep["latency_table"]]
    arts, methods = [], set()
    for a in rep["artifacts"]:
        cs = (a.get("cold_start") or {}).get(device, {})
        methods.add(cs.get("method", "?"))
        arts.append(Row([a["name"], a.get("stage") or "—", fmt_num(a.get("num_parameters")),
                         f"{(a.get('model_bytes') or 0) / 1e6:.1f}", f"{a['size_bytes'] / 1e6:.1f}",
                         *(str(cs.get(k, "—")) for k in ("load_s", "first_inference_s", "peak_rss_delta_mb"))]))
    cold = " and ".join(sorted(methods)).replace("subprocess", "in a fresh process").replace("inprocess", "in the bench process")
    return [
        Table("Headline", [c[1] for c in HEADLINE_COLUMNS], headline, left=3, notes=(
            f"Latency: p50 at batch {ref['latency_batch_size']}, sequence {ref['seq_len']} on {device}; throughput at "
            f"batch {ref['throughput_batch_size']}. Size: model weight files. Dev scores ×100, Δ in points. "
            "× = times better than the BERT-base baseline, measured side by side in one run.")),
        Table("Every grid point", ["Artifact", "Device", "Provider", "Batch", "Seq", "Iters", "p50 ms", "p90 ms", "p99 ms",
                                   "Mean ms", "Seq/s"], grid, left=3),
        Table("Artifacts", ["Artifact", "Stage", "Parameters", "Weights MB", "Folder MB", "Load s", "First call s",
                            "Peak RSS Δ MB"], arts, left=2, notes=(
            f"Cold start measured {cold}: load, then the first call at batch 1; peak RSS Δ is the rise of the process's "
            "resident memory over it.")),
    ]


def report_tables(rep: dict) -> list[Table]:
    tables = _report_tables(rep)
    if rep.get("serving"):
        tables.append(serving_table(rep["serving"]))
    return tables


def serving_table(table: dict) -> Table:
    """The load-test section (pipeline/report_serving.py's table model) for both templates."""
    from pipeline.report_serving import format_cell

    return Table("Serving under load", table["columns"], [Row([format_cell(v) for v in row]) for row in table["rows"]], left=2,
                 notes="Open-loop rate sweep per endpoint (bertforge loadtest --mode sweep); req/s at SLO is the knee: "
                       "the highest offered rate whose p99 stays within the SLO with no failures.")


def decision(rep: dict) -> dict | None:
    """The first screen: which artifact, how good against its teacher, how fast and small against BERT-base,
    and the command that serves it. None when the bench names no final artifact."""
    if not rep["final"]:
        return None
    r, ref, targets = rep["ratios"], rep["reference"], rep["targets"]

    def kpi(key, value, label):
        t = targets.get(key)
        target = None
        if t:
            target = f"≥ {t['target']:.0%}" if key == "score_retained_vs_teacher" else f"≥ {t['target']:g}×"
        return {"value": value, "label": label, "target": target, "met": bool(t and t["met"])}

    keep = r["score_retained_vs_teacher"]
    kpis = [kpi("score_retained_vs_teacher", f"{100 * keep:.1f}%" if keep else fmt_score(rep["final_score"]),
                f"of the teacher's dev score ({fmt_score(rep['final_score'])} vs {fmt_score(rep['teacher_score'])})"
                if keep else "dev score of the final artifact"),
            kpi("latency_b1_vs_bert_base_torch_fp32", fmt_x(r["latency_b1_vs_bert_base_torch_fp32"]),
                "lower latency than BERT-base PyTorch fp32"),
            kpi("latency_b1_vs_bert_base_ort_int8", fmt_x(r["latency_b1_vs_bert_base_ort_int8"]),
                "lower latency than BERT-base ONNX Runtime int8"),
            kpi("size_vs_bert_base_fp32", fmt_x(r["size_vs_bert_base_fp32"]), "smaller on disk than BERT-base fp32")]
    final = next(h for h in rep["headline"] if h["artifact"] == rep["final"])
    teacher = f" Its teacher ({rep['teacher']}) scores {fmt_score(rep['teacher_score'])}." if rep["teacher"] else ""
    facts = [f"{final['format']} {final['precision'] or ''}".strip(), f"{fmt_num(final['num_parameters'])} parameters",
             f"{final['size_mb']} MB" if final["size_mb"] is not None else None, f"dev score {fmt_score(final['score'])}"]
    summary = (", ".join(f for f in facts if f and "—" not in f) + f".{teacher} Against BERT-base at batch "
               f"{ref['latency_batch_size']}, sequence {ref['seq_len']} on {rep['device']}, measured side by side in one run:")
    met = [t["met"] for t in targets.values()]
    if met:
        summary = f"{sum(met)} of {len(met)} targets met. " + summary
    from pipeline.report_real_text import decision_extras

    extras = decision_extras(rep)  # real-text p99 and the accurate baseline, right after the score
    threads = rep["threads"].get("intra_op")
    return {"final": rep["final"], "summary": summary, "kpis": kpis[:1] + extras["kpis"] + kpis[1:],
            "real_text_line": extras["real_text_line"],
            "serve": f"bertforge serve --model {shlex.quote(str(rep['final_path'] or rep['final']))}"
                     + (f" --threads {threads}" if threads else "")}


def render(rep: dict, plots: dict[str, str], fmt: str) -> str:
    """report.md (`fmt="md"`) or report.html (`fmt="html"`) from the templates in pipeline/templates/."""
    import jinja2

    hw = rep["hardware"]
    cfg = rep["bench_config"]
    method = (f"artifacts take turns in {cfg.get('slice_seconds')} s slices (round robin) after {cfg.get('warmup')} warm-up calls, "
              f"until each has ≥ {cfg.get('min_iters')} calls and ≥ {cfg.get('min_seconds')} s per grid point; "
              "full-length random token sequences, no padding")
    hw_items = [(k.replace("_", " "), (", ".join(map(str, v)) or "none") if isinstance(v, list) else ("none" if v is None else v))
                for k, v in hw.items()]
    t = rep["threads"]
    threads = (f"{t.get('intra_op')} intra-op (torch {t.get('torch_num_threads')}, ONNX Runtime {t.get('intra_op')}), "
               f"ONNX Runtime inter-op {t.get('ort_inter_op')}" + "".join(f", {k}={v}" for k, v in (t.get("env") or {}).items()))
    env = jinja2.Environment(loader=jinja2.PackageLoader("pipeline", "templates"), trim_blocks=True, lstrip_blocks=True,
                             autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default=False),
                             keep_trailing_newline=True)
    from pipeline.report_real_text import real_text_tables

    return env.get_template(f"report.{fmt}.j2").render(
        rep=rep, ref=rep["reference"], hw=hw, decision=decision(rep), tables=report_tables(rep),
        real_text_tables=real_text_tables(rep),
        plots=[{"id": k, "svg": v, "caption": PLOT_CAPTIONS[k]} for k, v in plots.items() if k in PLOT_CAPTIONS],
        budget_plot=plots.get("budget_pareto"),
        lineage=[{"name": a["name"], "chain": _lineage_chain(a)} for a in rep["artifacts"]],
        hw_items=hw_items, threads=threads, method=method)


PLOT_CAPTIONS = {
    "accuracy_latency": "Dev score against batch-1 latency; dashed lines: the BERT-base baselines (no score: speed only). "
                        "Diamonds: ONNX Runtime, circles: PyTorch.",
    "size": "Model weight files on disk; × smaller against BERT-base fp32.",
    "latency_distribution": "Every measured call, interleaved with the other artifacts.",
    "throughput": "Sequences per second against batch size; dashed: baselines.",
    "serving_p99": "Load test: p99 latency against the offered request rate (open loop), one line per endpoint; "
                   "dashed: the SLO; star: the knee (the highest rate within it).",
}


def build_report(bench: dict[str, Any], out_dir: str | Path, cfg: ReportConfig | None = None) -> dict[str, Any]:
    """Write report.md, report.html and report.json into `out_dir`; return the report.json content."""
    cfg = cfg or ReportConfig()
    if not bench.get("results"):
        raise BertforgeError("the bench holds no measurements")
    rep = analyse(bench, cfg)
    if len(rep["devices"]) > 1:  # the headline is one device's; the ratios of each are kept too
        from dataclasses import replace

        rep["ratios_by_device"] = {d: analyse(bench, replace(cfg, device=d))["ratios"] for d in rep["devices"]}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(rep, bench)
    if cfg.loadtest:
        from pipeline.report_serving import serving_section

        section = serving_section(cfg.loadtest)
        rep["serving"] = section["table"]
        plots["serving_p99"] = section["plot_svg"]
    if cfg.budget:  # its own section (templates/report_budget.*.j2), not the plot grid
        from pipeline.report_budget import budget_section, plot_pareto

        rep["budget"] = budget_section(cfg.budget)
        plots["budget_pareto"] = plot_pareto(cfg.budget, _style())
    (out / "report.md").write_text(render(rep, plots, "md"))
    (out / "report.html").write_text(render(rep, plots, "html"))
    (out / "report.json").write_text(json.dumps(_finite(rep), indent=1) + "\n")
    return rep


def _finite(obj):
    """JSON has no NaN: a failed metric (e.g. a constant prediction's correlation) becomes null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj

