"""Serving capacity: the int8 student against a BERT-base-shaped fp32 baseline, over HTTP, with answers checked.

Each model is served in turn by `bertforge serve` (its own process, one runtime thread by default) and
loaded by Locust (another process, beside it on the same machine) through `bertforge loadtest`'s sweep: a
closed-loop estimate of capacity, then open-loop steps at fixed fractions of it. At every step each label
served is compared with SST-2's gold label and with the artifact's own offline answer for that text (one
text at a time, no batching), so the served accuracy sits beside the offline dev score, and any answer that
moved with batch composition is counted. The knee is the highest offered rate whose p99 stays within the
SLO with no failures; its achieved rate is the endpoint's requests/s at the SLO.

    python benchmarks/serve_load.py --student runs/sst2/int8 --threads 1 --slo-ms 100

Without --baseline, the baseline is built (runs/serve_load_baseline): BertForSequenceClassification with
BERT-base's shape (12 layers, hidden 768, 12 heads, FFN 3072) and random weights (shape only: its speed is
real, its accuracy is chance), served as PyTorch fp32. benchmarks/results/serving.json gets one row per
step (mode "fixed-rate") plus the closed-loop estimate (mode "closed"); the knee's row has "knee": true.
A rerun replaces the rows of the models it ran.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

from benchmarks.common import git_commit
from pipeline.artifacts import sha256

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED_NOTE = ("2-vCPU machine shared with other helpers' jobs during the run; Locust ran beside the server on the "
               "same cores: compare the two models' ratios, not absolute figures across runs")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, args, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "pipeline.cli", "serve", "--model", model, "--port", str(port),
               "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
               "--max-queue", str(args.max_queue), "--log-level", "warning"]
    if args.threads:
        command += ["--threads", str(args.threads)]
    proc = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    return proc, f"http://127.0.0.1:{port}"


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def relative(path) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else p.name


def model_checksum(folder: Path) -> str | None:
    weights = sorted(folder.glob("*.onnx")) or sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    return sha256(weights[0])[:16] if weights else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="the int8 student artifact folder (ONNX)")
    p.add_argument("--student-name", default="student-int8")
    p.add_argument("--baseline", default=None, help="baseline folder (default: build the BERT-base-shaped fp32 model)")
    p.add_argument("--baseline-name", default="bert-base-shaped-torch-fp32")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--slo-ms", type=float, default=100.0, help="p99 objective for the knee")
    p.add_argument("--steps", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5],
                   help="offered rates as fractions of the closed-loop estimate")
    p.add_argument("--step-duration", default="20s")
    p.add_argument("--estimate-users", type=int, default=8)
    p.add_argument("--estimate-duration", default="15s")
    p.add_argument("--step-users", type=int, default=4)
    p.add_argument("--baseline-texts", type=int, default=200,
                   help="dev texts cycled through for the baseline (its offline answers, one text at a time, are slow)")
    p.add_argument("--task", default="sst2")
    p.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR"))
    p.add_argument("--threads", type=int, default=1, help="runtime threads in the server (and for offline answers)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=0)
    p.add_argument("--max-queue", type=int, default=2048)
    p.add_argument("--work", default=str(ROOT / "runs" / "serve_load"), help="Locust CSVs and server logs")
    p.add_argument("--out", default=str(RESULTS / "serving.json"))
    args = p.parse_args()
    command = "python benchmarks/serve_load.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    from serving.loadtest import load_examples, make_endpoint, make_label_check, run_sweep, wait_ready

    all_rows = load_examples(args.task, args.glue_dir)
    models = [(args.student_name, Path(args.student), False, all_rows)]
    if not args.skip_baseline:
        if args.baseline:
            models.append((args.baseline_name, Path(args.baseline), False, all_rows[:args.baseline_texts]))
        else:
            from pipeline.baseline import build_baseline

            folder = build_baseline(ROOT / "runs" / "serve_load_baseline", task=args.task, hub_id=None, int8=False)["torch_fp32"]
            models.append((args.baseline_name, Path(folder), True, all_rows[:args.baseline_texts]))

    out = Path(args.out)
    kept = [r for r in json.loads(out.read_text()) if r.get("model") not in {m[0] for m in models}] \
        if out.is_file() and isinstance(json.loads(out.read_text()), list) else []
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    endpoint = make_endpoint("bertforge")
    from pipeline.artifacts import read_manifest

    for name, folder, built_here, rows in models:
        manifest = read_manifest(folder)
        shape_only = built_here or bool(manifest and manifest.params.get("shape_only"))
        texts_sha = hashlib.sha256("\n".join(f"{a}\t{b or ''}\t{y}" for a, b, y in rows).encode()).hexdigest()[:16]
        # Offline answers first, with the server not yet started: the reference every served label must equal.
        check = make_label_check(rows, args.task, str(folder), max_tokens=128)
        proc, host = start_server(str(folder), args, work / f"{name}.server.log")
        try:
            wait_ready(host, timeout=600)
            sweep = run_sweep(host, work / name, args.slo_ms, args.steps, args.step_duration, args.estimate_users,
                              args.estimate_duration, args.step_users, name, task=args.task, rows=rows,
                              endpoint=endpoint, label_check=check)
        finally:
            stop_server(proc)
        common = {"model": name, "artifact": relative(folder), "artifact_sha256": model_checksum(folder),
                  "shape_only": shape_only, "task": args.task, "texts": len(rows), "texts_sha256": texts_sha,
                  "protocol": "bertforge", "server_threads": args.threads, "max_batch_size": args.max_batch_size,
                  "max_wait_ms": args.max_wait_ms, "slo_ms": args.slo_ms, "rps_at_slo": sweep["rps_at_slo"],
                  "offline_dev_score": check.offline_dev_score, "cpus": os.cpu_count(), "seed": 0,
                  "git_commit": git_commit(), "command": command, "machine_note": SHARED_NOTE}
        est = sweep["estimate"]
        new = [{**common, "mode": "closed", "users": est["users"], "target_rps": None, "rps": round(est["requests_per_s"], 2),
                "p50_ms": est["p50_ms"], "p99_ms": est["p99_ms"], "failures": est["failures"],
                "failure_kinds": est["failure_kinds"], "labels": est.get("labels"),
                "mean_batch_size": (est.get("server") or {}).get("mean_batch_size")}]
        for s in sweep["steps"]:
            new.append({**common, "mode": "fixed-rate", "users": args.step_users, "fraction": s["fraction"],
                        "target_rps": s["offered_rps"], "rps": s["achieved_rps"], "requests": s["requests"],
                        "p50_ms": s["p50_ms"], "p90_ms": s["p90_ms"], "p99_ms": s["p99_ms"], "failures": s["failures"],
                        "failure_kinds": s["failure_kinds"], "labels": s.get("labels"),
                        "mean_batch_size": s["mean_batch_size"], "knee": s is sweep["knee"],
                        "duration_s": sweep["step_duration_s"]})
        kept += new
        out.write_text(json.dumps(kept, indent=2) + "\n")
        for r in new:
            lab = r["labels"] or {}
            print(json.dumps({k: r.get(k) for k in ("model", "mode", "target_rps", "rps", "p50_ms", "p99_ms", "failures",
                                                    "mean_batch_size", "knee")}
                             | {"served_accuracy": lab.get("served_accuracy"), "disagreements": lab.get("disagreements")}),
                  flush=True)
        print(f"{name}: {sweep['rps_at_slo']} requests/s at p99 <= {args.slo_ms:g} ms", flush=True)


if __name__ == "__main__":
    main()
