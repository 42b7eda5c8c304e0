"""`bertforge loadtest`: run serving/locustfile.py headless in a subprocess, summarise its CSV stats.

Locust runs in its own process because its gevent monkey-patching breaks a process that has imported
torch. The summary adds what the server itself reports over the run (model calls, mean batch size)
when its /metrics can be read.
"""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline.errors import BertforgeError

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
MODES = {"closed": "ClosedLoopUser", "fixed-rate": "FixedRateUser"}


def parse_duration(value: str | float) -> float:
    """Seconds from 90, "90", "90s", "2m", "1h30m" (Locust's own --run-time syntax)."""
    text = str(value).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    if not text or not m:
        raise BertforgeError(f"duration {value!r}: use seconds or Locust's form, e.g. 30s, 2m, 1h30m")
    h, mi, s = (int(g or 0) for g in m.groups())
    return float(h * 3600 + mi * 60 + s)


def write_texts(out_dir: Path, task: str, glue_dir=None, data_file=None, split: str | None = None,
                limit: int = 5000) -> Path:
    """The task's texts as `text_a<TAB>text_b`, the layout the locustfile reads (CoLA's headerless file
    and MNLI's column order need the GLUE reader, which imports torch: so it happens here)."""
    from pipeline.data import default_data_dir, dev_split, get_task, load_examples_file, load_glue, sample_data_dir

    spec = get_task(task)
    split = split or dev_split(spec)
    if data_file:
        examples = load_examples_file(spec.name, data_file, split)
    else:
        data_dir = glue_dir or default_data_dir()
        if data_dir is None and spec.name == "sst2":
            data_dir = sample_data_dir()
        if data_dir is None:
            raise BertforgeError(f"no GLUE data for {spec.name}: give --glue-dir or --data-file")
        examples = load_glue(spec.name, split, data_dir)
    path = out_dir / "texts.tsv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("text_a\ttext_b\n")
        for ex in examples[:limit]:
            a, b = (" ".join(t.split()) if t else "" for t in (ex.text_a, ex.text_b))
            if a:
                f.write(f"{a}\t{b}\n")
    return path


