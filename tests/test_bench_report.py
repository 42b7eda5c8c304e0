"""bench and report on tiny models: the bench JSON's fields and numbers, the report's ratios, and the HTML
page rendered by headless Chromium with its plots."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import make_tiny_bert
from pipeline.artifacts import Manifest, read_manifest, write_manifest
from pipeline.bench import ArtifactSpec, BenchConfig, benchmark_artifacts, cold_start_subprocess, read_bench, write_bench
from pipeline.cli import main
from pipeline.errors import BertforgeError
from pipeline.report import ReportConfig, build_report

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
TINY_BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
FAST = dict(warmup=1, min_iters=3, min_seconds=0.05, slice_seconds=0.02, threads=1, cold_start="inprocess")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A teacher, a smaller student distilled from it, and a tiny stand-in for the BERT-base baseline."""
    from pipeline.baseline import build_baseline

    root = tmp_path_factory.mktemp("bench")
    teacher = make_tiny_bert(root / "teacher", hidden=48, intermediate=96, layers=3, seed=1)
    write_manifest(teacher, Manifest(stage="finetune", task="sst2", parent="all-MiniLM-L6-v2",
                                     metrics={"dev": {"accuracy": 0.90, "score": 0.90}}))
    student = make_tiny_bert(root / "student", hidden=32, intermediate=64, layers=2, seed=2)
    write_manifest(student, Manifest(stage="distill", task="sst2", parent=str(teacher),
                                     metrics={"dev": {"accuracy": 0.88, "score": 0.88}}))
    base = build_baseline(root / "baseline", task="sst2", shape=TINY_BASE)
    return {"root": root, "teacher": teacher, "student": student, **base}


@pytest.fixture(scope="module")
def bench(models):
    specs = [ArtifactSpec("teacher", models["teacher"]), ArtifactSpec("student", models["student"]),
             ArtifactSpec("bert-base-torch-fp32", models["torch_fp32"]), ArtifactSpec("bert-base-ort-int8", models["ort_int8"])]
    result = benchmark_artifacts(specs, BenchConfig(batch_sizes=[1, 4], seq_lens=[32], **FAST), progress=False)
    write_bench(result, models["root"] / "bench.json")
    return result


def test_baseline_artifacts(models):
    fp32, int8 = read_manifest(models["torch_fp32"]), read_manifest(models["ort_int8"])
    assert fp32.stage == int8.stage == "baseline"
    assert fp32.params["shape_only"] is True and int8.params["shape_only"] is True  # offline: no bert-base-uncased
    assert fp32.score is None and int8.score is None  # speed and size only
    assert (fp32.format, fp32.precision, int8.format, int8.precision) == ("pytorch", "fp32", "onnx", "int8")
    assert fp32.params["hidden"] == 64 and fp32.params["layers"] == 2
    assert int8.size_bytes < fp32.size_bytes


def test_bench_fields_and_numbers(bench, models):
    assert bench["hardware"]["cpu_model"] and bench["hardware"]["usable_cores"] >= 1
    assert "cpu_flags" in bench["hardware"] and bench["versions"]["torch"] and bench["versions"]["onnxruntime"]
    assert bench["threads"]["intra_op"] == 1 and bench["devices"] == ["cpu"]
    arts = {a["name"]: a for a in bench["artifacts"]}
    assert arts["student"]["score"] == 0.88 and arts["teacher"]["score"] == 0.90 and arts["student"]["stage"] == "distill"
    assert arts["student"]["lineage"][-1]["stage"] == "finetune"
    assert arts["bert-base-torch-fp32"]["baseline"] == "torch_fp32" and arts["bert-base-ort-int8"]["baseline"] == "ort_int8"
    assert arts["bert-base-ort-int8"]["format"] == "onnx" and arts["bert-base-ort-int8"]["precision"] == "int8"
    assert arts["bert-base-torch-fp32"]["score"] is None
    assert 0 < arts["student"]["model_bytes"] < arts["teacher"]["model_bytes"] < arts["bert-base-torch-fp32"]["model_bytes"]
    assert arts["student"]["size_bytes"] > arts["student"]["model_bytes"]  # the tokenizer files count in the folder
    assert 0 < arts["student"]["num_parameters"] < arts["teacher"]["num_parameters"]
    for a in arts.values():
        cs = a["cold_start"]["cpu"]
        assert cs["load_s"] > 0 and cs["first_inference_s"] > 0 and cs["peak_rss_delta_mb"] >= 0

    rows = bench["results"]
    assert len(rows) == 4 * 2  # every artifact at every grid point
    for r in rows:
        assert r["iters"] == len(r["samples_ms"]) >= 3
        assert sum(r["samples_ms"]) >= 50 * 0.99  # min_seconds of measured time
        assert 0 < r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["throughput_seq_s"] == pytest.approx(r["batch_size"] * 1000 / r["mean_ms"], rel=1e-3)
    providers = {r["artifact"]: r["provider"] for r in rows}
    assert providers["bert-base-ort-int8"] == "CPUExecutionProvider" and providers["student"] == "torch:cpu"
    assert read_bench(models["root"] / "bench.json")["results"][0]["samples_ms"]


