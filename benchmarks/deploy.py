"""Deployment figures (issue 16): the slim serving install against the full one, the protocols' cost, Ray Serve.

    python benchmarks/deploy.py --serve-venv /tmp/venv-serve --seconds 10

- `serve_env_bytes` / `full_env_bytes`: installed size of every distribution `bertforge[serve]`, resp.
  `bertforge[all]`, pulls in (transitively, from each venv's own metadata), test tools excluded.
- `cold_start`: process start to /readyz answering 200, and resident memory 2 s later, for `bertforge serve`
  on the same ONNX artifact: slim venv, full venv, and the full venv running the code before this change
  (`--base-commit`, which imported torch to serve ONNX). Repeated, interleaved, median.
- `protocols`: requests/s of one text per request through the native route, TEI's `/` and the v2 infer
  route, 16 closed-loop users (an httpx client in its own process), rounds interleaved on one server.
- `ray_serve`: the same load on `bertforge serve --engine ray` with 1 replica x 2 threads and 2 replicas x
  1 thread (equal total threads).
The model is TinyBERT-4-shaped (4 layers, hidden 312, 12 heads, FFN 1200) with random weights, exported to
ONNX fp32: its speed is real, its answers are not. The texts are SST-2 dev sentences. This machine (2 cores)
is shared with other jobs and the load client runs on it too: quote ratios within one run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAY_NOTE = ("On a machine oversubscribed by other jobs, more processes (Ray's proxy, one worker per replica) also "
            "win a larger share of the CPU scheduler: the gain over one uvicorn process overstates what a dedicated "
            "machine shows.")
RESULTS = ROOT / "benchmarks" / "results"
GLUE_DIR = ROOT.parent / "shared" / "glue_data"

# Runs in each venv: the installed size of the distributions a requirement list pulls in.
ENV_SIZE = r"""
import json, re, sys
from importlib import metadata
from packaging.markers import default_environment
from packaging.requirements import Requirement

def canon(name): return re.sub(r"[-_.]+", "-", name).lower()
seen, missing = {}, set()
todo = [(Requirement(r), ()) for r in json.loads(sys.argv[1])]
while todo:
    req, parent_extras = todo.pop()
    envs = [{**default_environment(), "extra": e} for e in (parent_extras or ("",))]
    if req.marker and not any(req.marker.evaluate(env) for env in envs):
        continue
    name = canon(req.name)
    key = (name, tuple(sorted(req.extras)))
    if key in seen:
        continue
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        missing.add(name)
        continue
    seen[key] = dist
    todo += [(Requirement(r), tuple(req.extras) + ("",)) for r in dist.requires or []]
dists = {canon(d.metadata["Name"]): d for d in seen.values()}
size = 0
for d in dists.values():
    for f in d.files or []:
        p = d.locate_file(f)
        if p.is_file():
            size += p.stat().st_size
print(json.dumps({"bytes": size, "distributions": len(dists), "missing": sorted(missing)}))
"""

CLIENT = r"""
import asyncio, json, sys, time
import httpx
url, kind, texts_file, users, seconds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
texts = [t for t in open(texts_file, encoding="utf-8").read().split("\n") if t]
name = sys.argv[6] if len(sys.argv) > 6 else "model"
def body(t):
    if kind == "v2":
        return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [t]}]}
    return {"inputs": t}
path = {"native": "/v1/predict", "tei": "/", "v2": f"/v2/models/{name}/infer"}[kind]
ok = errors = 0
lat = []
async def user(i, client, stop):
    global ok, errors
    n = i
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        try:
            r = await client.post(path, json=body(texts[n % len(texts)]))
            ok += r.status_code == 200
            errors += r.status_code != 200
        except httpx.HTTPError:
            errors += 1
        lat.append(time.perf_counter() - t0)
        n += users
async def main():
    limits = httpx.Limits(max_connections=users, max_keepalive_connections=users)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        start = time.perf_counter()
        await asyncio.gather(*[user(i, client, start + seconds) for i in range(users)])
        took = time.perf_counter() - start
    lat.sort()
    q = lambda p: round(1000 * lat[min(len(lat) - 1, int(p * len(lat)))], 1) if lat else None
    print(json.dumps({"rps": round(ok / took, 1), "requests": ok, "errors": errors, "p50_ms": q(0.5), "p99_ms": q(0.99)}))
