"""The serving section of the comparison report, from load-test sweeps: one row per endpoint (requests/s at
the p99 SLO, p50/p99 there, failures, served accuracy) and a plot of p99 against the offered rate.

Inputs are the `sweep.json` files `bertforge loadtest --mode sweep` writes (a folder holding one, or the
file), or the rows of `benchmarks/results/serving.json` (one row per step, grouped by model). Both become
the same "endpoint" dicts: name, slo_ms, steps (offered_rps, achieved_rps, p50_ms, p99_ms, failures,
labels), knee. The knee is the one the sweep chose (serving/loadtest.py: find_knee), read, never
recomputed here. No torch here; matplotlib only when plotting.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

from pipeline.errors import BertforgeError

COLUMNS = ["endpoint", "protocol", "req/s at SLO", "SLO p99 ms", "p50 ms", "p99 ms", "failures",
           "served accuracy", "offline dev score", "answers differing from offline"]


def load_sweeps(paths) -> list[dict]:
    """Endpoint dicts from sweep folders or files (`sweep.json`, or a serving.json list of step rows)."""
    endpoints = []
    for p in paths:
        path = Path(p)
        path = path / "sweep.json" if path.is_dir() else path
        if not path.is_file():
            raise BertforgeError(f"{p}: no sweep.json (run `bertforge loadtest --mode sweep --out {p}`)")
        data = json.loads(path.read_text())
        endpoints += endpoints_from_rows(data) if isinstance(data, list) else [data]
    return endpoints


def endpoints_from_rows(rows: list[dict]) -> list[dict]:
    """serving.json's step rows (mode "fixed-rate", one per offered rate; the knee's row marked
    `"knee": true`) grouped into endpoint dicts."""
    by_model: dict[str, list] = {}
    for r in rows:
        if r.get("mode") == "fixed-rate":
            by_model.setdefault(r["model"], []).append(r)
    endpoints = []
    for name, rs in by_model.items():
        slo = rs[0].get("slo_ms")
        steps = sorted(({"offered_rps": r["target_rps"], "achieved_rps": r["rps"], "p50_ms": r["p50_ms"],
                         "p99_ms": r["p99_ms"], "failures": r["failures"], "labels": r.get("labels"),
                         "knee": bool(r.get("knee"))} for r in rs), key=lambda s: s["offered_rps"])
        knee = next((s for s in steps if s["knee"]), None)
        endpoints.append({"name": name, "protocol": rs[0].get("protocol", "bertforge"), "slo_ms": slo, "steps": steps,
                          "knee": knee, "rps_at_slo": knee["achieved_rps"] if knee else None})
    return endpoints


def _accuracy(steps: list[dict]) -> tuple:
    """Served accuracy over every checked step (each step's texts weighted by their answers), the offline
    dev score, and the answers that differed from the artifact's offline predictions."""
    checked = [s["labels"] for s in steps if s.get("labels") and s["labels"].get("served_accuracy") is not None]
    if not checked:
        return None, None, None
    answers = sum(c["answers"] for c in checked)
    accuracy = sum(c["served_accuracy"] * c["answers"] for c in checked) / answers if answers else None
    differing = sum(c["disagreements"] for c in checked) if all("disagreements" in c for c in checked) else None
    return accuracy, checked[0].get("offline_dev_score"), differing


def serving_table(endpoints: list[dict]) -> dict:
    """The table model: {"columns": [...], "rows": [[...], ...]}, one row per endpoint, numbers unformatted
    (None where there is nothing to show, e.g. no rate met the SLO)."""
    rows = []
    for e in endpoints:
        knee = e.get("knee")
        accuracy, offline, differing = _accuracy(e["steps"])
        rows.append([e["name"], e.get("protocol"), e.get("rps_at_slo"), e["slo_ms"],
                     knee["p50_ms"] if knee else None, knee["p99_ms"] if knee else None,
                     sum(s["failures"] for s in e["steps"]), accuracy, offline, differing])
    return {"columns": COLUMNS, "rows": rows}


def format_cell(v) -> str:
    """A serving-table value for reading: accuracies (≤ 1) to 4 places, rates and milliseconds to 1."""
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4f}" if v <= 1 else f"{v:.1f}"
    return str(v)


def markdown_table(table: dict) -> str:
    lines = ["| " + " | ".join(table["columns"]) + " |", "|" + "---|" * len(table["columns"])]
    lines += ["| " + " | ".join(format_cell(v) for v in row) + " |" for row in table["rows"]]
    return "\n".join(lines)


def plot_p99(endpoints: list[dict], path: str | os.PathLike | None = None) -> str:
    """p99 latency against the offered rate, one line per endpoint, each SLO drawn; SVG text (also written
    to `path` when given, in the format its suffix names)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    plotted = 0
    for e in endpoints:
        # a step with no successful request has no p99; log axes need positive values
        steps = [s for s in e["steps"] if (s.get("p99_ms") or 0) > 0 and (s.get("offered_rps") or 0) > 0]
        plotted += len(steps)
        line, = ax.plot([s["offered_rps"] for s in steps], [s["p99_ms"] for s in steps], marker="o", label=e["name"])
        if e.get("knee"):
            ax.plot([e["knee"]["offered_rps"]], [e["knee"]["p99_ms"]], marker="*", markersize=14, color=line.get_color())
    for slo in sorted({e["slo_ms"] for e in endpoints if e.get("slo_ms")}):
        ax.axhline(slo, color="grey", linestyle="--", linewidth=1)
        ax.annotate(f"SLO p99 {slo:g} ms", (0.01, slo), xycoords=("axes fraction", "data"), va="bottom", fontsize=8)
    if plotted:
        ax.set_xscale("log")
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no step had a successful request", transform=ax.transAxes, ha="center")
    ax.set_xlabel("offered rate (requests/s, open loop)")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_title("Latency under load (★ knee: highest rate within the SLO)")
    if plotted:
        ax.legend(fontsize=8)
    fig.tight_layout()
    if path:
        fig.savefig(path)
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    return buf.getvalue()


def serving_section(paths) -> dict:
    """Everything the report's serving section shows, for `bertforge report --loadtest RUN...`: the table
    model, the same table as Markdown, and the plot as SVG text."""
    endpoints = load_sweeps(paths)
    table = serving_table(endpoints)
    return {"endpoints": endpoints, "table": table, "markdown": markdown_table(table), "plot_svg": plot_p99(endpoints)}
