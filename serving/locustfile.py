"""Locust load for an inference endpoint: bertforge's /predict, TEI, the Open Inference Protocol v2, or any
JSON endpoint described by a request template. Every answer is parsed; a malformed one is a failure.

Run through `bertforge loadtest`, or directly:

    BERTFORGE_LOADTEST_TEXTS=glue_data/SST-2/dev.tsv \
        locust -f serving/locustfile.py --headless --host http://127.0.0.1:8000 -u 8 -r 8 -t 60s ClosedLoopUser

Two users:
- ClosedLoopUser sends its next request when the previous one has answered: it finds capacity, but
  under overload its latency is understated (a slow server slows the load down with it).
- FixedRateUser is open loop: it starts a request every 1/rate seconds whether or not earlier ones
  answered, so a slow server builds a queue and the latency shows it. Requests that could not even be
  sent (BERTFORGE_LOADTEST_MAX_OUTSTANDING in flight per user) are recorded as failures.

Failure messages start with a kind, which `serving/loadtest.py` counts apart: "HTTP <code>", "connection",
"malformed answer", "not sent".

Environment: BERTFORGE_LOADTEST_TEXTS (a TSV with a header naming its text columns: GLUE's own
sentence / sentence1,sentence2 / question,sentence / #1 String,#2 String, or text_a,text_b, and an optional
`label` column of gold class ids; default: the SST-2 sample shipped with bertforge), BERTFORGE_LOADTEST_BATCH
(inputs per request, default 1), BERTFORGE_LOADTEST_RATE (requests/s per FixedRateUser), BERTFORGE_API_KEY,
BERTFORGE_LOADTEST_ENDPOINT (a JSON file: protocol, path, headers, template, label_field, oip input/output
names; default: bertforge's /predict), BERTFORGE_LOADTEST_ANSWERS (where to write the labels each text was
answered with, on exit).

No torch or transformers here: Locust monkey-patches the standard library with gevent, which breaks
them (RecursionError). The file stands alone so workers of a distributed run need only Locust.
"""
from __future__ import annotations

import csv
import json
import os
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import gevent
from gevent.pool import Pool
from locust import FastHttpUser, constant, events, task
from loadtest_protocols import Protocol  # beside this file (Locust puts its folder on sys.path)

PAIR_COLUMNS = [("text_a", "text_b"), ("sentence1", "sentence2"), ("question1", "question2"),
                ("#1 String", "#2 String"), ("question", "sentence")]
SINGLE_COLUMNS = ["text_a", "sentence"]
DEFAULT_TEXTS = Path(__file__).resolve().parents[1] / "pipeline" / "data" / "sample" / "SST-2" / "dev.tsv"


def load_rows(path: str | os.PathLike) -> tuple[list, list]:
    """Texts (str) or pairs ([a, b]) from a tab-separated file with a header row, and their gold labels
    (the `label` column as written, or None)."""
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if len(rows) < 2:
        raise SystemExit(f"{path}: no rows")
    header = [h.strip() for h in rows[0]]
    il = header.index("label") if "label" in header else None
    for a, b in PAIR_COLUMNS:
        if a in header and b in header:
            ia, ib = header.index(a), header.index(b)
            kept = [r for r in rows[1:] if len(r) > max(ia, ib) and r[ia].strip() and r[ib].strip()]
            if kept:
                texts = [[r[ia], r[ib]] for r in kept]
                break
    else:
        names = [c for c in SINGLE_COLUMNS if c in header]
        if not names:
            raise SystemExit(f"{path}: no text column in header {header} (expected one of "
                             f"{SINGLE_COLUMNS + [p[0] for p in PAIR_COLUMNS]})")
        ia = header.index(names[0])
        kept = [r for r in rows[1:] if len(r) > ia and r[ia].strip()]
        texts = [r[ia] for r in kept]
    if not texts:
        raise SystemExit(f"{path}: no texts")
    gold = [(r[il] if len(r) > il and r[il] != "" else None) for r in kept] if il is not None else [None] * len(kept)
    return texts, gold


