"""Serving reliability figures for issue 14: fuzzing the HTTP API from its own OpenAPI schema, and a soak.

    python -m benchmarks.reliability_serving --model ARTIFACT --fuzz-cases 3000 --soak-seconds 600

Fuzz: schemathesis draws requests for every operation of /openapi.json, valid and invalid ones (its
positive and negative modes), sends some with a wrong Content-Type or stray headers, and posts raw bytes
to /predict; every answer must be below 500 and come within the timeout. A real server on loopback.

Soak: the server in its own process (`bertforge serve`), open-loop load at a fixed rate, 80% of the
capacity measured first with closed-loop clients, for --soak-seconds; p99 per minute, errors, and the
server's resident memory at the start and the end.

Writes the `fuzz` and `soak` keys of benchmarks/results/reliability.json and leaves every other key (the
`kills` key of benchmarks/kill_resume.py) as it is.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "reliability.json"
CONTENT_TYPES = [None, "application/json", "text/plain", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=x", "application/json; charset=latin-1", "application/xml", "*/*", ""]


def fuzz_api(url: str, cases: int = 300, seed: int = 0, timeout_s: float = 10.0, headers: dict | None = None) -> dict:
    """Send `cases` generated requests to the server at `url`; count answers >= 500 and requests that time out.

    Returns {"cases", "5xx", "hangs", "statuses": {code: count}, "failures": [first few, described]}."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings, strategies as st
    from hypothesis import seed as hypothesis_seed
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=headers or {}, timeout=timeout_s)
    operations = [op.ok() for op in schema.get_all_operations()]
    generated = st.one_of([op.as_strategy(generation_mode=mode) for op in operations
                           for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)])
    header_names = st.sampled_from(["X-Api-Key", "Authorization", "Accept", "Content-Encoding", "Transfer-Encoding",
                                    "Expect", "X-Forwarded-For", "Accept-Encoding"])
    header_values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
    stray = st.dictionaries(header_names, header_values, max_size=2)
    raw_body = st.one_of(st.binary(max_size=2000), st.text(max_size=500).map(lambda t: t.encode("utf-8", "surrogatepass")))
    request = st.one_of(
        st.tuples(st.just("case"), generated, st.sampled_from(CONTENT_TYPES), stray),
        st.tuples(st.just("raw"), raw_body, st.sampled_from(CONTENT_TYPES), stray),
    )
    tally = {"cases": 0, "5xx": 0, "hangs": 0, "connection_errors": 0, "statuses": {}, "failures": []}
    session = requests.Session()

    def record(status: int | str, what: str) -> None:
        tally["statuses"][str(status)] = tally["statuses"].get(str(status), 0) + 1
        if (isinstance(status, int) and status >= 500) or not isinstance(status, int):
            if len(tally["failures"]) < 5:
                tally["failures"].append(f"{status}: {what[:300]}")

    @hypothesis_seed(seed)
    @settings(max_examples=cases, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=False, report_multiple_bugs=False)
    @given(request)
    def send(req):
        kind, payload, content_type, extra = req
        extra = dict(extra)
        if content_type is not None:
            extra["Content-Type"] = content_type
        extra.pop("Transfer-Encoding", None) if kind == "raw" else None  # requests sets its own framing
        tally["cases"] += 1
        try:
            if kind == "raw":
                what = f"POST /predict {content_type!r} {payload[:80]!r}"
                r = session.post(f"{url}/predict", data=payload, headers=extra, timeout=timeout_s)
            else:
                what = f"{payload.method} {payload.formatted_path} {content_type!r} body={str(payload.body)[:120]!r}"
                r = payload.call(base_url=url, session=session, headers=extra, timeout=timeout_s)
            status = r.status_code
        except requests.Timeout:
            tally["hangs"] += 1
            status = "timeout"
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError):
            tally["connection_errors"] += 1
            status = "connection_error"
            session.close()
        except (ValueError, TypeError, UnicodeError, requests.exceptions.InvalidHeader) as e:
            # The client library refused to send what was drawn (e.g. a header it cannot encode): not a case.
            tally["cases"] -= 1
            tally.setdefault("unsendable", 0)
            tally["unsendable"] += 1
            return
        if isinstance(status, int) and status >= 500:
            tally["5xx"] += 1
        record(status, what)

    send()
    session.close()
    return tally


