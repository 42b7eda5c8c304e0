"""Real-text latency (issue 18): an SST-2 int8 student, its teacher and both BERT-base baselines on SST-2
dev sentences at their own lengths, beside the padded s128 grid, at 1 and 2 threads.

    python benchmarks/real_text.py --run runs/quickstart --texts-limit 400

`--run` is a `bertforge run` folder (make demo's `runs/quickstart`: teacher/, int8/, bert-base-baseline/);
its folders are only read (run from the folder that holds it, so the report's serve command reads
`runs/quickstart/int8`). The last thread count's bench also becomes an SST-2 report (`--report`). Each thread count is one `benchmark_artifacts` call: the s128 grid (batch 1 and
32) and then the real text (a shape probe, batch 1 over every text, length-sorted batches of 8 and 32), the
four artifacts taking turns in short slices. Every row records the mean token length of its inputs (128 on
the grid). The ratios quoted are "times better than the baseline" within one call, never across calls:
this 2-core machine is shared with other jobs (other helpers' tests and training runs), so absolute times
drift from minute to minute while side-by-side ratios hold better.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import command_line, write_results  # noqa: E402
from pipeline.artifacts import MANIFEST, sha256  # noqa: E402
from pipeline.bench import ArtifactSpec, BenchConfig, benchmark_artifacts  # noqa: E402

SHARED_NOTE = ("2-vCPU machine shared with other jobs (other helpers' tests, a training run) during the measurement: "
               "absolute times are noisy; compare only the ratios, each measured side by side in one run.")
BASELINES = ("bert-base-torch-fp32", "bert-base-ort-int8")


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None


def _ratio(num, den):
    return round(num / den, 3) if num and den else None


def ratios(bench: dict, name: str) -> dict:
    """`name` against each baseline: s128 and real text side by side (latency: baseline / artifact at
    batch 1, p50 and p99; throughput: artifact / baseline at batch 32)."""
    grid = {(r["artifact"], r["batch_size"]): r for r in bench["results"]}
    text = {(r["artifact"], r["batch_size"]): r for r in bench["text_results"]}
    out = {}
    for base in BASELINES:
        out[f"vs_{base}"] = {
            "s128_latency_b1_p50": _ratio(grid[(base, 1)]["p50_ms"], grid[(name, 1)]["p50_ms"]),
            "real_text_latency_b1_p50": _ratio(text[(base, 1)]["p50_ms"], text[(name, 1)]["p50_ms"]),
            "s128_latency_b1_p99": _ratio(grid[(base, 1)]["p99_ms"], grid[(name, 1)]["p99_ms"]),
            "real_text_latency_b1_p99": _ratio(text[(base, 1)]["p99_ms"], text[(name, 1)]["p99_ms"]),
            "s128_throughput_b32": _ratio(grid[(name, 32)]["throughput_seq_s"], grid[(base, 32)]["throughput_seq_s"]),
            "real_text_throughput_b32_sorted": _ratio(text[(name, 32)]["throughput_seq_s"], text[(base, 32)]["throughput_seq_s"]),
        }
    return out


def slim(row: dict, grid: bool) -> dict:
    keep = {k: v for k, v in row.items() if k != "samples_ms"}
    if grid:
        keep["mean_tokens"] = keep["mean_padded_tokens"] = row["seq_len"]  # full-length random sequences, no padding
    return keep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/quickstart", help="a bertforge run folder (teacher/, int8/, bert-base-baseline/)")
    p.add_argument("--teacher", default=None, help="teacher folder (default: RUN/teacher)")
    p.add_argument("--glue-dir", default=str(ROOT.parent / "shared" / "glue_data"))
    p.add_argument("--texts-limit", type=int, default=400, help="the first N SST-2 dev sentences")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--max-seconds", type=float, default=120.0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "real_text.json"))
    p.add_argument("--report", default=str(ROOT / "benchmarks" / "results" / "real_text_report"),
                   help="the report of the last thread count's bench: PREFIX.md, PREFIX.html, PREFIX.json")
    args = p.parse_args()

    run = Path(args.run)
    specs = [ArtifactSpec("student-int8", run / "int8"), ArtifactSpec("teacher", Path(args.teacher or run / "teacher")),
             ArtifactSpec("bert-base-torch-fp32", run / "bert-base-baseline" / "torch-fp32"),
             ArtifactSpec("bert-base-ort-int8", run / "bert-base-baseline" / "ort-int8")]
    inputs = {s.name: sha256(s.path / MANIFEST) for s in specs}  # each manifest lists its files' sha256
    runs = []
    for threads in args.threads:
        cfg = BenchConfig(batch_sizes=[1, 32], seq_lens=[128], warmup=2, min_iters=5, min_seconds=2.0,
                          max_seconds=args.max_seconds, threads=threads, device="cpu", cold_start="inprocess", seed=0,
                          texts="sst2", texts_limit=args.texts_limit, glue_dir=args.glue_dir)
        start, load_before = time.perf_counter(), os.getloadavg()
        bench = benchmark_artifacts(specs, cfg)
        bench.update(final="student-int8", teacher="teacher", command=command_line())
        runs.append({
            "threads": threads, "wall_s": round(time.perf_counter() - start, 1), "created": bench["created"],
            # 1-minute load average of the 2-core machine before and after: how contended the run was
            "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "texts": bench["texts"],
            "artifacts": {a["name"]: {k: a.get(k) for k in ("format", "precision", "model_bytes", "num_parameters", "score",
                                                           "shape_only", "baseline")} for a in bench["artifacts"]},
            "grid_rows": [slim(r, True) for r in bench["results"]],
            "text_rows": [slim(r, False) for r in bench["text_results"]],
            "ratios": {name: ratios(bench, name) for name in ("student-int8", "teacher")},
        })
        write_results(args.out, {  # after each thread count: a long run cut short keeps what it measured
            "benchmark": "real_text", "command": command_line(), "git_commit": git_commit(), "seed": 0,
            "machine_note": SHARED_NOTE, "inputs_manifest_sha256": inputs, "hardware": bench["hardware"],
            "versions": bench["versions"],
            "ratio_convention": "times better than the baseline: baseline/artifact for latency, artifact/baseline for throughput",
            "runs": runs,
        })
    write_report(bench, Path(args.report))
    print(f"wrote {args.out} and {args.report}.*", file=sys.stderr)


def write_report(bench: dict, prefix: Path) -> None:
    """The SST-2 report of one bench (decision page, real text, reference rows), no machine paths in it."""
    import tempfile

    from benchmarks.common import portable, portable_text
    from pipeline.report import ReportConfig, build_report

    with tempfile.TemporaryDirectory() as tmp:
        build_report(portable(bench), tmp, ReportConfig(final="student-int8", teacher="teacher"))
        prefix.parent.mkdir(parents=True, exist_ok=True)
        for suffix in (".md", ".html", ".json"):
            prefix.with_name(prefix.name + suffix).write_text(portable_text((Path(tmp) / f"report{suffix}").read_text()))


if __name__ == "__main__":
    main()
