"""Locust load for `bertforge serve`: POST /predict with texts drawn from a GLUE task.

Run through `bertforge loadtest`, or directly:

    BERTFORGE_LOADTEST_TEXTS=glue_data/SST-2/dev.tsv \
        locust -f serving/locustfile.py --headless --host http://127.0.0.1:8000 -u 8 -r 8 -t 60s ClosedLoopUser

Two users:
- ClosedLoopUser sends its next request when the previous one has answered: it finds capacity, but
  under overload its latency is understated (a slow server slows the load down with it).
- FixedRateUser is open loop: it starts a request every 1/rate seconds whether or not earlier ones
  answered, so a slow server builds a queue and the latency shows it. Requests that could not even be
  sent (BERTFORGE_LOADTEST_MAX_OUTSTANDING in flight per user) are recorded as failures.

Environment: BERTFORGE_LOADTEST_TEXTS (a TSV with a header naming its text columns: GLUE's own
sentence / sentence1,sentence2 / question,sentence / #1 String,#2 String, or text_a,text_b; default:
the SST-2 sample shipped with bertforge), BERTFORGE_LOADTEST_BATCH (inputs per request, default 1),
BERTFORGE_LOADTEST_RATE (requests/s per FixedRateUser), BERTFORGE_API_KEY.

No torch or transformers here: Locust monkey-patches the standard library with gevent, which breaks
them (RecursionError). The file stands alone so workers of a distributed run need only Locust.
"""
from __future__ import annotations

import csv
import os
import random
import sys
import time
from pathlib import Path

import gevent
from gevent.pool import Pool
from locust import FastHttpUser, constant, events, task

PAIR_COLUMNS = [("text_a", "text_b"), ("sentence1", "sentence2"), ("question1", "question2"),
                ("#1 String", "#2 String"), ("question", "sentence")]
SINGLE_COLUMNS = ["text_a", "sentence"]
DEFAULT_TEXTS = Path(__file__).resolve().parents[1] / "pipeline" / "data" / "sample" / "SST-2" / "dev.tsv"


def load_texts(path: str | os.PathLike) -> list:
    """Texts (str) or pairs ([a, b]) from a tab-separated file with a header row."""
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if len(rows) < 2:
        raise SystemExit(f"{path}: no rows")
    header = [h.strip() for h in rows[0]]
    for a, b in PAIR_COLUMNS:
        if a in header and b in header:
            ia, ib = header.index(a), header.index(b)
            texts = [[r[ia], r[ib]] for r in rows[1:] if len(r) > max(ia, ib) and r[ia].strip() and r[ib].strip()]
            if texts:
                break
    else:
        names = [c for c in SINGLE_COLUMNS if c in header]
        if not names:
            raise SystemExit(f"{path}: no text column in header {header} (expected one of "
                             f"{SINGLE_COLUMNS + [p[0] for p in PAIR_COLUMNS]})")
        i = header.index(names[0])
        texts = [r[i] for r in rows[1:] if len(r) > i and r[i].strip()]
    if not texts:
        raise SystemExit(f"{path}: no texts")
    return texts


TEXTS = load_texts(os.environ.get("BERTFORGE_LOADTEST_TEXTS") or DEFAULT_TEXTS)
BATCH = int(os.environ.get("BERTFORGE_LOADTEST_BATCH", "1"))
RATE = float(os.environ.get("BERTFORGE_LOADTEST_RATE", "1"))
MAX_OUTSTANDING = int(os.environ.get("BERTFORGE_LOADTEST_MAX_OUTSTANDING", "256"))
HEADERS = {"Authorization": f"Bearer {os.environ['BERTFORGE_API_KEY']}"} if os.environ.get("BERTFORGE_API_KEY") else {}


def predict(client) -> None:
    picked = random.sample(TEXTS, BATCH) if BATCH <= len(TEXTS) else random.choices(TEXTS, k=BATCH)
    if BATCH == 1:
        body = {"inputs": picked[0] if isinstance(picked[0], str) else [picked[0]]}
    else:
        body = {"inputs": picked}
    with client.post("/predict", json=body, headers=HEADERS, name="/predict", catch_response=True) as r:
        if r.status_code != 200:
            r.failure(f"HTTP {r.status_code}: {(r.text or '')[:200]}")
            return
        try:
            answered = len(r.json()["predictions"])
        except (ValueError, KeyError, TypeError):
            r.failure("answer is not {\"predictions\": [...]}")
            return
        if answered != BATCH:
            r.failure(f"{answered} predictions for {BATCH} inputs")


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
            events.request.fire(request_type="POST", name="/predict", response_time=0, response_length=0,
                                exception=RuntimeError(f"not sent: {MAX_OUTSTANDING} requests outstanding"),
                                context={})
            return
        self.pool.spawn(predict, self.client)

    def on_stop(self):
        self.pool.join(timeout=10)
