"""Fine-tuning a tiny random model end to end, exact resume after a kill, eval, and the CLI's bad inputs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_bert
from pipeline.artifacts import read_manifest, verify_files
from pipeline.cli import main
from pipeline.data import sample_data_dir
from pipeline.evaluate import evaluate
from pipeline.finetune import FinetuneConfig, finetune
from pipeline.training import LoopConfig

SAMPLE = str(sample_data_dir())


def _cfg(model, out, **loop):
    loop = {"epochs": 2, "batch_size": 8, "learning_rate": 5e-4, "checkpoint_every": 5, **loop}
    return FinetuneConfig(task="sst2", model=str(model), out=str(out), glue_dir=SAMPLE, max_train_examples=160,
                          loop=LoopConfig(**loop))


def test_loops_of_different_precision_run_in_one_process(tiny_bert, tmp_path):
    # accelerate holds one precision per process; `bertforge run` may train an fp32 stage, then a bf16 one
    for precision in ("fp32", "bf16", "fp32"):
        finetune(_cfg(tiny_bert, tmp_path / precision, epochs=1, max_steps_per_epoch=2, precision=precision),
                 progress=False)
    assert read_manifest(tmp_path / "bf16").params["loop"]["precision"] == "bf16"


def test_finetune_writes_a_loadable_artifact_with_manifest(tiny_bert, tmp_path):
    manifest = finetune(_cfg(tiny_bert, tmp_path / "ft"), progress=False)
    saved = read_manifest(tmp_path / "ft")
    assert saved.stage == "finetune" and saved.task == "sst2" and saved.parent == str(tiny_bert)
    assert set(saved.metrics["dev"]) == {"accuracy", "score"}
    assert saved.num_parameters > 0 and saved.size_bytes > 0 and saved.versions["torch"]
    assert {f["path"] for f in saved.files} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert verify_files(tmp_path / "ft") == []
    assert not (tmp_path / "ft" / "checkpoints").exists()
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    # the kept checkpoint is the best one: re-scoring it gives the manifest's figure
    rescored = evaluate(tmp_path / "ft", "sst2", SAMPLE, progress=False).metrics
    assert rescored["score"] == pytest.approx(manifest.metrics["dev"]["score"])
    # one dev evaluation per epoch is on record, and the best of them is the kept one
    history = saved.params["dev_history"]
    assert [h["step"] for h in history] == [20, 40]
    assert max(h["score"] for h in history) == pytest.approx(manifest.metrics["dev"]["score"])


def test_the_seed_fixes_the_new_head_so_the_same_command_gives_the_same_model(tiny_bert, tmp_path):
    # a pretrained encoder without a classification head (as all-MiniLM-L6-v2 is): the head is new weights
    from transformers import AutoModel, AutoTokenizer

    backbone = tmp_path / "backbone"
    AutoModel.from_pretrained(tiny_bert).save_pretrained(backbone)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(backbone)
    weights = []
    for run in ("a", "b"):
        torch.rand(7)  # the process's RNG is elsewhere for the second run, as it is in another process
        finetune(_cfg(backbone, tmp_path / run, epochs=1, max_steps_per_epoch=3), progress=False)
        weights.append(load_file(tmp_path / run / "model.safetensors"))
    assert "classifier.weight" in weights[0]
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


def test_training_reduces_the_loss(tiny_bert, tmp_path):
    from pipeline.data import Collator, EncodedDataset, load_glue
    from pipeline.models import load_classifier, load_tokenizer
    from pipeline.data import get_task

    task = get_task("sst2")
    tok = load_tokenizer(tiny_bert)
    examples = load_glue("sst2", "train", SAMPLE)[:64]
    batch = Collator(tok, False)([EncodedDataset(examples, tok, 32)[i] for i in range(64)])
    batch.pop("idx")

    def loss_of(path):
        with torch.no_grad():
            return load_classifier(path, task).eval()(**batch).loss.item()

    before = loss_of(tiny_bert)
    cfg = _cfg(tiny_bert, tmp_path / "ft", epochs=6)
    cfg.max_train_examples = 64
    finetune(cfg, progress=False)
    assert loss_of(tmp_path / "ft") < before


def _finetune_cmd(model, out, resume=False):
    code = ("import sys; sys.path.insert(0, %r); from conftest import make_tiny_bert; "
            "from pipeline.cli import main; sys.exit(main(sys.argv[1:]))") % str(Path(__file__).parent)
    args = [sys.executable, "-c", code, "finetune", "--task", "sst2", "--model", str(model), "--glue-dir", SAMPLE,
            "--out", str(out), "--max-train-examples", "240", "--epochs", "2", "--batch-size", "4",
            "--learning-rate", "5e-4", "--checkpoint-every", "20", "--threads", "1"]
    return args + (["--resume"] if resume else [])


@pytest.mark.slow
def test_resume_after_kill_gives_the_same_model(tiny_bert, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ref = subprocess.run(_finetune_cmd(tiny_bert, tmp_path / "ref"), env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]

    proc = subprocess.Popen(_finetune_cmd(tiny_bert, tmp_path / "run"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "run" / "checkpoints" / "last" / "state.pt"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists() and read_manifest(tmp_path / "run") is None, "the run was not killed mid-way"

    assert main(_finetune_cmd(tiny_bert, tmp_path / "run")[3:]) == 2  # never silently restarts over a checkpoint
    resumed = subprocess.run(_finetune_cmd(tiny_bert, tmp_path / "run", resume=True), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a = load_file(tmp_path / "ref" / "model.safetensors")
    b = load_file(tmp_path / "run" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def _cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, (err[-1] if err else "")


def test_cli_bad_inputs(tiny_bert, tmp_path, capsys):
    code, err = _cli(capsys, "eval", "--task", "imdb", "--model", str(tiny_bert), "--glue-dir", SAMPLE)
    assert code == 2 and "unknown task 'imdb'" in err
    code, err = _cli(capsys, "eval", "--task", "sst2", "--model", str(tiny_bert), "--glue-dir", str(tmp_path / "none"))
    assert code == 2 and "does not exist" in err
    code, err = _cli(capsys, "eval", "--task", "sst2", "--model", str(tmp_path), "--glue-dir", SAMPLE)
    assert code == 2 and "not a model folder" in err
    code, err = _cli(capsys, "finetune", "--task", "sst2", "--model", str(tmp_path / "missing"), "--glue-dir", SAMPLE,
                     "--out", str(tmp_path / "o"))
    assert code == 2 and "does not exist" in err
    three = make_tiny_bert(tmp_path / "three", num_labels=3, task="mnli")
    code, err = _cli(capsys, "eval", "--task", "sst2", "--model", str(three), "--glue-dir", SAMPLE)
    assert code == 2 and "label-count mismatch" in err
    code, err = _cli(capsys, "finetune", "--task", "sst2", "--model", str(three), "--glue-dir", SAMPLE,
                     "--out", str(tmp_path / "o"))
    assert code == 2 and "label-count mismatch" in err


def test_eval_remaps_a_model_with_another_label_order(tmp_path):
    """A classifier naming the task's labels in another order (MNLI from the original BERT scripts) is
    scored in the task's order, not silently mismatched."""
    from pipeline.evaluate import label_permutation
    from pipeline.data import get_task
    from transformers import BertConfig

    config = BertConfig(num_labels=3, id2label={0: "contradiction", 1: "entailment", 2: "neutral"})
    perm = label_permutation(config, get_task("mnli"))
    assert [config.id2label[i] for i in perm] == ["entailment", "neutral", "contradiction"]
    assert label_permutation(BertConfig(num_labels=2), get_task("sst2")) is None


