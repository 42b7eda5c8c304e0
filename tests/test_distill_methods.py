"""The other distillation methods: soft-label KD, BERT-of-Theseus and difficulty weighting. Their
formulas against direct computations, and each trains a few steps into a loadable plain classifier."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertForSequenceClassification

from conftest import make_tiny_bert
from pipeline.artifacts import read_manifest
from pipeline.cli import main
from pipeline.data import sample_data_dir
from pipeline.distill import distill
from pipeline.distill.config import DistillConfig
from pipeline.distill.difficulty import difficulty_loss, difficulty_weights
from pipeline.distill.kd import kd_loss
from pipeline.distill.config import TheseusOptions
from pipeline.distill.theseus import TheseusModel, module_groups, replacing_rate
from pipeline.errors import BertforgeError
from pipeline.training import LoopConfig

SAMPLE = str(sample_data_dir())


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("teacher") / "t4", layers=4, seed=1)


def _cfg(teacher, out, method, **kw):
    loop = LoopConfig(epochs=1, batch_size=8, learning_rate=1e-3, max_steps_per_epoch=3, checkpoint_every=0)
    return DistillConfig(stage="task", teacher=str(teacher), out=str(out), method=method, task="sst2", glue_dir=SAMPLE,
                         max_train_examples=48, loop=loop, **kw)


def test_theseus_schedule():
    opts = TheseusOptions()
    assert replacing_rate(0, opts) == pytest.approx(0.3)
    assert replacing_rate(500, opts) == pytest.approx(0.6)
    assert replacing_rate(1000, opts) == pytest.approx(0.9)
    assert replacing_rate(1167, opts) == 1.0 and replacing_rate(10_000, opts) == 1.0
    assert replacing_rate(1166, opts) < 1.0
    assert replacing_rate(123, TheseusOptions(replacing_rate=0.5)) == 0.5
    assert module_groups(12, 4) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert module_groups(6, 3) == [[0, 1], [2, 3], [4, 5]]


def test_theseus_mixes_modules_and_yields_the_successor_model(teacher):
    model = BertForSequenceClassification.from_pretrained(teacher)
    theseus = TheseusModel(model, [1, 2])
    batch = {"input_ids": torch.tensor([[101, 2307, 3185, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    theseus.train()
    for rate, expect in ((0.0, 4), (1.0, 2)):
        theseus.rate = rate
        assert len(theseus.chosen_layers()) == expect
    theseus.rate = 0.5
    torch.manual_seed(0)
    counts = {len(theseus.chosen_layers()) for _ in range(50)}
    assert counts == {2, 3, 4}  # each module replaced independently
    theseus.eval()
    student = theseus.successor_model().eval()
    assert student.config.num_hidden_layers == 2
    assert torch.allclose(theseus(**batch).logits, student(**batch).logits, atol=1e-6)
    assert all(not p.requires_grad for p in theseus.predecessor.parameters())
    assert all(p.requires_grad for p in theseus.successor.parameters())
    assert {k.split(".")[0] for k in theseus.state_dict()} == {"model", "predecessor", "successor"}


def test_kd_loss_matches_hinton_formula():
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    T, alpha = 2.0, 0.3
    pt, log_ps = F.softmax(t / T, -1), F.log_softmax(s / T, -1)
    kl = (pt * (pt.log() - log_ps)).sum(-1).mean()
    expect = (1 - alpha) * F.cross_entropy(s, y) + alpha * T * T * kl
    assert kd_loss(s, t, y, alpha, T)["loss"] == pytest.approx(float(expect), rel=1e-5)
    assert kd_loss(s, t, y, 0.0, T)["loss"] == pytest.approx(float(F.cross_entropy(s, y)), rel=1e-5)
    reg = kd_loss(s[:, :1], t[:, :1], torch.rand(5), 0.5, regression=True)
    assert reg["loss"] > 0


def test_difficulty_weights_formula():
    logits = torch.tensor([[0.0, 0.0], [20.0, -20.0], [1.0, 0.0]])
    w = difficulty_weights(logits)
    p = torch.tensor([1.0, 0.0]).softmax(-1)
    assert w[0] == pytest.approx(1.0) and w[1] == pytest.approx(0.0, abs=1e-6)
    assert w[2] == pytest.approx(float(-(p * p.log()).sum() / math.log(2)), rel=1e-5)
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 3, requires_grad=True), torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    ws = difficulty_weights(s)
    kl = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1)
    expect = (ws * kl + (1 - ws) * F.cross_entropy(s, y, reduction="none")).mean()
    got = difficulty_loss(s, t, y)["loss"]
    assert got.item() == pytest.approx(expect.item(), rel=1e-5)
    got.backward()  # the weights are constants: gradients flow through the two losses only
    assert s.grad is not None and not ws.requires_grad


@pytest.mark.parametrize("method", ["kd", "difficulty", "theseus"])
def test_method_trains_into_a_plain_student(teacher, tmp_path, method):
    manifest = distill(_cfg(teacher, tmp_path / method, method), progress=False)
    saved = read_manifest(tmp_path / method)
    assert saved.stage == "distill" and saved.params["method"] == method and saved.parent == str(teacher)
    assert "score" in manifest.metrics["dev"]
    student = BertForSequenceClassification.from_pretrained(tmp_path / method)
    assert student.config.num_hidden_layers == 2 and student.config.num_labels == 2
    assert not (tmp_path / method / "checkpoints").exists()
    assert manifest.num_parameters < sum(p.numel() for p in BertForSequenceClassification.from_pretrained(teacher).parameters())


def test_kd_from_the_cli_with_options(teacher, tmp_path, capsys):
    args = ["distill", "--stage", "task", "--method", "kd", "--teacher", str(teacher), "--task", "sst2",
            "--glue-dir", SAMPLE, "--out", str(tmp_path / "kd"), "--init-from-teacher", "1,2,3",
            "--method-option", "alpha=0.9", "--temperature", "2", "--max-train-examples", "16", "--epochs", "1",
            "--batch-size", "8", "--max-steps-per-epoch", "2"]
    assert main(args) == 0
    saved = read_manifest(tmp_path / "kd")
    assert saved.params["kd"] == {"alpha": 0.9} and saved.params["temperature"] == 2.0
    assert BertForSequenceClassification.from_pretrained(tmp_path / "kd").config.num_hidden_layers == 3
    bad = args[:-8] + ["--method-option", "beta=1"]
    assert main([a if a != str(tmp_path / "kd") else str(tmp_path / "kd2") for a in bad]) == 2


def test_difficulty_refuses_regression(tmp_path):
    teacher = make_tiny_bert(tmp_path / "stsb", num_labels=1, task="stsb")
    cfg = _cfg(teacher, tmp_path / "out", "difficulty")
    cfg.task = "stsb"
    with pytest.raises(BertforgeError, match="regression"):
        distill(cfg, progress=False)