def test_bench_skips_sequences_past_the_model_and_rejects_bad_input(models, tmp_path):
    result = benchmark_artifacts([models["student"]], BenchConfig(batch_sizes=[1], seq_lens=[16, 256], **FAST), progress=False)
    assert [r["seq_len"] for r in result["results"]] == [16]
    assert result["skipped"][0]["seq_len"] == 256 and "max_position_embeddings" in result["skipped"][0]["reason"]
    with pytest.raises(BertforgeError, match="not an artifact folder"):
        benchmark_artifacts([tmp_path / "missing"], BenchConfig(**FAST))
    with pytest.raises(BertforgeError, match="unique"):
        benchmark_artifacts([f"a={models['student']}", f"a={models['teacher']}"], BenchConfig(**FAST))
    with pytest.raises(BertforgeError):
        BenchConfig(batch_sizes=[0])


@pytest.mark.slow
def test_cold_start_in_a_fresh_process(models):
    cs = cold_start_subprocess(models["ort_int8"], "cpu", 1, "int8", 32)
    assert cs["load_s"] > 0 and cs["first_inference_s"] > 0 and cs["import_s"] > 0 and cs["peak_rss_delta_mb"] > 0


def test_report_ratios_and_files(bench, models, tmp_path):
    rep = build_report(bench, tmp_path, ReportConfig(final="student"))
    for name in ("report.md", "report.html", "report.json"):
        assert (tmp_path / name).stat().st_size > 500
    saved = json.loads((tmp_path / "report.json").read_text())
    assert set(saved["ratios"]) >= {"latency_b1_vs_bert_base_torch_fp32", "latency_b1_vs_bert_base_ort_int8", "size_vs_bert_base_fp32"}
    assert saved["final"] == "student" and saved["final_score"] == 0.88
    assert saved["teacher"] == "teacher" and saved["teacher_score"] == 0.90
    p50 = {(r["artifact"], r["batch_size"]): r["p50_ms"] for r in bench["results"]}
    size = {a["name"]: a["model_bytes"] for a in bench["artifacts"]}
    r = saved["ratios"]
    assert r["latency_b1_vs_bert_base_torch_fp32"] == pytest.approx(p50[("bert-base-torch-fp32", 1)] / p50[("student", 1)], rel=0.01)
    assert r["latency_b1_vs_bert_base_ort_int8"] == pytest.approx(p50[("bert-base-ort-int8", 1)] / p50[("student", 1)], rel=0.01)
    assert r["size_vs_bert_base_fp32"] == pytest.approx(size["bert-base-torch-fp32"] / size["student"], rel=0.01)
    assert r["size_vs_bert_base_fp32"] > 1
    assert r["score_retained_vs_teacher"] == pytest.approx(0.88 / 0.90, abs=0.01)
    student = next(h for h in saved["headline"] if h["artifact"] == "student")
    assert student["delta_vs_teacher"] == pytest.approx(-0.02) and student["role"] == "final"
    assert len(saved["latency_table"]) == 8 and "samples_ms" not in saved["latency_table"][0]
    assert rep["baseline_shape_only"] and "hidden 64" in rep["baseline_shape"]

    md = (tmp_path / "report.md").read_text()
    assert "| Artifact | Format | Precision | Dev score |" in md and "**student** (final)" in md
    # the first screen is the decision: the final artifact, its ratios and the command that serves it
    serve = f"bertforge serve --model {shlex.quote(str(models['student']))}"
    assert md.startswith("# bertforge report\n\n## Final artifact: `student`")
    assert md.index("97.8%") < md.index(serve) < md.index("## Headline")
    assert f"{r['size_vs_bert_base_fp32']:.1f}×" in md[:md.index(serve)]
    assert "shape only" in md and "## Lineage" in md and "finetune `teacher` (90.00)" in md
    page = (tmp_path / "report.html").read_text()
    assert page.index('id="decision"') < page.index(serve) < page.index("<table")
    assert page.count("<svg") == 4 and "<script" not in page
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # self-contained: nothing fetched
    for plot in ("accuracy_latency", "size", "latency_distribution", "throughput"):
        assert f'id="plot-{plot}"' in page


