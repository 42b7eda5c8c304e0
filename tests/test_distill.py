"""TinyBERT distillation end to end on tiny random models: general and task stages, the baselines,
student initialisation, resume after a kill, and the CLI's errors."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertForSequenceClassification

from conftest import make_tiny_bert
from pipeline.artifacts import read_manifest, verify_files
from pipeline.cli import main
from pipeline.data import Collator, EncodedDataset, get_task, load_glue, sample_data_dir
from pipeline.distill import distill
from pipeline.distill.capture import ScoreCapture, run_with_internals
from pipeline.distill.config import DistillConfig, LossWeights
from pipeline.distill.losses import prediction_loss, transformer_loss
from pipeline.distill.students import StudentSpec, build_student, student_from_teacher_layers
from pipeline.evaluate import evaluate
from pipeline.training import LoopConfig, seed_everything

VOCAB = 30522  # the uncased BERT vocabulary of make_tiny_bert's tokenizer


@pytest.fixture(scope="module")
def small_glue(tmp_path_factory) -> Path:
    """SST-2 cut down from the bundled sample: dev evaluation every epoch stays cheap."""
    folder = tmp_path_factory.mktemp("glue")
    (folder / "SST-2").mkdir()
    for split, rows in (("train", 160), ("dev", 64)):
        lines = (sample_data_dir() / "SST-2" / f"{split}.tsv").read_text().splitlines()
        (folder / "SST-2" / f"{split}.tsv").write_text("\n".join(lines[:rows + 1]) + "\n")
    return folder


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A 4-layer SST-2 'teacher' whose head is scaled up so that its predictions are far from uniform."""
    path = make_tiny_bert(tmp_path_factory.mktemp("teacher") / "t", layers=4, hidden=32, heads=4, seed=1)
    model = BertForSequenceClassification.from_pretrained(path)
    with torch.no_grad():
        model.classifier.weight.mul_(100)
    model.save_pretrained(path)
    return path


def student_json(folder: Path, hidden: int, heads: int, layers: int = 2, vocab: int = VOCAB) -> str:
    path = folder / f"student-{hidden}-{heads}-{layers}-{vocab}.json"
    BertConfig(vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
               intermediate_size=2 * hidden, max_position_embeddings=128).to_json_file(path)
    return str(path)


def a_batch(tokenizer, n=16, max_length=64):
    examples = load_glue("sst2", "dev", sample_data_dir())[:n]
    batch = Collator(tokenizer, False)([EncodedDataset(examples, tokenizer, max_length)[i] for i in range(n)])
    batch.pop("idx")
    batch.pop("labels")
    return batch


def intermediate_losses(student, teacher, batch, mapping):
    ident = torch.nn.Identity()
    with torch.no_grad(), ScoreCapture(student) as s_cap, ScoreCapture(teacher, mapping) as t_cap:
        s = run_with_internals(student, batch, s_cap, logits=False)
        t = run_with_internals(teacher, batch, t_cap, logits=False)
        return transformer_loss(s, t, mapping, ident, ident, batch["attention_mask"], LossWeights())


def quick_loop(epochs=3, lr=1e-3, **kw) -> LoopConfig:
    return LoopConfig(epochs=epochs, batch_size=16, learning_rate=lr, warmup_ratio=0.0, **kw)


