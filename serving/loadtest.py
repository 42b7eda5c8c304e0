"""`bertforge loadtest`: run serving/locustfile.py headless in a subprocess against any inference endpoint
(bertforge's own /predict, TEI, the Open Inference Protocol v2, or a JSON request template), check what it
answers, and find its capacity.

Locust runs in its own process because its gevent monkey-patching breaks a process that has imported
torch. Everything that needs the task's data or a model (gold labels, offline predictions) happens here.

- `run_loadtest`: one run, closed loop or at a fixed rate; failures are split by kind (HTTP error,
  connection, malformed answer, not sent), and with a `LabelCheck` the labels served are compared with the
  gold labels and, for a bertforge artifact, with its offline predictions, text by text.
- `run_sweep`: a closed-loop estimate of capacity, then open-loop steps at fractions of it; the knee is the
  highest offered rate whose p99 stays within the SLO with no failures and the rate achieved.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.errors import BertforgeError
from serving.loadtest_protocols import parse_field

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
MODES = {"closed": "ClosedLoopUser", "fixed-rate": "FixedRateUser"}
PROTOCOLS = ("bertforge", "tei", "oip", "template")
READY_PATHS = {"bertforge": "/readyz", "tei": "/health", "oip": "/v2/health/ready"}
FAILURE_KINDS = {"http": r"HTTP \d+", "connection": r"connection", "malformed": r"malformed answer",
                 "not_sent": r"not sent"}
DEFAULT_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


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


# -- the endpoint ---------------------------------------------------------------------------------------------

@dataclass
class Endpoint:
    """How to talk to the server: what the locustfile reads from BERTFORGE_LOADTEST_ENDPOINT."""
    protocol: str = "bertforge"
    path: str | None = None  # default: /predict (bertforge, tei), /v2/models/{model}/infer (oip)
    headers: dict = field(default_factory=dict)
    template: object = None  # template protocol: the JSON body with {{text}}/{{text_pair}}/{{texts}}
    label_field: str | None = None  # template protocol: where the labels are, e.g. $[0].label
    model_name: str | None = None  # oip
    input_names: list | None = None  # oip: [text] or [text, text_pair]; default: read from the model's metadata
    output_name: str | None = None  # oip: default the first BYTES output, else the first output
    labels: list | None = None  # class names by id, for answers that give class ids or scores
    ready_path: str | None = None  # GET until 200 before loading; default per protocol, none for template


def parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise BertforgeError(f"header {text!r}: use NAME:VALUE")
    return name.strip(), value.strip()


def make_endpoint(protocol: str = "bertforge", path=None, headers=(), request_template=None, label_field=None,
                  model_name=None, input_names=None, output_name=None, labels=None, ready_path=None) -> Endpoint:
    """An Endpoint from CLI-style arguments (headers as "K:V", the template as a file), checked."""
    if protocol not in PROTOCOLS:
        raise BertforgeError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    template = None
    if protocol == "template":
        if not (request_template and path and label_field):
            raise BertforgeError("--protocol template needs --request-template FILE, --path and --label-field")
        try:
            template = json.loads(Path(request_template).read_text())
        except OSError as e:
            raise BertforgeError(f"request template {request_template}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise BertforgeError(f"request template {request_template} is not JSON: {e}") from None
        text = json.dumps(template)
        if not any(p in text for p in ("{{text}}", "{{texts}}")):
            raise BertforgeError(f"request template {request_template} has no {{{{text}}}} or {{{{texts}}}} placeholder")
        try:
            parse_field(label_field)
        except ValueError as e:
            raise BertforgeError(str(e)) from None
    if protocol == "oip" and not model_name:
        raise BertforgeError("--protocol oip needs --model-name (the model's name in /v2/models/{name})")
    if path and not path.startswith("/"):
        raise BertforgeError(f"--path must start with /, got {path!r}")
    return Endpoint(protocol, path, dict(parse_header(h) for h in headers), template, label_field, model_name,
                    list(input_names) if input_names else None, output_name, list(labels) if labels else None,
                    ready_path)


def _get_json(url: str, headers: dict, timeout: float = 10):
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.loads(r.read().decode())


def resolve_endpoint(host: str, endpoint: Endpoint) -> Endpoint:
    """Fill what the server can tell: an OIP model's input names (and class names, if its metadata has them)."""
    e = Endpoint(**asdict(endpoint))
    if e.protocol == "oip":
        e.path = e.path or f"/v2/models/{e.model_name}/infer"
        if not e.input_names:
            url = f"{host}/v2/models/{e.model_name}"
            try:
                meta = _get_json(url, e.headers)
            except (urllib.error.URLError, OSError, ValueError) as err:
                raise BertforgeError(f"cannot read the model's metadata at {url} ({err}); give --input-name") from None
            inputs = [i.get("name") for i in meta.get("inputs", []) if i.get("datatype") == "BYTES"]
            if not inputs:
                raise BertforgeError(f"{url} lists no BYTES input; give --input-name")
            e.input_names = inputs[:2]
            params = meta.get("parameters") or {}
            if not e.labels and isinstance(params.get("labels"), list):
                e.labels = params["labels"]
    return e