def test_report_grades_only_against_the_targets_it_is_given(bench, tmp_path):
    rep = build_report(bench, tmp_path / "plain", ReportConfig(final="student"))
    assert rep["targets"] == {}
    assert "target" not in (tmp_path / "plain" / "report.md").read_text()
    assert "target" not in (tmp_path / "plain" / "report.html").read_text()

    targets = {"size_vs_bert_base_fp32": 1.0, "score_retained_vs_teacher": 0.99}  # 0.88 / 0.90 keeps 97.8%
    rep = build_report(bench, tmp_path / "graded", ReportConfig(final="student", targets=targets))
    assert rep["targets"]["size_vs_bert_base_fp32"]["met"] and not rep["targets"]["score_retained_vs_teacher"]["met"]
    md = (tmp_path / "graded" / "report.md").read_text()
    assert "1 of 2 targets met" in md and "(target ≥ 99%: missed)" in md and "(target ≥ 1×: met)" in md
    assert json.loads((tmp_path / "graded" / "report.json").read_text())["targets"]["score_retained_vs_teacher"]["target"] == 0.99
    with pytest.raises(BertforgeError, match="unknown report target 'speed'"):
        build_report(bench, tmp_path / "bad", ReportConfig(targets={"speed": 2.0}))


def test_report_serving_section_from_load_test_sweeps(bench, tmp_path):
    """`--loadtest`: one row per endpoint, the p99 plot, in both formats; a missing sweep is one clear error."""
    steps = [{"model": "student", "mode": "fixed-rate", "protocol": "bertforge", "slo_ms": 100, "target_rps": r,
              "rps": r, "p50_ms": 5 + r / 10, "p99_ms": 20 + r, "failures": 0, "knee": r == 60}
             for r in (20, 40, 60, 120)]
    sweep = tmp_path / "serving.json"
    sweep.write_text(json.dumps(steps))
    rep = build_report(bench, tmp_path / "r", ReportConfig(final="student", loadtest=[str(sweep)]))
    assert [row[0] for row in rep["serving"]["rows"]] == ["student"]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Serving under load" in md and "| student | bertforge |" in md
    assert 'id="plot-serving_p99"' in (tmp_path / "r" / "report.html").read_text()
    with pytest.raises(BertforgeError, match="no sweep.json"):
        build_report(bench, tmp_path / "bad", ReportConfig(loadtest=[str(tmp_path / "nothing")]))


