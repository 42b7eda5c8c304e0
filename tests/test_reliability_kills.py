"""Real SIGKILLs at seeded random moments of a training stage, resumed each time: the final weights are
byte-identical to an uninterrupted run's (the reduced form of benchmarks/reliability_kills.py)."""
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.artifacts import read_manifest, verify_files
from pipeline.data import sample_data_dir

ROOT = Path(__file__).resolve().parents[1]


def _finetune(model, out):
    return [sys.executable, "-m", "pipeline.cli", "finetune", "--task", "sst2", "--model", str(model),
            "--glue-dir", str(sample_data_dir()), "--out", str(out), "--max-train-examples", "400", "--epochs", "2",
            "--batch-size", "4", "--learning-rate", "5e-4", "--checkpoint-every", "3", "--threads", "1", "--resume"]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _digests(folder: Path) -> dict[str, str]:
    return {f["path"]: f["sha256"] for f in read_manifest(folder).files}


@pytest.mark.slow
def test_three_random_kills_during_training_change_nothing(tiny_bert, tmp_path):
    ref = subprocess.run(_finetune(tiny_bert, tmp_path / "ref"), env=_env(), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]

    out, rng, kills = tmp_path / "killed", random.Random(14), 0
    checkpoints = out / "checkpoints"
    while kills < 3:
        proc = subprocess.Popen(_finetune(tiny_bert, out), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not checkpoints.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)  # kill during training, not during the imports
        time.sleep(rng.uniform(0, 1.5))
        if proc.poll() is not None:
            assert proc.returncode == 0
            pytest.fail(f"the run finished after only {kills} kills: make it longer")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    final = subprocess.run(_finetune(tiny_bert, out), env=_env(), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-2000:]
    assert verify_files(out) == []
    assert _digests(out) == _digests(tmp_path / "ref")
    weights = [hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest() for d in (out, tmp_path / "ref")]
    assert weights[0] == weights[1]