def wait_ready(host: str, timeout: float = 60.0, path: str = "/readyz", headers: dict | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{host}{path}", headers=headers or {}), timeout=5) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            if e.code == 404:  # the server answers but has no such route (e.g. TEI's /health): nothing to wait for
                return
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            last = str(getattr(e, "reason", e))
        time.sleep(0.5)
    raise BertforgeError(f"{host}{path} is not ready after {timeout:.0f}s ({last}); is the server running?")


def server_counters(host: str, api_key: str | None = None) -> dict | None:
    """Model calls and inputs batched so far, from a bertforge server's /metrics (None if unreadable)."""
    from prometheus_client.parser import text_string_to_metric_families

    request = urllib.request.Request(f"{host}/metrics", headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            text = r.read().decode()
        families = list(text_string_to_metric_families(text))
    except (urllib.error.URLError, OSError, ValueError):
        return None
    values = {s.name: s.value for family in families for s in family.samples}
    if "bertforge_model_calls_total" not in values:
        return None
    return {"model_calls": values["bertforge_model_calls_total"], "inputs": values.get("bertforge_batch_size_sum", 0.0)}


# -- the texts and what they should be answered with ------------------------------------------------------------

def load_examples(task: str, glue_dir=None, data_file=None, split: str | None = None, limit: int = 5000) -> list:
    """The task's examples that make the load (default: its dev split; SST-2 falls back to the bundled sample)."""
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
    pair = examples and examples[0].text_b is not None
    kept = []
    for ex in examples:
        a, b = (" ".join(t.split()) if t else "" for t in (ex.text_a, ex.text_b))
        if a and (b or not pair):  # the same rows the locustfile keeps, so indices agree
            kept.append((a, b or None, ex.label))
        if len(kept) == limit:
            break
    if not kept:
        raise BertforgeError(f"no texts in {task} {split}")
    return kept


def write_texts(out_dir: Path, rows: list) -> Path:
    """`text_a<TAB>text_b<TAB>label`, the layout the locustfile reads (CoLA's headerless file and MNLI's
    column order need the GLUE reader, which imports torch: so it happens here)."""
    path = Path(out_dir) / "texts.tsv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("text_a\ttext_b\tlabel\n")
        for a, b, label in rows:
            f.write(f"{a}\t{b or ''}\t{'' if label is None else label}\n")
    return path


def label_index(label, names: list[str]) -> int | None:
    """A served label as a class id: a class name, LABEL_k, or the id itself (None when unreadable)."""
    text = str(label)
    if text in names:
        return names.index(text)
    m = re.fullmatch(r"(?:LABEL_)?(\d+)", text)
    if m and int(m.group(1)) < len(names):
        return int(m.group(1))
    return None


def offline_predictions(model_dir: str | os.PathLike, rows: list, max_tokens: int = 128,
                        threads: int | None = 1) -> list[int]:
    """The artifact's own answers, one text at a time (no padding, no batch companions): what the server
    must answer at any load."""
    from pipeline.inference import load_runtime
    from serving.predictor import Predictor

    predictor = Predictor(load_runtime(model_dir, "cpu", threads), max_tokens)
    if predictor.regression:
        raise BertforgeError("--check-labels needs a classification model")
    out = []
    for a, b, _ in rows:
        answer = predictor([(a, b) if b else a])[0]
        out.append(predictor.labels.index(answer["label"]))
    return out


@dataclass
class LabelCheck:
    """What every answer is compared with: gold class ids, and for a bertforge artifact its offline answers."""
    names: list  # class names by id (the served labels are read against these)
    gold: list  # gold class id per text
    offline: list | None = None  # the artifact's own class id per text
    offline_dev_score: float | None = None  # from the artifact's bertforge.json
    expected_accuracy: float | None = None  # fail when served accuracy is clearly below this
    model: str | None = None

    def check(self, answers: dict) -> dict:
        """Served accuracy (each text answered counts once, its answers averaged), agreement with the offline
        answers, texts answered differently by different requests, and a verdict."""
        total = unreadable = correct = agree = 0
        per_text, moved = [], 0
        for key, labels in answers.items():
            i = int(key)
            counts = Counter()
            for label, n in labels.items():
                counts[label_index(label, self.names)] += n
            unreadable += counts.pop(None, 0)
            n = sum(counts.values())
            if not n:
                continue
            total += n
            right = counts.get(self.gold[i], 0)
            correct += right
            per_text.append(right / n)
            moved += len(counts) > 1
            if self.offline is not None:
                agree += counts.get(self.offline[i], 0)
        covered = len(per_text)
        accuracy = sum(per_text) / covered if covered else None
        result = {"answers": total, "unreadable_labels": unreadable, "texts": len(self.gold), "texts_answered": covered,
                  "served_accuracy": round(accuracy, 4) if accuracy is not None else None,
                  "texts_answered_differently": moved, "offline_dev_score": self.offline_dev_score}
        problems = []
        if unreadable:
            problems.append(f"{unreadable} labels are not among {self.names}")
        if not covered:
            problems.append("no answers to check")
        if self.offline is not None and total:
            full_set = [i for i in range(len(self.gold))]
            result["offline_accuracy"] = round(sum(self.offline[i] == self.gold[i] for i in full_set) / len(full_set), 4)
            result["disagreements"] = total - agree
            result["disagreement_rate"] = round((total - agree) / total, 6)
            if total - agree:
                problems.append(f"{total - agree} of {total} answers differ from the artifact's offline predictions")
        if self.expected_accuracy is not None and accuracy is not None:
            # Sampling error of accuracy over `covered` of the texts (none once every text was answered).
            p, n, N = accuracy, covered, len(self.gold)
            se = math.sqrt(max(p * (1 - p), 1e-12) / n * (N - n) / max(N - 1, 1))
            result["expected_accuracy"] = self.expected_accuracy
            result["allowed_shortfall"] = round(3 * se, 4)
            if accuracy < self.expected_accuracy - 3 * se:
                problems.append(f"served accuracy {accuracy:.4f} is below the expected {self.expected_accuracy:.4f}")
        result["ok"] = not problems
        result["problems"] = problems
        return result


def make_label_check(rows: list, task: str, model: str | None = None, labels: list | None = None,
                     expected_accuracy: float | None = None, max_tokens: int = 128) -> LabelCheck:
    from pipeline.artifacts import read_manifest
    from pipeline.data import get_task

    spec = get_task(task)
    if len(spec.labels) < 2:
        raise BertforgeError(f"--check-labels needs a classification task, {task} is a regression")
    if any(r[2] is None for r in rows):
        raise BertforgeError(f"--check-labels needs gold labels; the {task} rows given have none (a test split?)")
    names = list(labels or spec.labels)
    offline = score = None
    if model:
        offline = offline_predictions(model, rows, max_tokens)
        manifest = read_manifest(model)
        score = manifest.score if manifest else None
    return LabelCheck(names, [int(r[2]) for r in rows], offline, score, expected_accuracy, str(model) if model else None)


def served_model_dir(host: str, headers: dict | None = None) -> str | None:
    """The artifact folder a bertforge server on this machine serves (its /info), if it exists here."""
    try:
        info = _get_json(f"{host}/info", headers or {})
    except (urllib.error.URLError, OSError, ValueError):
        return None
    model = info.get("model")
    return model if model and Path(model).is_dir() else None


# -- Locust's results ---------------------------------------------------------------------------------------------

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


def _failure_rows(csv_prefix: Path) -> list[dict]:
    path = Path(f"{csv_prefix}_failures.csv")
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{"error": r.get("Error", ""), "count": int(r.get("Occurrences") or 0)} for r in csv.DictReader(f)]


def read_locust_failures(csv_prefix: Path, limit: int = 5) -> list[dict]:
    return sorted(_failure_rows(csv_prefix), key=lambda r: -r["count"])[:limit]


def failure_kinds(csv_prefix: Path) -> dict:
    """Failures by kind, from the message each starts with in the locustfile."""
    kinds = dict.fromkeys([*FAILURE_KINDS, "other"], 0)
    for row in _failure_rows(csv_prefix):
        kind = next((k for k, pattern in FAILURE_KINDS.items() if re.search(rf"(^|['\"(]){pattern}", row["error"])), "other")
        kinds[kind] += row["count"]
    return kinds


# -- one run ---------------------------------------------------------------------------------------------------------

def run_loadtest(host: str, users: int = 10, spawn_rate: float = 10, duration: str | float = "60s",
                 out_dir: str | os.PathLike = "loadtest", mode: str = "closed", rate: float | None = None,
                 task: str = "sst2", glue_dir=None, data_file=None, split: str | None = None, batch: int = 1,
                 api_key: str | None = None, locust_args: list[str] | tuple = (), ready_timeout: float = 60.0,
                 reset_stats: bool = True, quiet: bool = True, endpoint: Endpoint | None = None,
                 label_check: LabelCheck | None = None, rows: list | None = None) -> dict:
    """Run Locust against a running server; write `out_dir/locust_*.csv` and `out_dir/summary.json`.

    mode "closed": `users` users, each sending its next request on the previous answer.
    mode "fixed-rate": `rate` requests/s in total, split across `users` open-loop users.
    `locust_args` go to Locust as they are (e.g. `--master --expect-workers 4` for a distributed run;
    answers are then checked on the workers only, not here).
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
    endpoint = endpoint or Endpoint()
    seconds = parse_duration(duration)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = rows or load_examples(task, glue_dir, data_file, split)
    texts = write_texts(out, rows)
    distributed = "--master" in locust_args
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    ready_path = endpoint.ready_path or READY_PATHS.get(endpoint.protocol)
    if not distributed and ready_path:
        wait_ready(host, ready_timeout, ready_path, {**endpoint.headers, **auth})
    endpoint = resolve_endpoint(host, endpoint)
    if endpoint.protocol == "oip" and rows[0][1] is not None and len(endpoint.input_names) < 2:
        raise BertforgeError(f"{task} has text pairs: the OIP model needs two BYTES inputs (give --input-name twice)")
    (out / "endpoint.json").write_text(json.dumps(asdict(endpoint), indent=2) + "\n")
    before = server_counters(host, api_key)

    prefix = out / "locust"
    answers_file = out / "answers.json"
    for old in [*out.glob("locust_*.csv"), answers_file]:
        old.unlink(missing_ok=True)
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", host,
               "--users", str(users), "--spawn-rate", str(spawn_rate), "--run-time", f"{int(seconds)}s",
               "--stop-timeout", "10", "--csv", str(prefix), "--html", str(out / "locust_report.html"),
               "--loglevel", "WARNING" if quiet else "INFO", "--only-summary"]
    if reset_stats:
        command.append("--reset-stats")  # measure after ramp-up, not during it
    command += [*locust_args, MODES[mode]]
    env = {**os.environ, "BERTFORGE_LOADTEST_TEXTS": str(texts), "BERTFORGE_LOADTEST_BATCH": str(batch),
           "BERTFORGE_LOADTEST_ENDPOINT": str(out / "endpoint.json"), "BERTFORGE_LOADTEST_ANSWERS": str(answers_file)}
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
    summary = {"host": host, "protocol": endpoint.protocol, "path": endpoint.path or "/predict", "mode": mode,
               "users": users, "spawn_rate": spawn_rate, "duration_s": seconds,
               "target_rps": rate if mode == "fixed-rate" else None, "inputs_per_request": batch, "task": task,
               **stats, "failure_ratio": stats["failures"] / stats["requests"] if stats["requests"] else None,
               "failure_kinds": failure_kinds(prefix), "errors": read_locust_failures(prefix),
               "wall_s": round(time.monotonic() - start, 1), "locust_exit_code": proc.returncode,
               "command": command, "csv_prefix": str(prefix)}
    after = server_counters(host, api_key)
    if before and after and after["model_calls"] > before["model_calls"]:
        calls = after["model_calls"] - before["model_calls"]
        summary["server"] = {"model_calls": int(calls), "mean_batch_size": round((after["inputs"] - before["inputs"]) / calls, 2)}
    if mode == "fixed-rate" and stats["requests_per_s"] is not None and stats["requests_per_s"] < 0.95 * rate:
        summary["note"] = f"achieved {stats['requests_per_s']:.1f} of {rate:g} requests/s: the server (or the client) is saturated"
    if label_check is not None:
        answers = json.loads(answers_file.read_text()) if answers_file.is_file() else {}
        summary["labels"] = label_check.check(answers)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def prepare_check(host: str, task: str, rows: list, endpoint: Endpoint, model: str | None = None,
                  expected_accuracy: float | None = None, api_key: str | None = None) -> LabelCheck:
    """The label check for a load test: with a bertforge endpoint on this machine, its artifact (from
    /info) gives the offline answers and dev score unless `model` names one."""
    max_tokens = 128
    if endpoint.protocol == "bertforge":
        auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        model = model or served_model_dir(host.rstrip("/"), auth)
        try:
            max_tokens = int(_get_json(f"{host.rstrip('/')}/info", auth).get("max_tokens") or 128)
        except (urllib.error.URLError, OSError, ValueError):
            pass
    return make_label_check(rows, task, model, endpoint.labels, expected_accuracy, max_tokens)


# -- capacity ----------------------------------------------------------------------------------------------------------

def find_knee(steps: list[dict], slo_ms: float) -> dict | None:
    """The highest offered rate that held: p99 within the SLO, no failures, and at least 90% of the rate
    achieved (an open-loop step that falls behind has a backlog its p99 does not show yet)."""
    held = [s for s in steps if s["p99_ms"] is not None and s["p99_ms"] <= slo_ms and not s["failures"]
            and s["achieved_rps"] >= 0.9 * s["offered_rps"]]
    return max(held, key=lambda s: s["offered_rps"]) if held else None


def run_sweep(host: str, out_dir: str | os.PathLike = "loadtest", slo_ms: float = 100.0,
              fractions=DEFAULT_FRACTIONS, step_duration: str | float = "20s", estimate_users: int = 8,
              estimate_duration: str | float = "15s", step_users: int = 4, name: str | None = None,
              **kwargs) -> dict:
    """Capacity: a closed-loop estimate, then fixed-rate steps at `fractions` of it; `out_dir/sweep.json`.

    kwargs go to every `run_loadtest` (endpoint, label_check, task, batch, ...).
    """
    if not fractions or any(f <= 0 for f in fractions):
        raise BertforgeError("sweep fractions must be positive")
    if slo_ms <= 0:
        raise BertforgeError("--slo-ms must be positive")
    out = Path(out_dir)
    task, kw = kwargs.pop("task", "sst2"), kwargs
    rows = kw.pop("rows", None) or load_examples(task, kw.pop("glue_dir", None), kw.pop("data_file", None),
                                                 kw.pop("split", None))
    for k in ("glue_dir", "data_file", "split"):
        kw.pop(k, None)
    estimate = run_loadtest(host, users=estimate_users, spawn_rate=estimate_users, duration=estimate_duration,
                            out_dir=out / "estimate", mode="closed", task=task, rows=rows, **kw)
    capacity = estimate["requests_per_s"] or 0
    if capacity <= 0:
        raise BertforgeError(f"the closed-loop estimate answered nothing ({estimate['errors'][:1]})")
    steps = []
    for f in sorted(fractions):
        rate = round(f * capacity, 2)
        users = max(1, min(step_users, math.ceil(rate)))
        s = run_loadtest(host, users=users, spawn_rate=users, duration=step_duration, mode="fixed-rate", rate=rate,
                         out_dir=out / f"step-{f:g}", task=task, rows=rows, **kw)
        step = {"fraction": f, "offered_rps": rate, "achieved_rps": round(s["requests_per_s"] or 0, 2),
                "requests": s["requests"], "p50_ms": s["p50_ms"], "p90_ms": s["p90_ms"], "p99_ms": s["p99_ms"],
                "failures": s["failures"], "failure_kinds": s["failure_kinds"],
                "mean_batch_size": (s.get("server") or {}).get("mean_batch_size")}
        if "labels" in s:
            step["labels"] = s["labels"]
        steps.append(step)
    knee = find_knee(steps, slo_ms)
    summary = {"name": name or host, "host": host, "protocol": estimate["protocol"], "task": task, "slo_ms": slo_ms,
               "estimate": {k: estimate.get(k) for k in ("users", "requests", "requests_per_s", "p50_ms", "p99_ms",
                                                         "failures", "failure_kinds", "labels", "server")},
               "steps": steps, "knee": knee, "rps_at_slo": knee["achieved_rps"] if knee else None,
               "step_duration_s": parse_duration(step_duration)}
    checked = [s["labels"] for s in steps if "labels" in s]
    if checked:
        summary["labels_ok"] = all(c["ok"] for c in checked) and (estimate.get("labels") or {}).get("ok", True)
    (out / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
