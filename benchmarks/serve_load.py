"""Serving under load: the int8 student against a BERT-base-shaped fp32 baseline, over HTTP.

Each model is served in turn by `bertforge serve` (its own process) and loaded by Locust (another
process, on the same machine), closed loop at several user counts, then open loop at fixed rates
below the closed-loop peak. Each row also carries `inprocess_rps`: the same model called directly
(tokenize + pad + forward, the server's own Predictor) at the mean batch size the server formed in
that run, so `http_efficiency = rps / inprocess_rps` is what the HTTP path costs.

    python benchmarks/serve_load.py --student runs/sst2/int8 --users 1 4 16 --duration 30s

Without --baseline, the baseline is built here: BertForSequenceClassification with BERT-base's shape
(12 layers, hidden 768, 12 heads, FFN 3072) and random weights (shape only: its speed is real, its
answers are not), served as PyTorch fp32. Rows are written to benchmarks/results/serving.json after
every run; a rerun replaces rows with the same model, mode, users and rate.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "pipeline.cli", "serve", "--model", model, "--port", str(port),
               "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
               "--max-queue", str(args.max_queue), "--log-level", "warning"]
    if args.threads:
        command += ["--threads", str(args.threads)]
    runs = RESULTS / "serve_load_runs"
    runs.mkdir(parents=True, exist_ok=True)
    log = open(runs / f"{Path(model).name}.server.log", "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return proc, f"http://127.0.0.1:{port}"


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def inprocess_rps(model: str, texts: list, batch_size: int, threads: int | None, max_tokens: int,
                  seconds: float) -> float:
    """Requests (one input each) per second with the server's Predictor called directly."""
    from pipeline.inference import load_runtime
    from serving.predictor import Predictor

    predictor = Predictor(load_runtime(model, "cpu", threads), max_tokens)
    batches = [texts[i:i + batch_size] for i in range(0, len(texts) - batch_size + 1, batch_size)]
    predictor(batches[0])
    done, start, i = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        done += len(predictor(batches[i % len(batches)]))
        i += 1
    return done / (time.perf_counter() - start)


def load_texts(path: Path) -> list:
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [(a, b) if b else a for a, b in rows]


def row_key(r: dict) -> tuple:
    return r["model"], r["mode"], r["users"], r.get("target_rps")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="the int8 student artifact folder (ONNX)")
    p.add_argument("--student-name", default="student-int8")
    p.add_argument("--baseline", default=None, help="baseline folder (default: build the BERT-base-shaped fp32 model)")
    p.add_argument("--baseline-name", default=None)
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--users", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--rates", type=float, nargs="*", default=[0.5, 0.8],
                   help="fixed-rate runs at these fractions of the model's closed-loop peak")
    p.add_argument("--fixed-rate-users", type=int, default=8)
    p.add_argument("--duration", default="30s")
    p.add_argument("--task", default="sst2")
    p.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR"))
    p.add_argument("--threads", type=int, default=None, help="runtime threads in the server and in-process")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=0)
    p.add_argument("--max-queue", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--inprocess-seconds", type=float, default=10)
    p.add_argument("--out", default=str(RESULTS / "serving.json"))
    p.add_argument("locust_args", nargs=argparse.REMAINDER, help="-- then extra Locust arguments")
    args = p.parse_args()
    extra = args.locust_args[1:] if args.locust_args[:1] == ["--"] else args.locust_args

    from serving.loadtest import parse_duration, run_loadtest, wait_ready

    RESULTS.mkdir(parents=True, exist_ok=True)
    models = [(args.student_name, args.student, False)]
    if not args.skip_baseline:
        if args.baseline:
            models.append((args.baseline_name or "baseline", args.baseline, False))
        else:
            from pipeline.baseline import build_baseline

            folder = build_baseline(RESULTS / "serve_load_baseline", task=args.task, hub_id=None, int8=False)["torch_fp32"]
            models.append((args.baseline_name or "bert-base-shape-fp32-pytorch", str(folder), True))

    out = Path(args.out)
    rows = {row_key(r): r for r in json.loads(out.read_text())} if out.is_file() else {}
    work = RESULTS / "serve_load_runs"
    for name, folder, shape_only in models:
        proc, host = start_server(folder, args)
        model_rows = []
        try:
            wait_ready(host, timeout=600)
            runs = [("closed", users, None) for users in args.users]
            for mode, users, rate in runs + [("fixed-rate", args.fixed_rate_users, f) for f in args.rates]:
                if mode == "fixed-rate":
                    peak = max(r["rps"] for r in model_rows if r["mode"] == "closed")
                    rate = round(rate * peak, 1)
                run_dir = work / (f"{name}-{mode}-u{users}" + ("" if rate is None else f"-r{rate}"))
                s = run_loadtest(host, users=users, spawn_rate=max(users, 1), duration=args.duration,
                                 out_dir=run_dir, mode=mode, rate=rate, task=args.task, glue_dir=args.glue_dir,
                                 locust_args=extra)
                row = {"model": name, "users": users, "mode": mode, "rps": round(s["requests_per_s"] or 0, 2),
                       "failures": s["failures"], "p50_ms": s["p50_ms"], "p90_ms": s["p90_ms"], "p99_ms": s["p99_ms"],
                       "inprocess_rps": None, "target_rps": rate, "requests": s["requests"],
                       "mean_batch_size": (s.get("server") or {}).get("mean_batch_size"),
                       "shape_only": shape_only, "artifact": folder, "server_threads": args.threads,
                       "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms,
                       "duration_s": parse_duration(args.duration), "cpus": os.cpu_count(), "note": s.get("note")}
                model_rows.append(row)
                rows[row_key(row)] = row
                out.write_text(json.dumps(list(rows.values()), indent=2) + "\n")
                print(json.dumps({k: row[k] for k in ("model", "mode", "users", "target_rps", "rps", "failures",
                                                      "p50_ms", "p99_ms", "mean_batch_size")}), flush=True)
        finally:
            stop_server(proc)

        # In-process throughput at the batch sizes the server formed, with the server gone (no contention).
        texts = load_texts(next(work.glob(f"{name}-*")) / "texts.tsv")
        cache = {}
        for row in model_rows:
            b = max(1, round(row["mean_batch_size"] or 1))
            if b not in cache:
                cache[b] = round(inprocess_rps(folder, texts, b, args.threads, args.max_tokens, args.inprocess_seconds), 2)
            row["inprocess_rps"] = cache[b]
            row["inprocess_batch_size"] = b
            if row["mode"] == "closed":  # a fixed-rate run's rps is its schedule's, not a capacity
                row["http_efficiency"] = round(row["rps"] / cache[b], 3) if cache[b] else None
        out.write_text(json.dumps(list(rows.values()), indent=2) + "\n")

    print(json.dumps(list(rows.values()), indent=2))


if __name__ == "__main__":
    main()
