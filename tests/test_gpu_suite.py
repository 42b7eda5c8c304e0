"""The GPU suite without a GPU: its --dry-run end to end on the CPU, through the shell entry point."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_bench

ROOT = Path(__file__).resolve().parents[1]
GPU_JSON = ROOT / "benchmarks" / "results" / "gpu.json"


def gpu_json_state():
    return GPU_JSON.stat().st_mtime_ns if GPU_JSON.exists() else None


@pytest.mark.slow
def test_dry_run_runs_the_whole_flow_on_cpu(tmp_path):
    before = gpu_json_state()
    out = tmp_path / "dry.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--dry-run", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert gpu_json_state() == before  # a dry run never touches the real result
    text = out.read_text()
    result = json.loads(text)
    assert result["dry_run"] and result["complete"] and result["seed"] == 0 and result["git_commit"]
    assert result["command"] == f"bash benchmarks/gpu_suite.sh --dry-run --out {out.name}"
    assert str(tmp_path) not in text and str(ROOT) not in text  # no machine paths in results

    steps = result["steps"]
    assert all(steps[s]["status"] == "ok" for s in
               ("data", "distill", "models", "export", "fp16_check", "timing", "serving_path", "summary")), steps
    assert all(c["ok"] for c in result["checks"].values()), result["checks"]
    # the project's distillation recipe really trained: its loss fell, under bf16 autocast
    distill = steps["distill"]
    assert distill["mixed_precision"] == "bf16" and distill["loss_falls"]
    assert distill["train_loss"]["last_epoch"]["loss"] < distill["train_loss"]["first_epoch"]["loss"]
    assert steps["export"]["student"]["fused_ops"].get("Attention", 0) >= 1
    assert steps["export"]["student"]["mb_fp16"] < steps["export"]["student"]["mb_fp32"]
    assert steps["serving_path"]["sentences"] == result["config"]["dev_limit"]

    rows = result["results"]
    timed = {(r["model"], r["runtime"], r["batch_size"], r["seq_mode"]) for r in rows if r["status"] == "ok"}
    for model in ("student", "bert_base"):
        for runtime in ("torch_fp32", "torch_fp16", "torch_compile_fp16", "ort_cpu_fp32"):
            for batch in (1, 2):
                for mode in ("seq", "sst2"):
                    assert (model, runtime, batch, mode) in timed
    skipped = {(r["model"], r["runtime"]): r["reason"] for r in rows if r["status"] == "skipped"}
    for model in ("student", "bert_base"):
        for runtime in ("ort_cuda_fp32", "ort_cuda_fp16", "ort_tensorrt_fp16"):
            assert skipped[(model, runtime)] == "dry run: CPU only"
    assert all(r["p50_ms"] > 0 and r["iters"] >= 3 for r in rows if r["status"] == "ok")
    assert set(steps["summary"]["speedups"]) >= {"torch_fp32/b1", "torch_fp16/b1"}


def test_dry_run_refuses_to_write_the_real_result():
    with pytest.raises(SystemExit) as e:
        gpu_bench.main(["--dry-run", "--out", str(GPU_JSON)])
    assert e.value.code == 2


def test_spent_budget_skips_steps_and_still_writes_the_result(tmp_path):
    out = tmp_path / "r.json"
    assert gpu_bench.main(["--dry-run", "--out", str(out), "--budget-s", "1e-9"]) == 0
    result = json.loads(out.read_text())
    assert result["complete"] and result["environment"]["status"] == "skipped"
    assert result["steps"]["data"]["status"] == "skipped" and "time budget spent" in result["steps"]["data"]["reason"]


@pytest.mark.slow
def test_device_path_with_the_carried_teacher_at_tiny_sizes(tmp_path):
    """What the device machine runs (no dry run: the carried fp16 teacher, its fp32 copy, distillation
    from it), at tiny sizes on the CPU: --prepare's output must be all the suite needs."""
    import argparse

    carry = tmp_path / "carry"
    gpu_bench.prepare(carry)
    size = sum(p.stat().st_size for p in carry.rglob("*") if p.is_file())
    assert size < 50 * 2**20  # room left under the 64 MiB a device call carries
    assert (carry / "commit.txt").read_text().strip()

    cfg = gpu_bench.dry_config()
    cfg.student = {"num_hidden_layers": 2, "hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 12}
    cfg.distill_steps_per_epoch, cfg.batch_sizes, cfg.dev_limit = 6, [2], 8
    args = argparse.Namespace(dry_run=False, teacher=str(carry / "teacher"), glue_dir=None, seed=0, argv=[])
    out = tmp_path / "r.json"
    from accelerate.state import AcceleratorState

    # accelerate's state is one per process: the device machine runs the suite in a fresh one, here earlier
    # tests made theirs without bf16, so start clean and leave clean for the tests after this one
    AcceleratorState._reset_state(True)
    try:
        result = gpu_bench.Suite(args, cfg, out).run()
    finally:
        AcceleratorState._reset_state(True)
    assert json.loads(out.read_text())["complete"]
    assert result["inputs"]["teacher"]["source"] == "teacher" and result["inputs"]["teacher"]["sha256"]
    assert result["steps"]["distill"]["status"] == "ok", result["steps"]["distill"]
    assert result["checks"]["distill_loss_falls"]["ok"]
    assert result["steps"]["timing"]["status"] == "ok"
    cuda_rows = [r for r in result["results"] if r["runtime"].startswith("ort_cuda")]
    assert cuda_rows and all(r["status"] == "skipped" for r in cuda_rows)
