"""Real-text bench on tiny models: SST-2 dev sentences at their own lengths beside the s128 grid, the
per-shape probe, and the rows' token counts checked against the artifacts' own tokenizers; the accurate
baseline (built from a tiny classifier standing in for a fine-tuned BERT-base) and the report's decision page."""
from __future__ import annotations

import time

import numpy as np
import pytest

from conftest import make_tiny_bert
from pipeline.artifacts import Manifest, write_manifest
from pipeline.bench import ArtifactSpec, BenchConfig, benchmark_artifacts, read_bench
from pipeline.bench_text import load_texts, probe_shapes, single_stream
from pipeline.cli import main
from pipeline.errors import BertforgeError

FAST = dict(warmup=1, min_iters=3, min_seconds=0.05, slice_seconds=0.02, threads=1, cold_start="inprocess")


@pytest.fixture(scope="module")
def models(tmp_path_factory, sst2_dir):
    from pipeline.baseline import build_baseline

    root = tmp_path_factory.mktemp("text")
    # stands in for a fine-tuned BERT-base (textattack/bert-base-uncased-SST-2): a classifier with its head
    stand_in = make_tiny_bert(root / "fine-tuned-base", hidden=64, intermediate=128, layers=2, seed=3)
    teacher = make_tiny_bert(root / "teacher", hidden=48, intermediate=96, layers=3, seed=1)
    write_manifest(teacher, Manifest(stage="finetune", task="sst2", metrics={"dev": {"accuracy": 0.9, "score": 0.9}}))
    student = make_tiny_bert(root / "student", seed=2)
    write_manifest(student, Manifest(stage="distill", task="sst2", parent=str(teacher),
                                     metrics={"dev": {"accuracy": 0.88, "score": 0.88}}))
    return {"root": root, "teacher": teacher, "student": student, "stand_in": stand_in,
            **build_baseline(root / "baseline", task="sst2", hub_id=str(stand_in), glue_dir=sst2_dir)}


@pytest.fixture(scope="module")
def bench(models, sst2_dir):
    specs = [ArtifactSpec("teacher", models["teacher"]), ArtifactSpec("student", models["student"]),
             ArtifactSpec("bert-base-torch-fp32", models["torch_fp32"]), ArtifactSpec("bert-base-ort-int8", models["ort_int8"])]
    cfg = BenchConfig(batch_sizes=[1], seq_lens=[128], texts="sst2", texts_limit=48, glue_dir=str(sst2_dir), **FAST)
    return benchmark_artifacts(specs, cfg, progress=False)


