"""Training state survives a kill at any instant of a checkpoint's publication (issue 14, item 4).

A "kill" here is a `Killed` exception raised at one chosen file-system step while a checkpoint is
being published (every rename and folder deletion of the save, one at a time), or half-way through a
folder deletion; nothing after it runs, as with SIGKILL. Then `--resume` must continue from a
complete checkpoint (never from step 0, never with a traceback) and end with the same weights as an
uninterrupted run. Real SIGKILLs at random moments are in test_reliability_kills.py.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from pipeline.atomic import atomic_write_json, complete_candidates, publish_dir, staging_dir
from pipeline.cli import main
from pipeline.data import sample_data_dir
from pipeline.finetune import FinetuneConfig, finetune
from pipeline.training import LoopConfig, TrainLoop

SAMPLE = str(sample_data_dir())
TOTAL_STEPS = 20  # 80 rows, batch 8, 2 epochs


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no `except Exception` on the way out can swallow it."""


def _cfg(model, out):
    return FinetuneConfig(task="sst2", model=str(model), out=str(out), glue_dir=SAMPLE, max_train_examples=80,
                          loop=LoopConfig(epochs=2, batch_size=8, learning_rate=5e-4, checkpoint_every=3))


def _weights_digest(folder) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


class StepCounter:
    """Counts optimizer steps taken by TrainLoop (to tell a resume from a restart at step 0)."""

    def __init__(self, monkeypatch):
        self.steps = 0
        original = TrainLoop._train_step

        def counted(loop, batch):
            self.steps += 1
            return original(loop, batch)

        monkeypatch.setattr(TrainLoop, "_train_step", counted)


def _kill_during_checkpoint(monkeypatch, checkpoint: int, op: int, half_delete: bool = False):
    """Arm a kill at file-system step `op` (1-based: each os.replace or shutil.rmtree) of the
    `checkpoint`-th save; with `half_delete`, a deletion removes one file first, then dies."""
    calls = {"save": 0, "op": 0, "armed": False}
    original_save, real_replace, real_rmtree = TrainLoop.save_checkpoint, os.replace, shutil.rmtree

    def tick():
        calls["op"] += 1
        return calls["armed"] and calls["op"] == op

    def replace(src, dst):
        if tick():
            raise Killed(f"killed before replace {src} -> {dst}")
        return real_replace(src, dst)

    def rmtree(path, *args, **kwargs):
        if tick():
            if half_delete and os.path.isdir(path):
                files = sorted(p for p in os.listdir(path))
                if files:
                    os.remove(os.path.join(path, files[0]))
            raise Killed(f"killed while deleting {path}")
        return real_rmtree(path, *args, **kwargs)

    def save(loop):
        calls["save"] += 1
        calls["op"], calls["armed"] = 0, calls["save"] == checkpoint
        try:
            return original_save(loop)
        finally:
            calls["armed"] = False

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    monkeypatch.setattr(TrainLoop, "save_checkpoint", save)
    return calls