asyncio.run(main())
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requirements(extra: str) -> list[str]:
    """bertforge's requirement strings for an extra, its self-references (bertforge[torch]) expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out, todo = list(project["dependencies"]), [extra]
    while todo:
        for r in project["optional-dependencies"][todo.pop()]:
            m = re.fullmatch(r"bertforge\[(.+)\]", r)
            if m:
                todo += m.group(1).split(",")
            else:
                out.append(r)
    return sorted(set(out))


def env_size(python: str, extra: str) -> dict:
    done = subprocess.run([python, "-c", ENV_SIZE, json.dumps(requirements(extra))], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)


def build_model(out: Path) -> Path:
    """TinyBERT-4's shape, random weights, the uncased BERT tokenizer, exported to ONNX (full venv only)."""
    import warnings

    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from pipeline.data import get_task
    from pipeline.models import label_config, packaged_minilm_dir

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(packaged_minilm_dir())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=312, num_hidden_layers=4, num_attention_heads=12,
                        intermediate_size=1200, **label_config(get_task("sst2")))
    model = BertForSequenceClassification(config).eval()
    model.config.return_dict = False
    out.mkdir(parents=True, exist_ok=True)
    ids = torch.ones(2, 8, dtype=torch.long)
    axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(out / "model.onnx"),
                          input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["logits"],
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes,
                                        "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    model.config.return_dict = True
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> float:
    start = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2):
                return time.monotonic() - start
        except (urllib.error.URLError, OSError):
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"{url} not ready after {timeout:.0f}s") from None
            time.sleep(0.02)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def start_serve(python: str, code: Path, model: Path, extra_args: list[str], timeout: float = 120):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.monotonic()
    proc = subprocess.Popen([python, "-m", "pipeline.cli", "serve", "--model", str(model), "--port", str(port),
                             "--log-level", "warning", *extra_args], cwd=code, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc, timeout)
    return proc, url, time.monotonic() - t0


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def load(url: str, kind: str, texts: Path, users: int, seconds: float, name: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CLIENT, url, kind, str(texts), str(users), str(seconds), name],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--serve-venv", required=True, help="a venv with `pip install -e .[serve]` (no torch)")
    ap.add_argument("--full-python", default=sys.executable, help="python of the full venv (bertforge[all])")
    ap.add_argument("--base-commit", default="5b24e2a", help="the code before issue 16, for today's cold start")
    ap.add_argument("--model", type=Path, default=None, help="ONNX artifact (default: a TinyBERT-4-shaped one)")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds per load measurement")
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per load measurement")
    ap.add_argument("--repeats", type=int, default=3, help="cold starts per variant")
    ap.add_argument("--parts", nargs="+", default=["size", "cold", "protocols", "ray"],
                    choices=["size", "cold", "protocols", "ray"],
                    help="what to measure; parts not measured keep their rows from an existing deploy.json")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bertforge-deploy-"))
    model = args.model or build_model(tmp / "model")
    texts = tmp / "texts.txt"
    dev = GLUE_DIR / "SST-2" / "dev.tsv"
    texts.write_text("\n".join(line.split("\t")[0] for line in dev.read_text(encoding="utf-8").splitlines()[1:]) + "\n")
    serve_python = str(Path(args.serve_venv) / "bin" / "python")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    base = tmp / "base"
    base.mkdir()
    subprocess.run(f"git archive {args.base_commit} | tar -x -C {base}", shell=True, cwd=ROOT, check=True)

    out = RESULTS / "deploy.json"
    result = json.loads(out.read_text()) if out.is_file() else {}
    result.update({
        "command": "python benchmarks/deploy.py " + " ".join(a if not a.startswith("/") else Path(a).name for a in (argv or sys.argv[1:])),
        "git_commit": commit, "seed": 0, "cpus": os.cpu_count(),
        "model": "TinyBERT-4-shaped random weights, ONNX fp32", "model_sha256": sha256(model / "model.onnx"),
        "texts": "SST-2 dev sentences", "texts_sha256": sha256(dev),
        "note": "2-core machine shared with other jobs; the load client runs on the same cores. Compare ratios within one "
                "part (rows of one part are measured side by side in one run).",
    })
    result.setdefault("parts_commits", {})
    for part in args.parts:
        result["parts_commits"][part] = commit
    if "size" in args.parts:
        measure_size(result, serve_python, args)
    if "cold" in args.parts:
        measure_cold(result, serve_python, args, model, base, commit)
    if "protocols" in args.parts:
        measure_protocols(result, args, model, texts)
    if "ray" in args.parts:
        measure_ray(result, args, model, texts)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def measure_size(result, serve_python, args):
    serve_size, full_size = env_size(serve_python, "serve"), env_size(args.full_python, "all")
    result.update(serve_env_bytes=serve_size["bytes"], full_env_bytes=full_size["bytes"],
                  env_ratio=round(full_size["bytes"] / serve_size["bytes"], 2),
                  env_distributions={"serve": serve_size["distributions"], "full": full_size["distributions"]})
    print(json.dumps({k: result[k] for k in ("serve_env_bytes", "full_env_bytes", "env_ratio")}), flush=True)