def load_texts(path: str | os.PathLike) -> list:
    return load_rows(path)[0]


# -- the load -----------------------------------------------------------------------------------------------

TEXTS, GOLD = load_rows(os.environ.get("BERTFORGE_LOADTEST_TEXTS") or DEFAULT_TEXTS)
BATCH = int(os.environ.get("BERTFORGE_LOADTEST_BATCH", "1"))
RATE = float(os.environ.get("BERTFORGE_LOADTEST_RATE", "1"))
MAX_OUTSTANDING = int(os.environ.get("BERTFORGE_LOADTEST_MAX_OUTSTANDING", "256"))
_spec_file = os.environ.get("BERTFORGE_LOADTEST_ENDPOINT")
PROTOCOL = Protocol(json.loads(Path(_spec_file).read_text()) if _spec_file else {})
HEADERS = dict(PROTOCOL.headers)
if os.environ.get("BERTFORGE_API_KEY"):
    HEADERS["Authorization"] = f"Bearer {os.environ['BERTFORGE_API_KEY']}"
ANSWERS_FILE = os.environ.get("BERTFORGE_LOADTEST_ANSWERS")
ANSWERS: dict[int, Counter] = defaultdict(Counter)  # text index -> labels it was answered with

# Texts go out in one shuffled cycle shared by all users of this process, so a run of at least
# len(TEXTS) inputs answers every text (served accuracy over the whole set, not a sample).
_ORDER = list(range(len(TEXTS)))
random.Random(0).shuffle(_ORDER)
_next = 0


def next_indices(k: int) -> list[int]:
    global _next
    picked = [_ORDER[(_next + i) % len(_ORDER)] for i in range(k)]
    _next += k
    return picked


def predict(client) -> None:
    indices = next_indices(BATCH)
    inputs = [TEXTS[i] for i in indices]
    name = PROTOCOL.path
    with client.post(PROTOCOL.path, json=PROTOCOL.body(inputs), headers=HEADERS, name=name,
                     catch_response=True) as r:
        if not r.status_code:
            r.failure(f"connection: {r.error}")
            return
        if r.status_code != 200:
            r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")
            return
        try:
            labels = PROTOCOL.labels_of(r.json(), len(inputs))
        except ValueError as e:  # Malformed, or a body that is not JSON
            r.failure(f"malformed answer: {str(e)[:200]}")
            return
        for i, label in zip(indices, labels):
            if label is not None:
                ANSWERS[i][str(label)] += 1


@events.quitting.add_listener
def write_answers(environment, **kwargs):
    if ANSWERS_FILE:
        Path(ANSWERS_FILE).write_text(json.dumps({str(i): dict(c) for i, c in ANSWERS.items()}))


class ClosedLoopUser(FastHttpUser):
    wait_time = constant(0)

    @task
    def predict(self):
        predict(self.client)


class FixedRateUser(FastHttpUser):
    wait_time = constant(0)
    concurrency = MAX_OUTSTANDING  # connections of this user's client pool

    def on_start(self):
        self.pool = Pool(MAX_OUTSTANDING)
        # Users start at a random phase so their requests do not arrive in lockstep.
        self.next_at = time.monotonic() + random.uniform(0, 1 / RATE)

    @task
    def fire(self):
        delay = self.next_at - time.monotonic()
        if delay > 0:
            gevent.sleep(delay)
        self.next_at += 1 / RATE
        if self.pool.full():
            events.request.fire(request_type="POST", name=PROTOCOL.path, response_time=0, response_length=0,
                                exception=RuntimeError(f"not sent: {MAX_OUTSTANDING} requests outstanding"),
                                context={})
            return
        self.pool.spawn(predict, self.client)

    def on_stop(self):
        self.pool.join(timeout=10)