def test_report_defaults_final_to_last_and_finds_teacher_in_lineage(bench, tmp_path):
    without_teacher = {**bench, "artifacts": [a for a in bench["artifacts"] if a["name"] != "teacher"],
                       "results": [r for r in bench["results"] if r["artifact"] != "teacher"]}
    rep = build_report(without_teacher, tmp_path)
    assert rep["final"] == "student"  # the last artifact that is not a baseline
    assert rep["teacher"] == "teacher" and rep["teacher_score"] == 0.90  # from the student's lineage
    with pytest.raises(BertforgeError, match="not in the bench"):
        build_report(bench, tmp_path, ReportConfig(final="nope"))

    # two devices: the headline is the CPU's, each device keeps its own ratios
    slower = [{**r, "device": "cuda", "p50_ms": r["p50_ms"] * (2 if r["artifact"] == "student" else 1)} for r in bench["results"]]
    rep = build_report({**bench, "devices": ["cpu", "cuda"], "results": bench["results"] + slower}, tmp_path / "two")
    assert rep["device"] == "cpu" and set(rep["ratios_by_device"]) == {"cpu", "cuda"}
    cpu, cuda = rep["ratios_by_device"]["cpu"], rep["ratios_by_device"]["cuda"]
    assert cuda["latency_b1_vs_bert_base_torch_fp32"] == pytest.approx(cpu["latency_b1_vs_bert_base_torch_fp32"] / 2, rel=0.01)


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'profile'}", "--hide-scrollbars"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium (Debian package chromium) not installed")
def test_html_renders_with_its_plots_in_chromium(bench, tmp_path):
    import numpy as np
    from PIL import Image

    build_report(bench, tmp_path, ReportConfig(final="student"))
    page = tmp_path / "report.html"
    # the page itself has no script: a copy measures each plot once laid out, into the DOM Chromium dumps
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", "<script>document.body.dataset.plots = JSON.stringify("
                     "[...document.querySelectorAll('figure svg')].map(s => [s.getBoundingClientRect().width, "
                     "s.getBoundingClientRect().height]));</script></body>"))
    shot = tmp_path / "shot.png"
    dom = _chromium(["--window-size=1280,2400", f"--screenshot={shot}", "--dump-dom", probe.as_uri()], tmp_path).stdout
    sizes = json.loads(re.search(r'data-plots="([^"]*)"', dom).group(1).replace("&quot;", '"'))
    assert len(sizes) == 4 and all(w > 200 and h > 100 for w, h in sizes)

    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (2400, 1280)
    # the final artifact's colour (#e4572e) fills plot marks and bars, far beyond the title and the badge
    final_colour = (np.abs(pixels - [0xE4, 0x57, 0x2E]).sum(-1) < 40).sum()
    assert final_colour > 400
    assert len(np.unique(pixels.reshape(-1, 3) // 16, axis=0)) > 50  # not a blank or error page
    assert "Accuracy against latency" in dom and "student" in dom


def test_cli_bench_and_report(models, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--models", f"my-student={models['student']}", "--out", str(out), "--batch-sizes", "1",
                 "--seq-lens", "16", "--warmup", "1", "--min-iters", "3", "--min-seconds", "0.05", "--threads", "1",
                 "--cold-start", "inprocess", "--device", "cpu", "--baseline", "--baseline-dir", str(models["root"] / "baseline"),
                 "--baseline-shape", *[f"{k}={v}" for k, v in TINY_BASE.items()]])
    assert code == 0
    data = read_bench(out)
    assert [a["name"] for a in data["artifacts"]] == ["my-student", "bert-base-torch-fp32", "bert-base-ort-int8"]
    assert data["command"].startswith("bertforge bench --models my-student=") and "--baseline" in data["command"]
    # every flag given is in the record, so the command reruns the same measurement
    assert all(flag in data["command"] for flag in ("--min-seconds 0.05", "--cold-start inprocess", "--warmup 1",
                                                    "--baseline-dir", "--baseline-shape"))
    capsys.readouterr()
    assert main(["report", "--bench", str(out), "--out", str(tmp_path / "report")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["final"] == "my-student" and printed["ratios"]["latency_b1_vs_bert_base_torch_fp32"] > 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert data["command"] in md and f"bertforge report --bench {out}" in md

    assert main(["report", "--bench", str(tmp_path / "missing.json"), "--out", str(tmp_path / "r2")]) == 2
    assert main(["bench", "--models", str(tmp_path / "nope"), "--out", str(tmp_path / "b2.json")]) == 2
    assert main(["bench", "--models", str(models["student"]), "--out", str(tmp_path / "b3.json"), "--baseline",
                 "--baseline-shape", "hidden_size=big"]) == 2