def measure_cold(result, serve_python, args, model, base, commit):
    # cold start and idle memory: the same ONNX artifact, 1 thread
    variants = {"slim": (serve_python, ROOT), "full": (args.full_python, ROOT), "full_before": (args.full_python, base)}
    starts = {k: [] for k in variants}
    rss = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, (python, code) in variants.items():
            proc, _, took = start_serve(python, code, model, ["--threads", "1"])
            time.sleep(2)
            rss[name].append(rss_bytes(proc.pid))
            stop(proc)
            starts[name].append(took)
    result["cold_start"] = {k: {"ready_s": round(statistics.median(starts[k]), 2), "runs_s": [round(s, 2) for s in starts[k]],
                                "idle_rss_bytes": int(statistics.median(rss[k])),
                                "python": "serve venv" if k == "slim" else "full venv",
                                "code": args.base_commit if k == "full_before" else commit} for k in variants}
    print(json.dumps(result["cold_start"]), flush=True)


def measure_protocols(result, args, model, texts):
    # protocols on one uvicorn server, 2 threads, rounds interleaved
    proc, url, _ = start_serve(args.full_python, ROOT, model, ["--threads", "2"])
    try:
        load(url, "native", texts, args.users, 3, model.name)  # warm-up
        runs = {k: [] for k in ("native", "tei", "v2")}
        for _ in range(args.rounds):
            for kind in runs:
                runs[kind].append(load(url, kind, texts, args.users, args.seconds, model.name))
    finally:
        stop(proc)
    result["protocols"] = [{"route": k, "users": args.users, "server_threads": 2,
                            "rps": round(statistics.mean(r["rps"] for r in v), 1),
                            "errors": sum(r["errors"] for r in v), "p50_ms": v[-1]["p50_ms"], "p99_ms": v[-1]["p99_ms"],
                            "runs_rps": [r["rps"] for r in v]} for k, v in runs.items()]
    native_rps = result["protocols"][0]["rps"]
    for row in result["protocols"]:
        row["vs_native"] = round(row["rps"] / native_rps, 3)
    print(json.dumps(result["protocols"]), flush=True)


def measure_ray(result, args, model, texts):
    """Each Ray layout against a plain uvicorn server with the same 2 threads, up at the same time and
    loaded in alternating rounds: the ratio holds up while the shared machine's load drifts."""
    result["ray_serve"] = []
    result["ray_serve_note"] = RAY_NOTE
    plain, plain_url, _ = start_serve(args.full_python, ROOT, model, ["--threads", "2"])
    try:
        for replicas, threads in ((1, 2), (2, 1)):
            proc, url, took = start_serve(args.full_python, ROOT, model,
                                          ["--engine", "ray", "--replicas", str(replicas), "--threads", str(threads)],
                                          timeout=400)
            try:
                load(url, "native", texts, args.users, 3, model.name)
                load(plain_url, "native", texts, args.users, 3, model.name)
                ray_runs, plain_runs = [], []
                for _ in range(args.rounds):
                    plain_runs.append(load(plain_url, "native", texts, args.users, args.seconds, model.name))
                    ray_runs.append(load(url, "native", texts, args.users, args.seconds, model.name))
            finally:
                stop(proc)
            rps = statistics.mean(r["rps"] for r in ray_runs)
            plain_rps = statistics.mean(r["rps"] for r in plain_runs)
            result["ray_serve"].append({
                "replicas": replicas, "threads_per_replica": threads, "users": args.users, "route": "native",
                "rps": round(rps, 1), "errors": sum(r["errors"] for r in ray_runs), "p99_ms": ray_runs[-1]["p99_ms"],
                "runs_rps": [r["rps"] for r in ray_runs], "ready_s": round(took, 1),
                "uvicorn_2_threads_rps": round(plain_rps, 1), "uvicorn_runs_rps": [r["rps"] for r in plain_runs],
                "vs_uvicorn_2_threads": round(rps / plain_rps, 3)})
            print(json.dumps(result["ray_serve"][-1]), flush=True)
    finally:
        stop(plain)


if __name__ == "__main__":
    main()
