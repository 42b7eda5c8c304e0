"""Execution-provider selection and the errors when a GPU is asked for and absent (no GPU needed:
the provider lists are given, or the tests run where this machine has no CUDA)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from pipeline.errors import BertforgeError
from pipeline.providers import (CPU_EP, CUDA_EP, TENSORRT_EP, BoundRunner, check_placement, parse_device,
                                provider_name, select_providers, torch_device)

ROOT = Path(__file__).resolve().parents[1]
CPU_ONLY = [CPU_EP]
WITH_CUDA = [CUDA_EP, CPU_EP]
WITH_TRT = [TENSORRT_EP, CUDA_EP, CPU_EP]
no_ort_cuda = pytest.mark.skipif(CUDA_EP in ort.get_available_providers(), reason="this onnxruntime has CUDA")
no_torch_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a GPU here")


def names(providers):
    return [provider_name(p) for p in providers]


def test_auto_takes_cuda_when_present_and_falls_back_to_cpu_otherwise():
    assert names(select_providers("auto", WITH_CUDA)) == [CUDA_EP, CPU_EP]
    assert names(select_providers("auto", CPU_ONLY)) == [CPU_EP]
    assert names(select_providers("auto", WITH_TRT)) == [CUDA_EP, CPU_EP]  # TensorRT only when asked for


def test_explicit_choices_keep_cpu_last_and_carry_the_device_index():
    assert select_providers("cpu", WITH_TRT) == [CPU_EP]
    assert select_providers("cuda:1", WITH_CUDA) == [(CUDA_EP, {"device_id": 1}), CPU_EP]
    assert names(select_providers("tensorrt", WITH_TRT)) == [TENSORRT_EP, CUDA_EP, CPU_EP]
    assert names(select_providers("tensorrt", [TENSORRT_EP, CPU_EP])) == [TENSORRT_EP, CPU_EP]


def test_a_gpu_asked_for_and_absent_is_a_clear_error():
    with pytest.raises(BertforgeError, match="device cuda requested but onnxruntime has no CUDAExecutionProvider.*onnxruntime-gpu"):
        select_providers("cuda", CPU_ONLY)
    with pytest.raises(BertforgeError, match="no TensorrtExecutionProvider"):
        select_providers("tensorrt", WITH_CUDA)


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cpu:1", "", "tpu"])
def test_unknown_devices_are_refused(bad):
    with pytest.raises(BertforgeError, match="device must be one of"):
        parse_device(bad)


def test_providers_module_does_not_import_torch():
    code = "import sys, pipeline.providers; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


@no_torch_cuda
def test_torch_device_errors_without_a_gpu_and_auto_falls_back():
    assert torch_device("auto") == "cpu" and torch_device("cpu") == "cpu"
    with pytest.raises(BertforgeError, match="device cuda requested but torch sees no CUDA device"):
        torch_device("cuda")
    with pytest.raises(BertforgeError, match="ONNX Runtime provider"):
        torch_device("tensorrt")


@no_ort_cuda
def test_ort_classifier_refuses_cuda_instead_of_running_on_cpu(tiny_onnx):
    from pipeline.inference import OrtClassifier

    with pytest.raises(BertforgeError, match="no CUDAExecutionProvider"):
        OrtClassifier(str(tiny_onnx), device="cuda")
    runtime = OrtClassifier(str(tiny_onnx), device="auto")  # falls back, and says so
    assert runtime.session.get_providers()[0] == CPU_EP and not runtime.run.gpu


def test_bound_runner_on_cpu_gives_the_session_outputs(tiny_onnx):
    session = ort.InferenceSession(str(tiny_onnx / "model.onnx"), providers=[CPU_EP])
    runner = BoundRunner(session)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 2000, size=(3, 9), dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    feed = {k: v for k, v in feed.items() if k in runner.input_names}
    np.testing.assert_array_equal(runner(feed)[0], session.run(None, feed)[0])
    assert runner(feed)[0].shape == (3, 2)


def test_a_session_that_fell_back_to_cpu_is_refused_for_a_gpu_device(tiny_onnx):
    session = ort.InferenceSession(str(tiny_onnx / "model.onnx"), providers=[CPU_EP])
    check_placement(session, "cpu")
    check_placement(session, "auto")
    for device in ("cuda", "cuda:1", "tensorrt"):
        with pytest.raises(BertforgeError, match=f"device {device} requested but onnxruntime could not start"):
            check_placement(session, device)


@no_ort_cuda
def test_bench_reports_an_onnx_artifact_on_missing_cuda_as_skipped():
    from pipeline.bench import unsupported

    reason = unsupported({"format": "onnx", "precision": "fp32"}, "cuda")
    assert reason and "onnxruntime-gpu" in reason


@no_torch_cuda
def test_bench_cuda_without_gpu_is_an_error():
    from pipeline.bench import resolve_devices

    assert resolve_devices("auto") == ["cpu"]
    with pytest.raises(BertforgeError, match="torch sees no CUDA device"):
        resolve_devices("cuda")


@pytest.mark.slow
@no_ort_cuda
@pytest.mark.parametrize("fmt", ["onnx", "pytorch"])
def test_serve_device_cuda_without_gpu_exits_2_with_one_line(fmt, tiny_bert, tiny_onnx):
    model = tiny_onnx if fmt == "onnx" else tiny_bert
    if fmt == "pytorch" and torch.cuda.is_available():
        pytest.skip("torch sees a GPU here")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "serve", "--model", str(model), "--device", "cuda",
                           "--port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("bertforge serve: error: device cuda requested but")


@pytest.fixture(scope="module")
def tiny_onnx(tiny_bert, tmp_path_factory):
    """The tiny model exported to a plain ONNX folder (no optimum: torch's exporter, as the GPU suite does)."""
    from benchmarks.gpu_bench import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "tiny"
    export_onnx(tiny_bert, out)
    return out