# ---- soak ------------------------------------------------------------------------------------------

def _start_server(model: str, port: int, threads: int | None, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipeline.cli", "serve", "--model", model, "--port", str(port), "--log-level", "warning"]
    if threads:
        cmd += ["--threads", str(threads)]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ})


def _wait_ready(url: str, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server on {url} not ready after {timeout:.0f}s")


def _rss_mb(pid: int) -> float:
    import psutil

    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


# The load generator runs in a subprocess of its own (no torch in it, and its CPU time apart from the
# server's): a fixed schedule of send times, `concurrency` worker threads taking the next due slot, so a
# slow answer delays no later request (open loop). It prints one JSON line per minute and a summary.
_LOADGEN = r'''
import json, sys, threading, time, random
import httpx

url, rate, seconds, concurrency, texts_file = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
texts = [t for t in open(texts_file, encoding="utf-8").read().splitlines() if t.strip()]
start = time.perf_counter() + 0.5
total = int(rate * seconds)
lock = threading.Lock()
state = {"next": 0}
minutes = {}  # minute -> [latencies_ms], errors, late

def worker(seed):
    rng = random.Random(seed)
    with httpx.Client(timeout=30) as client:
        while True:
            with lock:
                i = state["next"]
                state["next"] += 1
            if i >= total:
                return
            due = start + i / rate
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            minute = int((due - start) // 60)
            t0 = time.perf_counter()
            ok = False
            try:
                r = client.post(url + "/predict", json={"inputs": rng.choice(texts)})
                ok = r.status_code == 200
                status = r.status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            # latency counted from the scheduled time: queueing in the generator is the server's delay too
            ms = (time.perf_counter() - due) * 1000
            with lock:
                m = minutes.setdefault(minute, {"lat": [], "errors": 0, "statuses": {}})
                m["lat"].append(ms)
                m["statuses"][str(status)] = m["statuses"].get(str(status), 0) + 1
                if not ok:
                    m["errors"] += 1

threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
for t in threads:
    t.start()
for t in threads:
    t.join()
out = []
for minute in sorted(minutes):
    lat = sorted(minutes[minute]["lat"])
    out.append({"minute": minute, "requests": len(lat), "errors": minutes[minute]["errors"],
                "statuses": minutes[minute]["statuses"],
                "p50_ms": round(lat[len(lat) // 2], 1), "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1)})
print(json.dumps({"minutes": out, "elapsed_s": round(time.perf_counter() - start, 1)}))
'''

# Closed loop: `users` clients back to back for `seconds`; the answers per second is the capacity.
_CAPACITY = r'''
import json, sys, threading, time, random
import httpx
url, seconds, users, texts_file = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
texts = [t for t in open(texts_file, encoding="utf-8").read().splitlines() if t.strip()]
count = [0]
lock = threading.Lock()
end = time.perf_counter() + seconds
def user(k):
    rng = random.Random(k)
    with httpx.Client(timeout=30) as c:
        while time.perf_counter() < end:
            if c.post(url + "/predict", json={"inputs": rng.choice(texts)}).status_code == 200:
                with lock:
                    count[0] += 1
ts = [threading.Thread(target=user, args=(k,)) for k in range(users)]
start = time.perf_counter()
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps({"rps": count[0] / (time.perf_counter() - start)}))
'''


def _texts_file(out_dir: Path) -> tuple[Path, str]:
    """SST-2 dev sentences (bundled sample) as the soak's inputs, and their checksum."""
    import pipeline

    sample = Path(pipeline.__file__).parent / "data" / "sample" / "SST-2" / "dev.tsv"
    lines = sample.read_text(encoding="utf-8").splitlines()[1:]
    texts = [line.split("\t")[0] for line in lines if line.strip()]
    path = out_dir / "soak_texts.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def soak(model: str, seconds: float, load: float, threads: int | None, port: int, out_dir: Path,
         capacity_seconds: float = 30.0, users: int = 8) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    texts, texts_sha = _texts_file(out_dir)
    url = f"http://127.0.0.1:{port}"
    server = _start_server(model, port, threads, out_dir / "soak_server.log")
    try:
        _wait_ready(url)
        cap = json.loads(subprocess.run([sys.executable, "-c", _CAPACITY, url, str(capacity_seconds), str(users), str(texts)],
                                        capture_output=True, text=True, check=True).stdout)["rps"]
        rate = round(cap * load, 1)
        rss_start = _rss_mb(server.pid)
        print(f"capacity {cap:.1f}/s, soak at {rate}/s for {seconds:.0f}s, rss {rss_start} MB", flush=True)
        gen = subprocess.run([sys.executable, "-c", _LOADGEN, url, str(rate), str(seconds), str(users * 4), str(texts)],
                             capture_output=True, text=True, check=True)
        rss_end = _rss_mb(server.pid)
        minutes = json.loads(gen.stdout)["minutes"]
        alive = server.poll() is None
    finally:
        server.terminate()
        server.wait(60)
    return {
        "seconds": seconds, "target_rps": rate, "capacity_rps": round(cap, 1), "load_fraction": load,
        "requests": sum(m["requests"] for m in minutes), "errors": sum(m["errors"] for m in minutes),
        "p99_ms_per_minute": [m["p99_ms"] for m in minutes], "p50_ms_per_minute": [m["p50_ms"] for m in minutes],
        "requests_per_minute": [m["requests"] for m in minutes], "statuses_per_minute": [m["statuses"] for m in minutes],
        "rss_start_mb": rss_start, "rss_end_mb": rss_end, "rss_growth": round(rss_end / rss_start - 1, 4),
        "server_alive_at_end": alive, "server_threads": threads, "inputs_sha256": texts_sha,
    }