# -- general distillation ------------------------------------------------------------------------
def test_general_distillation_reduces_intermediate_losses(teacher, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(ex.text_a for ex in load_glue("sst2", "train", sample_data_dir())[:64]) + "\n")
    spec = StudentSpec(config=student_json(tmp_path, hidden=32, heads=2))  # same width: identity projections
    cfg = DistillConfig(stage="general", teacher=str(teacher), out=str(tmp_path / "general"), student=spec,
                        corpus=str(corpus), loop=quick_loop(epochs=3), max_length=32)
    manifest = distill(cfg, progress=False)

    t_model = AutoModel.from_pretrained(teacher).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    seed_everything(cfg.loop.seed)  # the recipe's random student, rebuilt
    before_model = build_student(spec, t_model, tokenizer, None).eval()
    after_model = AutoModel.from_pretrained(cfg.out).eval()
    batch = a_batch(tokenizer)
    before = intermediate_losses(before_model, t_model, batch, [2, 4])
    after = intermediate_losses(after_model, t_model, batch, [2, 4])
    for part in ("loss", "embedding", "hidden", "attention"):
        assert after[part] < 0.8 * before[part], part
    assert manifest.stage == "distill" and manifest.task is None
    assert manifest.params["layer_mapping"] == [2, 4] and manifest.params["stage"] == "general"
    assert manifest.params["train_loss"]["last_epoch"]["loss"] < manifest.params["train_loss"]["first_epoch"]["loss"]
    assert type(after_model).__name__ == "BertModel" and not (Path(cfg.out) / "checkpoints").exists()


# -- task distillation ---------------------------------------------------------------------------
def test_task_distillation_two_steps_and_plain_reload(teacher, small_glue, tmp_path):
    # Narrower than the teacher (learned projections) and with other head counts (head-averaged maps).
    spec = StudentSpec(config=student_json(tmp_path, hidden=16, heads=2))
    cfg = DistillConfig(stage="task", teacher=str(teacher), out=str(tmp_path / "task"), task="sst2", glue_dir=str(small_glue),
                        student=spec, max_train_examples=64, intermediate_epochs=4, intermediate_lr=2e-3,
                        prediction_epochs=4, prediction_lr=2e-3, loop=quick_loop())
    manifest = distill(cfg, progress=False)

    losses = manifest.params["train_loss"]
    for step in ("intermediate", "prediction"):
        assert losses[step]["last_epoch"]["loss"] < losses[step]["first_epoch"]["loss"], step
    assert manifest.params["layer_mapping"] == [2, 4]
    assert manifest.params["schedule"]["intermediate"]["epochs"] == 4
    assert manifest.params["schedule"]["prediction"]["learning_rate"] == 2e-3
    assert manifest.params["method"] == "tinybert" and manifest.parent == str(teacher)
    assert manifest.lineage[-1]["path"] == str(teacher)

    # A plain transformers classifier with the task's labels and nothing of the projections.
    reloaded = BertForSequenceClassification.from_pretrained(cfg.out).eval()
    assert reloaded.config.id2label == {0: "negative", 1: "positive"} and reloaded.config.hidden_size == 16
    assert set(reloaded.state_dict()) == set(BertForSequenceClassification(reloaded.config).state_dict())
    assert verify_files(cfg.out) == [] and not (Path(cfg.out) / "checkpoints").exists()
    # Its dev predictions are the ones the recipe scored.
    again = evaluate(cfg.out, "sst2", small_glue, progress=False).metrics
    assert again == pytest.approx(manifest.metrics["dev"])

    # The student moved towards the teacher's predictions.
    t_model = BertForSequenceClassification.from_pretrained(teacher).eval()
    batch = a_batch(AutoTokenizer.from_pretrained(cfg.out), n=32)
    seed_everything(cfg.loop.seed)
    initial = build_student(spec, t_model, None, get_task("sst2")).eval()
    with torch.no_grad():
        t_logits = t_model(**batch).logits
        before = prediction_loss(initial(**batch).logits, t_logits)
        after = prediction_loss(reloaded(**batch).logits, t_logits)
    assert after < before


