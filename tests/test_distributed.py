"""Two CPU processes (gloo) started by `accelerate launch` end the shared training loop with identical weights:
the loop averages gradients itself, so a missed or unequal all-reduce would show here as diverged ranks or a hang."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_end_with_identical_weights(tiny_bert, tmp_path):
    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.is_file():
        pytest.skip("accelerate launcher not installed")
    # `--cpu` would start a single process (accelerate's simple launcher); `--multi_gpu` starts torchrun, and
    # TrainLoop's Accelerator(cpu=True) then joins the two processes over gloo.
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(ROOT / "tests" / "distributed_worker.py"), str(tiny_bert), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4  # 5 batches: 2 steps per process and epoch, 2 epochs
    initial = AutoModelForSequenceClassification.from_pretrained(tiny_bert).state_dict()
    moved = False
    for name, w0 in ranks[0]["state"].items():
        torch.testing.assert_close(w0, ranks[1]["state"][name], rtol=0, atol=1e-6, msg=name)
        moved = moved or not torch.equal(w0, initial[name])
    assert moved, "no weight changed: the loop did not train"
