"""Latency and throughput on real text: what a user's traffic costs, beside the padded s128 grid.

The grid times full-length random sequences; SST-2 sentences are about 25 word pieces, so it says little
about real traffic. Here each artifact runs a task's dev sentences (or a file's lines) tokenized by its
own tokenizer, at their own lengths:

1. a shape probe: at every length the texts hold, two calls in a row (seeded random order of lengths). A
   runtime that pays a per-shape cost (plans, kernels or buffers built on the first call at a new input
   shape) shows it as first call >> second call. The probe also leaves every length warm for step 2;
2. batch 1, one call per text, in file order: p50, p90, p99 (steady state: every shape seen);
3. batches of 8 and 32 of length-sorted texts, each padded to its longest member: two passes, the first
   meets every batch shape for the first time, the second is the throughput quoted.

Artifacts take turns in short time slices (as the grid does), so a slow minute of a shared machine hits
them all alike. Every row records the mean real token count of the texts it measured (and the mean padded
length of its batches), since latency is quoted per text, not per token.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import BertforgeError

PER_SHAPE_RATIO = 1.5  # a first call this many times its warm repeat (median over lengths) counts as a per-shape cost
PROBE_LENGTHS = 48  # at most this many distinct lengths are probed (spread over the range)


@dataclass
class TextSet:
    source: str  # "sst2 dev" or the file's name
    texts: list[tuple[str, str | None]]
    max_length: int
    sha256: str

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "texts": len(self.texts), "max_length": self.max_length, "sha256": self.sha256}


def load_texts(spec: str, glue_dir: str | None = None, limit: int | None = None, max_length: int | None = None) -> TextSet:
    """`spec`: a GLUE task name (its dev split) or a file, one text per line (a tab splits a pair)."""
    from pipeline.data import GLUE_TASKS, dev_split, get_task, load_glue, sample_data_dir

    path = Path(spec).expanduser()
    if path.is_file():
        lines = [line.rstrip("\n\r") for line in path.read_text(encoding="utf-8").splitlines()]
        texts = [(a, b or None) for a, _, b in (line.partition("\t") for line in lines if line.strip())]
        source, length = path.name, max_length or 128
    elif spec.lower() in GLUE_TASKS:
        task = get_task(spec.lower())
        # without a GLUE folder, SST-2 comes from the sample bertforge ships (its dev set is complete)
        data = glue_dir or (sample_data_dir() if task.name == "sst2" else None)
        texts = [(ex.text_a, ex.text_b) for ex in load_glue(task.name, dev_split(task), data)]
        source, length = f"{task.name} {dev_split(task)}", max_length or task.default_max_length
    else:
        raise BertforgeError(f"--texts takes a GLUE task ({', '.join(GLUE_TASKS)}) or an existing file, not {spec!r}")
    texts = texts[:limit] if limit else texts
    if not texts:
        raise BertforgeError(f"--texts {spec}: no texts")
    digest = hashlib.sha256("\n".join(f"{a}\t{b or ''}" for a, b in texts).encode()).hexdigest()
    return TextSet(source, texts, length, digest)


# ---------------------------------------------------------------- inputs

def encode(tokenizer, texts: TextSet) -> tuple[list[list[int]], list[list[int]]]:
    """Each text's input ids and segment ids, truncated at `max_length`, unpadded (the artifact's own tokenizer)."""
    ids, types = [], []
    for a, b in texts.texts:  # one at a time: a file may mix single texts and pairs
        enc = tokenizer(a, b, truncation=True, max_length=texts.max_length)
        ids.append(list(enc["input_ids"]))
        types.append(list(enc.get("token_type_ids") or [0] * len(enc["input_ids"])))
    return ids, types


def batch_inputs(ids: list[list[int]], types: list[list[int]], pad_id: int) -> dict[str, np.ndarray]:
    """One batch padded to its longest member (attention mask 0 on the padding)."""
    width = max(len(x) for x in ids)
    out = {"input_ids": np.full((len(ids), width), pad_id, dtype=np.int64),
           "attention_mask": np.zeros((len(ids), width), dtype=np.int64),
           "token_type_ids": np.zeros((len(ids), width), dtype=np.int64)}
    for i, (row, tt) in enumerate(zip(ids, types)):
        out["input_ids"][i, :len(row)] = row
        out["attention_mask"][i, :len(row)] = 1
        out["token_type_ids"][i, :len(tt)] = tt
    return out


@dataclass
class Stream:
    """One artifact's calls for one mode, in order; `tokens[i]` the real tokens of call i, `padded[i]` its
    padded size (batch x width)."""
    inputs: list[dict[str, np.ndarray]]
    sequences: list[int]
    tokens: list[int]
    padded: list[int]


def single_stream(ids, types, pad_id) -> Stream:
    return Stream([batch_inputs([i], [t], pad_id) for i, t in zip(ids, types)], [1] * len(ids),
                  [len(i) for i in ids], [len(i) for i in ids])


def sorted_stream(ids, types, pad_id, batch: int) -> Stream:
    order = sorted(range(len(ids)), key=lambda k: len(ids[k]))
    chunks = [order[k:k + batch] for k in range(0, len(order), batch)]
    inputs = [batch_inputs([ids[k] for k in c], [types[k] for k in c], pad_id) for c in chunks]
    return Stream(inputs, [len(c) for c in chunks], [sum(len(ids[k]) for k in c) for c in chunks],
                  [x["input_ids"].size for x in inputs])


# ---------------------------------------------------------------- timing

def run_streams(runners: list[tuple[str, Any]], streams: dict[str, Stream], device: str, cfg, passes: int = 1) -> dict[str, list[float]]:
    """Round robin: each runner walks its stream (`passes` times) in `slice_seconds` turns, until it has
    done every call or spent `max_seconds`. Sample i is call i % len(stream)."""
    from pipeline.bench import _timed_call

    samples: dict[str, list[float]] = {name: [] for name, _ in runners}
    spent = {name: 0.0 for name, _ in runners}

    def done(name):
        return spent[name] >= cfg.max_seconds or len(samples[name]) >= passes * len(streams[name].inputs)

    while not all(done(name) for name, _ in runners):
        for name, runtime in runners:
            turn = time.perf_counter()
            while not done(name):
                stream = streams[name]
                dt = _timed_call(runtime, stream.inputs[len(samples[name]) % len(stream.inputs)], device)
                samples[name].append(dt)
                spent[name] += dt
                if time.perf_counter() - turn >= cfg.slice_seconds:
                    break
    return samples


def probe_shapes(runners: list[tuple[str, Any]], streams: dict[str, Stream], device: str, seen: set[int], seed: int) -> dict[str, dict]:
    """First call against the call right after it, at each text length not met before (`seen`: lengths
    the grid and the cold start already ran at batch 1). Interleaved over artifacts, length by length."""
    from pipeline.bench import _timed_call

    first_at: dict[str, dict[int, dict]] = {}
    for name, _ in runners:
        by_len: dict[int, dict] = {}
        for x in streams[name].inputs:
            by_len.setdefault(int(x["input_ids"].shape[1]), x)
        first_at[name] = {k: v for k, v in by_len.items() if k not in seen}
    lengths = sorted(set().union(*(d.keys() for d in first_at.values())))
    if len(lengths) > PROBE_LENGTHS:  # spread over the range; the rest are warmed untimed below
        lengths = [lengths[round(i * (len(lengths) - 1) / (PROBE_LENGTHS - 1))] for i in range(PROBE_LENGTHS)]
    rng = np.random.default_rng(seed)
    lengths = [lengths[i] for i in rng.permutation(len(lengths))]
    pairs: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in runners}
    for length in lengths:
        for name, runtime in runners:
            x = first_at[name].get(length)
            if x is not None:
                pairs[name].append((_timed_call(runtime, x, device), _timed_call(runtime, x, device)))
    for name, runtime in runners:  # every remaining length warm before the timed pass
        for length, x in first_at[name].items():
            if length not in lengths:
                _timed_call(runtime, x, device)
    return {name: shape_cost(p) for name, p in pairs.items()}


def shape_cost(pairs: list[tuple[float, float]]) -> dict[str, Any]:
    """Whether the first call at a new length costs more than the same call repeated."""
    if not pairs:
        return {"lengths_probed": 0, "per_shape_cost": None, "note": "no unseen lengths to probe"}
    first, again = (np.asarray(x) * 1000 for x in zip(*pairs))
    ratio = float(np.median(first / again))
    pays = ratio >= PER_SHAPE_RATIO
    extra = float(np.median(first - again))
    note = (f"pays a per-shape cost: the first call at an unseen length takes {ratio:.1f}x its repeat "
            f"(median +{extra:.2f} ms over {len(pairs)} lengths); warm every length before serving"
            if pays else f"no per-shape cost measured: first call at an unseen length {ratio:.2f}x its repeat "
            f"(median over {len(pairs)} lengths)")
    return {"lengths_probed": len(pairs), "first_call_p50_ms": round(float(np.median(first)), 4),
            "repeat_call_p50_ms": round(float(np.median(again)), 4), "first_call_max_ms": round(float(first.max()), 4),
            "first_vs_repeat": round(ratio, 3), "first_extra_ms": round(extra, 4), "per_shape_cost": pays, "note": note}


def _row(name, stream: Stream, samples_s: list[float], first_pass: int = 0) -> dict[str, Any]:
    """Summary of the timed calls after the first `first_pass` (a pass meeting new shapes)."""
    from pipeline.bench import summarize

    n = len(stream.inputs)
    warm = bool(samples_s[first_pass:])  # False: max_seconds ran out within the first pass
    timed = samples_s[first_pass:] if warm else samples_s
    idx = [(first_pass + k) % n if warm else k for k in range(len(timed))]
    seqs = sum(stream.sequences[k] for k in idx)
    row = summarize(timed, 1)
    row["throughput_seq_s"] = round(seqs / sum(timed), 2)
    row.update(texts=seqs, mean_tokens=round(sum(stream.tokens[k] for k in idx) / seqs, 2),
               mean_padded_tokens=round(sum(stream.padded[k] for k in idx) / seqs, 2),
               complete=len(timed) >= n, warm=warm)
    if first_pass and warm:
        cold = samples_s[:first_pass]
        row["first_pass_throughput_seq_s"] = round(sum(stream.sequences[k] for k in range(len(cold))) / sum(cold), 2)
    return row


def measure_texts(runtimes: dict[str, Any], texts: TextSet, device: str, cfg, seen_lengths: set[int],
                  log=lambda msg: None) -> list[dict[str, Any]]:
    """Rows of the real-text bench for every runtime on `device` (see the module doc)."""
    from pipeline.bench import _timed_call, provider_of

    runners = list(runtimes.items())
    encoded = {}
    for name, runtime in runners:
        tok = runtime.tokenizer
        encoded[name] = (*encode(tok, texts), tok.pad_token_id or 0)
    single = {name: single_stream(*encoded[name]) for name, _ in runners}
    t0 = time.perf_counter()
    costs = probe_shapes(runners, single, device, seen_lengths, cfg.seed)
    for name, runtime in runners:  # the usual warm-up, after the probe so it never hides a first call
        for x in single[name].inputs[:cfg.warmup]:
            _timed_call(runtime, x, device)
    samples = run_streams(runners, single, device, cfg)
    rows = []
    for name, runtime in runners:
        row = {"artifact": name, "device": device, "provider": provider_of(runtime), "texts_source": texts.source,
               "batch_size": 1, "order": "as given", **_row(name, single[name], samples[name]), "shape_cost": costs[name]}
        rows.append(row)
    log(f"{device} real text b1: " + ", ".join(f"{r['artifact']} p99 {r['p99_ms']:.2f} ms ({r['mean_tokens']:.1f} tok)"
                                            for r in rows[-len(runners):]) + f" ({time.perf_counter() - t0:.0f} s)")
    for batch in cfg.text_batch_sizes:
        t0 = time.perf_counter()
        streams = {name: sorted_stream(*encoded[name], batch) for name, _ in runners}
        samples = run_streams(runners, streams, device, cfg, passes=2)
        for name, runtime in runners:
            n = len(streams[name].inputs)
            rows.append({"artifact": name, "device": device, "provider": provider_of(runtime), "texts_source": texts.source,
                         "batch_size": batch, "order": "length-sorted", **_row(name, streams[name], samples[name], first_pass=n)})
        log(f"{device} real text b{batch} sorted: " + ", ".join(
            f"{r['artifact']} {r['throughput_seq_s']:.1f} seq/s" for r in rows[-len(runners):]) + f" ({time.perf_counter() - t0:.0f} s)")
    return rows