def _write(key: str, value: dict) -> None:
    """Read-modify-write one key of reliability.json (other benchmarks own the other keys)."""
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    data[key] = value
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(RESULTS)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _artifact_sha(model: str) -> str | None:
    onnx = sorted(Path(model).glob("*.onnx"))
    return hashlib.sha256(onnx[0].read_bytes()).hexdigest() if onnx else None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="artifact folder to serve (the int8 SST-2 student)")
    p.add_argument("--fuzz-cases", type=int, default=3000, help="0: no fuzzing")
    p.add_argument("--soak-seconds", type=float, default=0, help="0: no soak")
    p.add_argument("--load", type=float, default=0.8, help="soak rate as a fraction of the measured capacity")
    p.add_argument("--threads", type=int, default=1, help="server intra-op threads")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="machine shared with other jobs (2 vCPU): absolute latencies are noisy")
    p.add_argument("--out-dir", default="runs/reliability", help="logs and inputs of the soak")
    args = p.parse_args(argv)
    common = {"command": "python -m benchmarks.reliability_serving " + " ".join(argv if argv is not None else sys.argv[1:]),
              "git_commit": _git_commit(),
              "model": Path(args.model).name if Path(args.model).is_absolute() else args.model, "model_sha256": _artifact_sha(args.model),
              "seed": args.seed, "cpus": os.cpu_count(), "note": args.note}
    if args.fuzz_cases:
        from serving.config import ServeConfig
        from serving.server import serve_in_thread

        config = ServeConfig(port=0, num_threads=args.threads, log_level="error")
        start = time.perf_counter()
        with serve_in_thread(args.model, config) as url:
            tally = fuzz_api(url, args.fuzz_cases, args.seed)
        tally["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps({k: tally[k] for k in ("cases", "5xx", "hangs", "statuses")}), flush=True)
        _write("fuzz", {**tally, **common})
    if args.soak_seconds:
        result = soak(args.model, args.soak_seconds, args.load, args.threads, args.port, Path(args.out_dir))
        print(json.dumps(result), flush=True)
        _write("soak", {**result, **common})


if __name__ == "__main__":
    main()