def test_real_text_rows_beside_the_grid(bench, models, sst2_dir):
    from transformers import AutoTokenizer

    assert bench["texts"]["source"] == "sst2 dev" and bench["texts"]["texts"] == 48 and len(bench["texts"]["sha256"]) == 64
    assert {(r["artifact"], r["seq_len"]) for r in bench["results"]} == {(a, 128) for a in
                                                                       ("teacher", "student", "bert-base-torch-fp32", "bert-base-ort-int8")}
    rows = {(r["artifact"], r["batch_size"]): r for r in bench["text_results"]}
    assert set(rows) == {(a, b) for a in ("teacher", "student", "bert-base-torch-fp32", "bert-base-ort-int8") for b in (1, 8, 32)}
    # the mean token count is the artifact's own tokenizer's, over the texts it ran, with no padding at batch 1
    texts = load_texts("sst2", str(sst2_dir), limit=48)
    tok = AutoTokenizer.from_pretrained(models["student"])
    lengths = [len(tok(a, truncation=True, max_length=64)["input_ids"]) for a, _ in texts.texts]
    one = rows[("student", 1)]
    assert one["mean_tokens"] == pytest.approx(np.mean(lengths), abs=0.01) == one["mean_padded_tokens"]
    assert one["mean_tokens"] < 64 and one["iters"] == 48 and one["complete"] and one["texts"] == 48
    assert 0 < one["min_ms"] <= one["p50_ms"] <= one["p90_ms"] <= one["p99_ms"]
    assert one["throughput_seq_s"] == pytest.approx(1000 / one["mean_ms"], rel=1e-3)
    # length-sorted batches pad little: each padded to its longest member, never to 128
    for b in (8, 32):
        r = rows[("student", b)]
        assert r["iters"] == -(-48 // b) and r["texts"] == 48 and r["warm"]
        assert one["mean_tokens"] <= r["mean_padded_tokens"] < max(lengths)
        assert r["first_pass_throughput_seq_s"] > 0 and r["throughput_seq_s"] > 0
    assert rows[("bert-base-ort-int8", 1)]["provider"] == "CPUExecutionProvider"
    cost = one["shape_cost"]
    assert cost["lengths_probed"] == len(set(lengths)) and cost["per_shape_cost"] in (True, False)
    assert cost["first_call_p50_ms"] > 0 and cost["repeat_call_p50_ms"] > 0 and "unseen length" in cost["note"]


class ShapeCachingRuntime:
    """A runtime that builds something per input shape on its first call (as graph compilers do): 30 ms at a
    new shape, 1 ms after."""

    def __init__(self):
        self.shapes = set()

    def __call__(self, inputs):
        shape = inputs["input_ids"].shape
        time.sleep(0.001 if shape in self.shapes else 0.03)
        self.shapes.add(shape)


def test_shape_probe_flags_a_per_shape_cost_and_skips_seen_lengths():
    class Cfg:
        seed = 0

    ids = [[101] + [2000] * n + [102] for n in (3, 5, 8, 5, 13, 3)]
    stream = single_stream(ids, [[0] * len(i) for i in ids], 0)
    steady = ShapeCachingRuntime()
    steady.shapes = {x["input_ids"].shape for x in stream.inputs}  # already warm
    costs = probe_shapes([("caching", ShapeCachingRuntime()), ("steady", steady)], {"caching": stream, "steady": stream},
                         "cpu", seen={7}, seed=0)
    assert costs["caching"]["lengths_probed"] == 3  # lengths 5, 10 and 15; 7 was seen by the grid
    assert costs["caching"]["per_shape_cost"] is True and costs["caching"]["first_vs_repeat"] > 5
    assert "pays a per-shape cost" in costs["caching"]["note"]
    assert costs["steady"]["per_shape_cost"] is False and "no per-shape cost" in costs["steady"]["note"]


def test_texts_from_a_file_with_pairs_and_bad_input(tmp_path, sst2_dir):
    f = tmp_path / "traffic.txt"
    f.write_text("a short one\n\nthe first sentence\tand its pair\n")
    texts = load_texts(str(f))
    assert texts.texts == [("a short one", None), ("the first sentence", "and its pair")] and texts.max_length == 128
    from transformers import AutoTokenizer

    from pipeline.bench_text import encode

    ids, types = encode(AutoTokenizer.from_pretrained(make_tiny_bert(tmp_path / "m")), texts)
    assert [len(i) for i in ids] == [5, 9] and types[0] == [0] * 5 and types[1] == [0] * 5 + [1] * 4  # the pair: segment 1
    assert load_texts("sst2", str(sst2_dir), limit=5, max_length=16).max_length == 16
    with pytest.raises(BertforgeError, match="GLUE task .* or an existing file"):
        load_texts("no-such-task-or-file")
    with pytest.raises(BertforgeError, match=">= 1"):
        BenchConfig(text_batch_sizes=[0])


def test_cli_bench_texts(models, tmp_path, sst2_dir):
    out = tmp_path / "bench.json"
    assert main(["bench", "--models", str(models["student"]), "--out", str(out), "--batch-sizes", "1", "--seq-lens", "16",
                 "--warmup", "1", "--min-iters", "2", "--min-seconds", "0.02", "--threads", "1", "--cold-start", "inprocess",
                 "--device", "cpu", "--texts", "sst2", "--texts-limit", "10", "--text-batch-sizes", "4",
                 "--glue-dir", str(sst2_dir)]) == 0
    data = read_bench(out)
    assert [(r["batch_size"], r["texts"]) for r in data["text_results"]] == [(1, 10), (4, 10)]
    assert "--texts sst2 --texts-limit 10" in data["command"]
    assert main(["bench", "--models", str(models["student"]), "--out", str(tmp_path / "b.json"), "--texts", "nope"]) == 2


def test_a_fine_tuned_baseline_is_scored_on_dev(models, sst2_dir, tmp_path):
    from pipeline.artifacts import read_manifest
    from pipeline.baseline import build_baseline
    from pipeline.bench import artifact_info
    from pipeline.evaluate import evaluate

    expected = evaluate(str(models["stand_in"]), "sst2", sst2_dir, progress=False).metrics["score"]
    fp32, int8 = read_manifest(models["torch_fp32"]), read_manifest(models["ort_int8"])
    assert fp32.params["fine_tuned"] and int8.params["fine_tuned"] and not fp32.params["shape_only"]
    assert fp32.score == pytest.approx(expected) and fp32.metrics["dev"]["accuracy"] == pytest.approx(expected)
    assert int8.score == pytest.approx(expected, abs=0.05)  # dynamic int8 of the same classifier
    assert fp32.params["source"] == str(models["stand_in"]) and "accurate baseline" in fp32.params["note"]
    info = artifact_info(ArtifactSpec("b", models["torch_fp32"]))
    assert info["baseline"] == "torch_fp32" and info["score"] == pytest.approx(expected)  # kept, unlike an untrained head
    # a classifier of another task's label count is refused, not silently replaced by a random model
    three = make_tiny_bert(tmp_path / "three", num_labels=3, task=None)
    with pytest.raises(BertforgeError, match="label-count mismatch"):
        build_baseline(tmp_path / "b3", task="sst2", hub_id=str(three), int8=False)


def test_report_decision_page_real_text_and_reference_rows(bench, models, tmp_path):
    from pipeline.report import ReportConfig, build_report, fmt_ms

    rep = build_report(bench, tmp_path, ReportConfig(final="student"))
    acc = rep["accurate_baseline"]
    assert acc["name"] == "bert-base-torch-fp32" and acc["score"] is not None
    rt = rep["real_text"]
    text = {(r["artifact"], r["batch_size"]): r for r in bench["text_results"]}
    final = rt["final"]
    assert final["artifact"] == "student" and final["p99_ms"] == text[("student", 1)]["p99_ms"]
    assert final["faster_p50_vs_bert_base_ort_int8"] == pytest.approx(
        text[("bert-base-ort-int8", 1)]["p50_ms"] / text[("student", 1)]["p50_ms"], rel=0.01)
    assert final["throughput_b32_vs_bert_base_torch_fp32"] == pytest.approx(
        text[("student", 32)]["throughput_seq_s"] / text[("bert-base-torch-fp32", 32)]["throughput_seq_s"], rel=0.01)
    assert final["s128_faster_p50_vs_bert_base_torch_fp32"] == rep["ratios"]["latency_b1_vs_bert_base_torch_fp32"]
    assert [r["task"] for r in rep["published"]] and all(r["task"] == "sst2" for r in rep["published"])

    md = (tmp_path / "report.md").read_text()
    first = md[:md.index("## Headline")]  # the decision page
    serve = f"bertforge serve --model {models['student']} --threads 1"
    assert serve in first and f"**{fmt_ms(final['p99_ms'])} ms** p99 latency at batch 1 on real text (sst2 dev" in first
    keep = 0.88 / acc["score"]
    assert f"**{100 * keep:.1f}%** of the accurate baseline's dev score" in first
    assert "faster than BERT-base ORT int8" in first and "unseen length" in first
    headline, real, grid = (md.index(h) for h in ("## Headline", "## Real text: sst2 dev at its own lengths", "## Every grid point"))
    assert headline < real < md.index("## Published reference figures (not measured here)") < grid
    assert "| BERT-base (teacher) | sst2 | GLUE test | Jiao et al. 2020, TinyBERT" in md and "arXiv:1909.10351 | 93.40 |" in md
    base_row = next(line for line in md.splitlines() if line.startswith("| bert-base-torch-fp32 (baseline)"))
    assert f"{100 * acc['score']:.2f}" in base_row  # the accurate baseline's score beside its latency and size
    page = (tmp_path / "report.html").read_text()
    assert page.index('id="decision"') < page.index(serve) < page.index("<h2>Headline")
    assert page.index("<h2>Headline") < page.index("<h2>Real text: sst2 dev") < page.index("<h2>Published reference")