@pytest.fixture(scope="module")
def reference(tiny_bert, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ft"
    finetune(_cfg(tiny_bert, out), progress=False)
    return out


# Every rename and deletion of the third checkpoint's publication (the old code's three, the new
# code's six; extra numbers are harmless: the kill then never fires inside the save and is skipped).
@pytest.mark.parametrize("op,half", [(1, False), (2, False), (2, True), (3, False), (3, True), (4, False),
                                     (5, False), (6, False), (6, True)])
def test_a_kill_while_publishing_a_checkpoint_resumes_from_a_complete_one(tiny_bert, reference, tmp_path, monkeypatch,
                                                                          op, half):
    out = tmp_path / "ft"
    with monkeypatch.context() as m:
        calls = _kill_during_checkpoint(m, checkpoint=3, op=op, half_delete=half)
        try:
            finetune(_cfg(tiny_bert, out), progress=False)
        except Killed:
            pass
        else:
            pytest.skip(f"the save makes fewer than {op} file-system steps (ran {calls['op']})")
    counter = StepCounter(monkeypatch)
    finetune(_cfg(tiny_bert, out), resume=True, progress=False)
    # checkpoints 1 and 2 (steps 3 and 6) were complete before the kill in the third (step 9)
    assert counter.steps <= TOTAL_STEPS - 6, f"restarted from step {TOTAL_STEPS - counter.steps}, not from a checkpoint"
    assert _weights_digest(out) == _weights_digest(reference)
    assert not (out / "checkpoints").exists()


def _killed_run(tiny_bert, out):
    """A fine-tuning run stopped (as by a kill) right after its second checkpoint."""
    original = TrainLoop.save_checkpoint

    def save(loop):
        original(loop)
        if loop.state["global_step"] == 6:
            raise Killed()

    TrainLoop.save_checkpoint = save
    try:
        finetune(_cfg(tiny_bert, out), progress=False)
    except Killed:
        pass
    finally:
        TrainLoop.save_checkpoint = original
    assert (out / "checkpoints" / "last" / "state.pt").is_file()
    return out / "checkpoints" / "last"


def _resume_cli(tiny_bert, out, capsys):
    code = main(["finetune", "--task", "sst2", "--model", str(tiny_bert), "--glue-dir", SAMPLE, "--out", str(out),
                 "--max-train-examples", "80", "--epochs", "2", "--batch-size", "8", "--learning-rate", "5e-4",
                 "--checkpoint-every", "3", "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_a_damaged_checkpoint_is_one_line_that_says_how_to_recover(tiny_bert, tmp_path, capsys):
    last = _killed_run(tiny_bert, tmp_path / "ft")
    state = last / "state.pt"
    state.write_bytes(b"\0" * state.stat().st_size)  # same size: only loading it can tell
    code, err = _resume_cli(tiny_bert, tmp_path / "ft", capsys)
    assert code == 2, err
    assert "damaged" in err[-1] and "delete" in err[-1] and "Traceback" not in "\n".join(err)


def test_a_torn_checkpoint_without_a_complete_copy_is_one_line(tiny_bert, tmp_path, capsys):
    last = _killed_run(tiny_bert, tmp_path / "ft")
    (last / "config.json").unlink()  # what a kill half-way through deleting it leaves
    code, err = _resume_cli(tiny_bert, tmp_path / "ft", capsys)
    assert code == 2 and "delete" in err[-1] and "Traceback" not in "\n".join(err)


class _Payload:
    """A pickle that runs code when loaded: what a checkpoint from an untrusted place may carry."""

    def __reduce__(self):
        return (os.system, (f"touch {os.environ['BERTFORGE_TEST_MARKER']}",))


def test_resume_never_unpickles_code_from_a_checkpoint(tiny_bert, tmp_path, capsys, monkeypatch):
    last = _killed_run(tiny_bert, tmp_path / "ft")
    marker = tmp_path / "code-ran"
    monkeypatch.setenv("BERTFORGE_TEST_MARKER", str(marker))
    ckpt = torch.load(last / "state.pt", weights_only=True)
    ckpt["state"]["payload"] = _Payload()
    torch.save(ckpt, last / "state.pt")
    # keep the completion marker's record in step with the rewritten file
    marker_file = last / ".complete.json"
    if marker_file.exists():
        record = json.loads(marker_file.read_text())
        record["files"]["state.pt"] = (last / "state.pt").stat().st_size
        atomic_write_json(marker_file, record)
    code, err = _resume_cli(tiny_bert, tmp_path / "ft", capsys)
    assert not marker.exists(), "loading the checkpoint ran code stored in it"
    assert code == 2 and "delete" in err[-1] and "can still be loaded" not in err[-1]


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tiny_bert, tmp_path):
    import random

    import numpy as np

    last = _killed_run(tiny_bert, tmp_path / "ft")
    ckpt = torch.load(last / "state.pt", weights_only=True)  # plain tensors and numbers only
    from pipeline.training import _set_rng_state

    _set_rng_state(ckpt["rng"])
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    _set_rng_state(ckpt["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_publish_dir_keeps_one_complete_copy_at_every_step(tmp_path, monkeypatch):
    dst = tmp_path / "last"
    for version in ("one", "two"):
        tmp = staging_dir(dst)
        (tmp / "data").write_text(version * 1000)
        publish_dir(tmp, dst)
    real_replace = os.replace
    for kill_at in (1, 2, 3):
        n = {"i": 0}

        def replace(src, d, kill_at=kill_at):
            n["i"] += 1
            if n["i"] == kill_at:
                raise Killed()
            return real_replace(src, d)

        tmp = staging_dir(dst)
        (tmp / "data").write_text("three" * 1000)
        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(Killed):
            publish_dir(tmp, dst)
        monkeypatch.setattr(os, "replace", real_replace)
        newest = complete_candidates(dst)[0]
        assert (newest / "data").read_text() in ("two" * 1000, "three" * 1000)
    tmp = staging_dir(dst)  # and the next publication tidies up after the kills
    (tmp / "data").write_text("four")
    publish_dir(tmp, dst)
    assert complete_candidates(dst) == [dst] and (dst / "data").read_text() == "four"


def _writer_script(target: str, kind: str) -> str:
    return f"""
import sys, json
sys.path.insert(0, {os.getcwd()!r})
from pathlib import Path
big = {{"rows": [{{"i": i, "text": "x" * 200}} for i in range(20000)]}}
i = 0
if {kind!r} == "ledger":
    from pipeline.run import Run, RunConfig
    run = Run(RunConfig(out={target!r}), progress=False)
    while True:
        run.ledger = {{"n": i, **big}}
        run._save_ledger()
        i += 1
else:
    from pipeline.bench import write_bench
    while True:
        write_bench({{"n": i, **big}}, Path({target!r}) / "bench.json")
        i += 1
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ledger", "bench"])
def test_stages_json_and_bench_json_are_never_seen_half_written(tmp_path, kind):
    """A reader (the next `bertforge run`, the report) polling while a writer rewrites the file again and
    again, then kills it: every read parses (in-place writes show an empty or half file now and then)."""
    name = "stages.json" if kind == "ledger" else "bench.json"
    target = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _writer_script(str(target), kind)])
    try:
        deadline = time.time() + 120
        while not (target / name).exists() and time.time() < deadline:
            time.sleep(0.01)
        reads, end = 0, time.time() + 3
        while time.time() < end:
            data = json.loads((target / name).read_text())
            assert len(data["rows"]) == 20000
            reads += 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert json.loads((target / name).read_text())["rows"] and reads > 10