def test_teacher_cache_gives_the_live_values_and_skips_the_teacher(teacher):
    from pipeline.distill.common import TeacherInternals

    t_model = BertForSequenceClassification.from_pretrained(teacher).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    data = EncodedDataset(load_glue("sst2", "dev", sample_data_dir())[:12], tokenizer, 64)
    calls = []
    t_model.bert.embeddings.register_forward_hook(lambda *a: calls.append(1))

    def batch_of(rows):
        batch = Collator(tokenizer, False)([data[i] for i in rows])
        batch.pop("labels")
        return batch, batch.pop("idx")

    live = TeacherInternals(t_model, [2, 4], 0)(*batch_of(range(12)))  # budget 0: fp32 outputs, as before
    cache = TeacherInternals(t_model, [2, 4], 64)
    first = cache(*batch_of(range(12)))
    assert len(calls) == 2 and len(cache.store) == 12 and cache.used > 0
    assert first.hidden_states[1] is None and set(first.scores) == {2, 4}
    # Another grouping of the same rows (another padded length): served from the store, the teacher idle.
    order = [7, 3, 11]
    batch, idx = batch_of(order)
    again = cache(batch, idx)
    assert len(calls) == 2
    for row, i in enumerate(order):
        real = int(batch["attention_mask"][row].sum())
        for n in (0, 2, 4):
            assert torch.equal(again.hidden_states[n][row, :real], first.hidden_states[n][i, :real])
            # stored in fp16: within half precision of the live fp32 values
            torch.testing.assert_close(first.hidden_states[n][i, :real], live.hidden_states[n][i, :real],
                                       rtol=2e-3, atol=2e-3)
        for n in (2, 4):
            assert torch.equal(again.scores[n][row, :, :real, :real], first.scores[n][i, :, :real, :real])
    # Over the budget: nothing stored, the same (fp16-rounded) values returned.
    full = TeacherInternals(t_model, [2, 4], 64)
    full.budget = 1
    over = full(batch, idx)
    assert full.store == {} and all(torch.equal(over.hidden_states[n], again.hidden_states[n]) for n in (0, 2, 4))


def test_paper_schedule_is_the_default(teacher, tmp_path):
    from pipeline.distill.transformer import task_schedule

    cfg = DistillConfig(stage="task", teacher="t", out="o")
    expected = {"cola": 50, "mnli": 10, "qqp": 10, "qnli": 10, "sst2": 20, "mrpc": 20, "stsb": 20, "rte": 20}
    for task, epochs in expected.items():
        s = task_schedule(cfg, get_task(task))
        assert (s["intermediate"].epochs, s["intermediate"].learning_rate) == (epochs, 5e-5)
        assert (s["prediction"].epochs, s["prediction"].learning_rate, s["prediction"].batch_size) == (3, 3e-5, 32)
    assert get_task("sst2").default_max_length == 64 and get_task("mrpc").default_max_length == 128
    cfg.intermediate_epochs = 2
    assert task_schedule(cfg, get_task("cola"))["intermediate"].epochs == 2


def test_student_from_teacher_layers_copies_them(teacher):
    t_model = BertForSequenceClassification.from_pretrained(teacher)
    student = student_from_teacher_layers(t_model, "2", get_task("sst2"))  # uniform: teacher layers 2 and 4
    assert student.config.num_hidden_layers == 2
    for s_layer, t_layer in ((0, 1), (1, 3)):
        s_state = student.bert.encoder.layer[s_layer].state_dict()
        t_state = t_model.bert.encoder.layer[t_layer].state_dict()
        assert all(torch.equal(s_state[k], t_state[k]) for k in t_state)
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, t_model.bert.embeddings.word_embeddings.weight)
    assert torch.equal(student.classifier.weight, t_model.classifier.weight)
    explicit = student_from_teacher_layers(t_model, "1,3,4", get_task("sst2"))
    assert torch.equal(explicit.bert.encoder.layer[2].output.dense.weight, t_model.bert.encoder.layer[3].output.dense.weight)


@pytest.mark.parametrize("method", ["pred-only", "labels-only"])
def test_baseline_methods(teacher, small_glue, tmp_path, method):
    out = tmp_path / method
    rc = main(["distill", "--stage", "task", "--method", method, "--teacher", str(teacher), "--task", "sst2",
               "--glue-dir", str(small_glue), "--init-from-teacher", "2", "--out", str(out), "--max-train-examples", "32",
               "--prediction-epochs", "1", "--batch-size", "16"])
    assert rc == 0
    manifest = read_manifest(out)
    assert manifest.params["method"] == method and manifest.params["layer_mapping"] is None
    assert list(manifest.params["schedule"]) == ["prediction" if method == "pred-only" else "labels"]
    assert manifest.params["student"]["teacher_layers"] == [2, 4]
    assert 0 <= manifest.metrics["dev"]["score"] <= 1
    assert BertForSequenceClassification.from_pretrained(out).config.num_hidden_layers == 2


