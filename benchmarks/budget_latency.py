"""Every artifact chosen in benchmarks/results/budget.json, timed again side by side in one bench run.

Each budget.json row carries the ratio its own run measured, but those runs shared the machine with other
jobs, and load does not slow every model alike: a 250 ms BERT-base call is preempted far more often than a
5 ms one, so a loaded machine inflates the ratios (one SST-2 artifact measured 57x and 82x against BERT-base
in two loaded runs, 57x quiet). This script takes each distinct chosen artifact (from its run folder under
`--work`, named by the row's command), benches them all with BERT-base (PyTorch fp32 and ONNX Runtime
int8) in one `bertforge bench` run at batch 1, one thread, and writes benchmarks/results/budget_latency.json:
one row per budget.json row with the quiet ratios beside the in-run ones, the command, the git commit and
each artifact's model checksum. Run it with nothing else on the machine (`--machine-note` says what was).

    python benchmarks/budget_latency.py
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import command_line, git_commit, input_checksums, write_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def run_result(row: dict) -> dict:
    """The search's RUN/budget/budget.json, RUN being the `out=` of the row's command."""
    out = re.search(r"\bout=(\S+)", row["command"])
    if not out:
        raise SystemExit(f"no out= in the command of the {row['task']} {row['budget']}-point row")
    path = ROOT / out.group(1) / "budget" / "budget.json"
    if not path.is_file():
        raise SystemExit(f"{path}: not there (run benchmarks/budget.py with the row's command first)")
    return json.loads(path.read_text())


def chosen_folder(row: dict, result: dict | None = None) -> Path:
    """The chosen candidate's own folder, as its search (`result`, read when not given) recorded it: an fp32
    candidate is its graph's folder."""
    result = result or run_result(row)
    return ROOT / next(c["folder"] for c in result["candidates"] if c["name"] == row["chosen"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", default=str(RESULTS / "budget.json"))
    p.add_argument("--baseline-dir", default=str(ROOT / "runs" / "budget-latency" / "bert-base-baseline"))
    p.add_argument("--min-seconds", type=float, default=3.0, help="measured seconds per artifact")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--machine-note", default="nothing else ran on the 2-core machine")
    p.add_argument("--out", default=str(RESULTS / "budget_latency.json"))
    args = p.parse_args(argv)

    rows = [r for r in json.loads(Path(args.budget).read_text())["rows"] if r.get("chosen")]
    names: dict[Path, str] = {}
    for r in rows:
        folder = chosen_folder(r)
        if not (folder / "config.json").is_file():
            raise SystemExit(f"{folder}: not there (run benchmarks/budget.py with the row's command first)")
        names.setdefault(folder, f"{r['task']}-{r['chosen']}")
    checksums = {folder: input_checksums(model=folder)["model"] for folder in names}  # once per artifact
    with tempfile.TemporaryDirectory() as tmp:
        bench_out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "pipeline.cli", "bench", "--models", *(f"{n}={f}" for f, n in names.items()),
               "--out", str(bench_out), "--batch-sizes", "1", "--seq-lens", "128", "--threads", str(args.threads),
               "--min-seconds", str(args.min_seconds), "--cold-start", "inprocess", "--device", "cpu",
               "--baseline", "--baseline-dir", args.baseline_dir]
        subprocess.run(cmd, cwd=ROOT, check=True)
        bench = json.loads(bench_out.read_text())
    p50 = {r["artifact"]: r["p50_ms"] for r in bench["results"] if r["batch_size"] == 1}
    torch_fp32, ort_int8 = p50["bert-base-torch-fp32"], p50["bert-base-ort-int8"]
    out_rows = []
    for r in rows:
        folder = chosen_folder(r)
        name = names[folder]
        out_rows.append({
            "task": r["task"], "budget": r["budget"], "objective": r["objective"], "confidence": r.get("confidence"),
            "chosen": r["chosen"], "dev_drop_points": r["dev_drop_points"], "latency_b1_ms": p50[name],
            "latency_b1_vs_bert_base_torch_fp32": round(torch_fp32 / p50[name], 2),
            "latency_b1_vs_bert_base_ort_int8": round(ort_int8 / p50[name], 2),
            "in_run_latency_b1_vs_bert_base_torch_fp32": r["latency_b1_vs_bert_base_torch_fp32"],
            "model_sha256": checksums[folder],
        })
    write_results(args.out, {
        "benchmark": "the chosen artifacts of budget.json against BERT-base, one bench run, batch 1, sequence 128",
        "command": command_line(), "bench_command": bench["command"], "git_commit": git_commit(),
        "threads": args.threads, "machine_note": args.machine_note, "hardware": bench["hardware"],
        "versions": bench["versions"], "bert_base_latency_b1_ms": {"torch_fp32": torch_fp32, "ort_int8": ort_int8},
        "baseline_shape_only": True, "rows": out_rows,
    })
    print(json.dumps([{k: r[k] for k in ("task", "budget", "objective", "confidence", "chosen",
                                         "latency_b1_vs_bert_base_torch_fp32")} for r in out_rows], indent=1))


if __name__ == "__main__":
    main()