def wait_ready(host: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{host}/readyz", timeout=5) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            last = str(getattr(e, "reason", e))
        time.sleep(0.5)
    raise BertforgeError(f"{host} is not ready after {timeout:.0f}s ({last}); is `bertforge serve` running?")


def server_counters(host: str, api_key: str | None = None) -> dict | None:
    """Model calls and inputs batched so far, from the server's /metrics (None if unreadable)."""
    from prometheus_client.parser import text_string_to_metric_families

    request = urllib.request.Request(f"{host}/metrics", headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            values[s.name] = s.value
    if "bertforge_model_calls_total" not in values:
        return None
    return {"model_calls": values["bertforge_model_calls_total"], "inputs": values.get("bertforge_batch_size_sum", 0.0)}


def read_locust_stats(csv_prefix: Path) -> dict:
    """The "Aggregated" row of Locust's <prefix>_stats.csv, as numbers (None where Locust wrote N/A)."""
    path = Path(f"{csv_prefix}_stats.csv")
    if not path.is_file():
        raise BertforgeError(f"Locust wrote no {path.name}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    total = next((r for r in rows if r.get("Name") == "Aggregated"), None)
    if total is None:
        raise BertforgeError(f"{path} has no Aggregated row")

    def num(key):
        try:
            return float(total[key])
        except (KeyError, TypeError, ValueError):
            return None

    return {"requests": int(num("Request Count") or 0), "failures": int(num("Failure Count") or 0),
            "requests_per_s": num("Requests/s"), "failures_per_s": num("Failures/s"),
            "avg_ms": num("Average Response Time"), "p50_ms": num("50%"), "p90_ms": num("90%"),
            "p95_ms": num("95%"), "p99_ms": num("99%"), "max_ms": num("Max Response Time")}


def read_locust_failures(csv_prefix: Path, limit: int = 5) -> list[dict]:
    path = Path(f"{csv_prefix}_failures.csv")
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: -int(r.get("Occurrences") or 0))
    return [{"error": r.get("Error", ""), "count": int(r.get("Occurrences") or 0)} for r in rows[:limit]]


def run_loadtest(host: str, users: int = 10, spawn_rate: float = 10, duration: str | float = "60s",
                 out_dir: str | os.PathLike = "loadtest", mode: str = "closed", rate: float | None = None,
                 task: str = "sst2", glue_dir=None, data_file=None, split: str | None = None, batch: int = 1,
                 api_key: str | None = None, locust_args: list[str] | tuple = (), ready_timeout: float = 60.0,
                 reset_stats: bool = True, quiet: bool = True) -> dict:
    """Run Locust against a running server; write `out_dir/locust_*.csv` and `out_dir/summary.json`.

    mode "closed": `users` users, each sending its next request on the previous answer.
    mode "fixed-rate": `rate` requests/s in total, split across `users` open-loop users.
    `locust_args` go to Locust as they are (e.g. `--master --expect-workers 4` for a distributed run).
    """
    if mode not in MODES:
        raise BertforgeError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "fixed-rate" and not (rate and rate > 0):
        raise BertforgeError("fixed-rate mode needs --rate (requests per second, in total)")
    if users <= 0 or spawn_rate <= 0 or batch <= 0:
        raise BertforgeError("users, spawn rate and batch must be positive")
    if not re.match(r"https?://", host):
        raise BertforgeError(f"host must be a URL like http://127.0.0.1:8000, got {host!r}")
    host = host.rstrip("/")
    seconds = parse_duration(duration)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = write_texts(out, task, glue_dir, data_file, split)
    distributed = "--master" in locust_args
    if not distributed:
        wait_ready(host, ready_timeout)
    before = server_counters(host, api_key)

    prefix = out / "locust"
    for old in out.glob("locust_*.csv"):
        old.unlink()
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
               "--users", str(users), "--spawn-rate", str(spawn_rate), "--run-time", f"{int(seconds)}s",
               "--stop-timeout", "10", "--csv", str(prefix), "--html", str(out / "locust_report.html"),
               "--loglevel", "WARNING" if quiet else "INFO", "--only-summary"]
    if reset_stats:
        command.append("--reset-stats")  # measure after ramp-up, not during it
    command += [*locust_args, MODES[mode]]
    env = {**os.environ, "BERTFORGE_LOADTEST_TEXTS": str(texts), "BERTFORGE_LOADTEST_BATCH": str(batch)}
    if mode == "fixed-rate":
        env["BERTFORGE_LOADTEST_RATE"] = str(rate / users)
    if api_key:
        env["BERTFORGE_API_KEY"] = api_key
    start = time.monotonic()
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 120)
    except subprocess.TimeoutExpired:
        raise BertforgeError(f"Locust did not finish within {seconds + 120:.0f}s") from None
    (out / "locust.log").write_text(proc.stdout + proc.stderr)
    if not Path(f"{prefix}_stats.csv").is_file():
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise BertforgeError(f"Locust failed (exit {proc.returncode}): {tail[:400]}")

    stats = read_locust_stats(prefix)
    summary = {"host": host, "mode": mode, "users": users, "spawn_rate": spawn_rate, "duration_s": seconds,
               "target_rps": rate if mode == "fixed-rate" else None, "inputs_per_request": batch, "task": task,
               **stats, "failure_ratio": stats["failures"] / stats["requests"] if stats["requests"] else None,
               "errors": read_locust_failures(prefix), "wall_s": round(time.monotonic() - start, 1),
               "locust_exit_code": proc.returncode, "command": command, "csv_prefix": str(prefix)}
    after = server_counters(host, api_key)
    if before and after and after["model_calls"] > before["model_calls"]:
        calls = after["model_calls"] - before["model_calls"]
        summary["server"] = {"model_calls": int(calls), "mean_batch_size": round((after["inputs"] - before["inputs"]) / calls, 2)}
    if mode == "fixed-rate" and stats["requests_per_s"] is not None and stats["requests_per_s"] < 0.95 * rate:
        summary["note"] = f"achieved {stats['requests_per_s']:.1f} of {rate:g} requests/s: the server (or the client) is saturated"
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