def test_regression_task_uses_mse_to_the_teacher(tmp_path, glue_dir):
    small = tmp_path / "glue"
    (small / "STS-B").mkdir(parents=True)
    for split in ("train", "dev"):
        lines = (glue_dir / "STS-B" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
        (small / "STS-B" / f"{split}.tsv").write_text("\n".join(lines[:65]) + "\n", encoding="utf-8")
    t = make_tiny_bert(tmp_path / "stsb-teacher", num_labels=1, task="stsb")
    cfg = DistillConfig(stage="task", method="pred-only", teacher=str(t), out=str(tmp_path / "s"), task="stsb",
                        glue_dir=str(small), student=StudentSpec(init_from_teacher="1"), max_train_examples=32,
                        prediction_epochs=1, loop=quick_loop(epochs=1))
    manifest = distill(cfg, progress=False)
    assert "pearson" in manifest.metrics["dev"]
    assert manifest.params["train_loss"]["prediction"]["first_epoch"]["prediction"] >= 0


# -- resume --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_continues_a_killed_run(teacher, small_glue, tmp_path):
    args = ["distill", "--stage", "task", "--teacher", str(teacher), "--task", "sst2", "--glue-dir", str(small_glue),
            "--student-config", student_json(tmp_path, hidden=16, heads=2), "--max-train-examples", "64",
            "--batch-size", "16", "--intermediate-epochs", "2", "--prediction-epochs", "1",
            "--max-steps-per-epoch", "3", "--checkpoint-every", "1"]
    reference = tmp_path / "uninterrupted"
    assert main([*args, "--out", str(reference)]) == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args, "--out", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_checkpoint = killed / "checkpoints" / "intermediate" / "checkpoints" / "last" / "state.pt"
    deadline = time.time() + 300
    while not first_checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first_checkpoint.exists() and read_manifest(killed) is None, "the run must be killed mid-way"

    assert main([*args, "--out", str(killed)]) == 2  # an unfinished run is not silently restarted
    assert main([*args, "--out", str(killed), "--resume"]) == 0
    assert verify_files(killed) == [] and not (killed / "checkpoints").exists()
    a = BertForSequenceClassification.from_pretrained(reference).state_dict()
    b = BertForSequenceClassification.from_pretrained(killed).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert read_manifest(killed).metrics["dev"] == pytest.approx(read_manifest(reference).metrics["dev"])


# -- bad input -----------------------------------------------------------------------------------
def _cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("bertforge distill: error:")
    return err


def test_cli_errors(teacher, small_glue, tmp_path, capsys):
    base = ["distill", "--stage", "task", "--teacher", str(teacher), "--task", "sst2", "--glue-dir", str(small_glue),
            "--out", str(tmp_path / "x"), "--max-train-examples", "8"]
    assert "vocabularies differ" in _cli_error(capsys, [*base, "--student-config", student_json(tmp_path, 16, 2, vocab=1000)])
    assert "impossible layer mapping" in _cli_error(capsys, [*base, "--student-config", student_json(tmp_path, 16, 2), "--mapping", "3,3"])
    assert "impossible layer mapping" in _cli_error(capsys, [*base, "--student-config", student_json(tmp_path, 16, 2, layers=6)])
    assert "impossible layer mapping" in _cli_error(capsys, [*base, "--init-from-teacher", "1,5"])
    assert "choose one student" in _cli_error(capsys, base)
    assert "unknown student config" in _cli_error(capsys, [*base, "--student-config", "tinybert-9l"])
    assert "task-stage method" in _cli_error(capsys, ["distill", "--stage", "general", "--method", "pred-only",
                                                       "--teacher", str(teacher), "--out", str(tmp_path / "y")])
    assert "corpus" in _cli_error(capsys, ["distill", "--stage", "general", "--teacher", str(teacher),
                                             "--student-config", "tinybert-4l-312d", "--out", str(tmp_path / "z")])