def test_eval_records_the_dev_score_of_a_model_chosen_on_carved_rows(tmp_path, capsys):
    """A budget search's student kept its checkpoint on rows carved from train, and its manifest calls that score
    'selection': `eval --record-dev` adds the real dev score, which bench and the report read."""
    from pipeline.artifacts import Manifest, write_manifest

    folder = make_tiny_bert(tmp_path / "student")
    write_manifest(folder, Manifest(stage="distill", task="sst2", metrics={"dev": {"score": 0.123}},
                                    params={"best_dev_score": 0.123}))
    assert main(["eval", "--task", "sst2", "--model", str(folder), "--glue-dir", SAMPLE, "--record-dev"]) == 0
    manifest = read_manifest(folder)
    assert manifest.metrics["selection"] == {"score": 0.123}  # what the carved rows said, kept under its name
    assert manifest.metrics["dev"] == evaluate(folder, "sst2", SAMPLE, progress=False).metrics
    assert manifest.params["best_selection_score"] == 0.123 and "best_dev_score" not in manifest.params
    assert main(["eval", "--task", "sst2", "--model", str(folder), "--glue-dir", SAMPLE, "--record-dev"]) == 0
    assert read_manifest(folder).metrics == manifest.metrics  # recorded twice: the selection score is not overwritten
    code, err = _cli(capsys, "eval", "--task", "sst2", "--model", str(make_tiny_bert(tmp_path / "plain")),
                     "--glue-dir", SAMPLE, "--record-dev")
    assert code == 2 and "bertforge artifact" in err  # nothing to record into
