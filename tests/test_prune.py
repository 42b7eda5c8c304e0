"""Structured pruning really shrinks the model, saves and reloads; bad targets are clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from pipeline.cli import main
from pipeline.data import Collator, EncodedDataset, eval_loader, load_glue
from pipeline.errors import BertforgeError
from pipeline.losses import attention_loss
from pipeline.models import count_parameters, load_tokenizer
from pipeline.models import load_model
from pipeline.capture import ScoreCapture, run_with_internals
from pipeline.prune import (PruneConfig, ffn_sizes, head_counts, intermediate_loss_fn, kept_heads, prune,
                            prune_structured, recovery_plan, select_units, step_counts, unit_importance)
from pipeline.training import LoopConfig


def _cfg(model, out, sst2_dir, **kw):
    return PruneConfig(model=str(model), task="sst2", out=str(out), glue_dir=str(sst2_dir), importance_examples=64, **kw)


def test_global_prune_shrinks_and_reloads(tiny_bert, sst2_dir, tmp_path):
    out = tmp_path / "pruned"
    m = prune(_cfg(tiny_bert, out, sst2_dir, heads=0.5, ffn=0.5), progress=False)
    heads, ffn = m.params["after"]["heads"], m.params["after"]["ffn"]
    assert sum(heads) == 4 and min(heads) >= 1
    assert sum(ffn) == 64
    assert m.num_parameters < m.params["before"]["params"]

    # the documented loader, and plain from_pretrained (remote code only when FFN widths differ)
    config = json.loads((out / "config.json").read_text())
    remote = len(set(ffn)) > 1
    assert ("auto_map" in config) == remote and (out / "modeling_pruned_bert.py").is_file() == remote
    for model in (load_model(str(out)), AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=remote)):
        assert head_counts(model) == heads and ffn_sizes(model) == ffn
        for layer, h, f in zip(model.bert.encoder.layer, heads, ffn):
            assert layer.attention.self.query.weight.shape == (h * 8, 32)
            assert layer.attention.output.dense.weight.shape == (32, h * 8)
            assert layer.intermediate.dense.weight.shape == (f, 32)
            assert layer.output.dense.weight.shape == (32, f)


def test_per_layer_prune_loads_with_plain_from_pretrained(tiny_bert, sst2_dir, tmp_path):
    out = tmp_path / "pruned"
    m = prune(_cfg(tiny_bert, out, sst2_dir, heads=0.5, ffn=0.25, per_layer=True), progress=False)
    assert m.params["after"]["heads"] == [2, 2] and m.params["after"]["ffn"] == [48, 48]
    assert not (out / "modeling_pruned_bert.py").exists()
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert head_counts(model) == [2, 2] and ffn_sizes(model) == [48, 48]
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    assert model(input_ids=ids).logits.shape == (1, 2)
    # pruning the pruned model again maps positions past the heads already gone
    again = prune(_cfg(out, tmp_path / "again", sst2_dir, heads=0.5, per_layer=True), progress=False)
    assert again.params["after"]["heads"] == [1, 1]
    assert head_counts(AutoModelForSequenceClassification.from_pretrained(tmp_path / "again")) == [1, 1]


def test_gate_importance_matches_head_mask_gradient(tiny_bert, sst2_dir):
    """The hook gates give Michel et al.'s head importance (|d loss / d head_mask|)."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, attn_implementation="eager")
    tokenizer = load_tokenizer(tiny_bert)
    data = EncodedDataset(load_glue("sst2", "dev", sst2_dir)[:32], tokenizer, 64)
    loader = lambda: eval_loader(data, Collator(tokenizer, False), 16)  # noqa: E731
    heads, _ = unit_importance(model, loader())
    model.eval()
    expected = torch.zeros(2, 4)
    for batch in loader():
        batch.pop("idx")
        mask = torch.ones(2, 4, requires_grad=True)
        (grad,) = torch.autograd.grad(model(**batch, head_mask=mask).loss, mask)
        expected += grad.abs()
    expected = expected / expected.norm(dim=1, keepdim=True)
    assert torch.allclose(torch.stack(heads), expected, atol=1e-5)


def test_select_units_never_empties_a_layer():
    scores = [torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.9, 0.8, 0.7])]
    assert select_units(scores, 0.5, per_layer=False, what="heads") == [[0, 1], [2]]
    assert select_units(scores, 0.34, per_layer=True, what="heads") == [[0], [2]]
    with pytest.raises(BertforgeError, match="remove all 3 of layer 0"):
        select_units(scores, 0.9, per_layer=True, what="heads")
    with pytest.raises(BertforgeError):
        select_units(scores, 1.0, per_layer=False, what="heads")


def test_recovery_distillation_and_unstructured(tiny_bert, sst2_dir, tmp_path):
    loop = LoopConfig(epochs=1, batch_size=8, max_steps_per_epoch=2, checkpoint_every=0)
    m = prune(_cfg(tiny_bert, tmp_path / "rec", sst2_dir, heads=0.25, ffn=0.25, recover_epochs=1, loop=loop,
                   max_train_examples=64), progress=False)
    assert "dev" in m.metrics and "dev_before_recovery" in m.metrics
    assert not (tmp_path / "rec" / "checkpoints").exists()
    reloaded = load_model(str(tmp_path / "rec"))
    assert head_counts(reloaded) == m.params["after"]["heads"] and ffn_sizes(reloaded) == m.params["after"]["ffn"]
    assert count_parameters(reloaded) == m.num_parameters < m.params["before"]["params"]

    u = prune(_cfg(tiny_bert, tmp_path / "sparse", sst2_dir, unstructured=0.9), progress=False)
    assert u.params["encoder_linear_sparsity"] == pytest.approx(0.9, abs=0.01)
    assert u.num_parameters == u.params["before"]["params"]  # same shapes: no speed-up, only a smaller gzip
    assert u.params["gzip_bytes"] < u.params["parent_gzip_bytes"]


def test_cli_bad_inputs(tiny_bert, sst2_dir, tmp_path, capsys):
    common = ["--task", "sst2", "--glue-dir", str(sst2_dir), "--importance-examples", "16"]
    assert main(["prune", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--heads", "0.5", *common]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["prune", "--model", str(tiny_bert), "--out", str(tmp_path / "o"), "--heads", "1.0", "--per-layer", *common]) == 2
    assert "heads" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_bert.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["prune", "--model", str(broken), "--out", str(tmp_path / "o"), "--heads", "0.5", *common]) == 2
    assert "cannot load model weights" in capsys.readouterr().err


# -- recovery by transformer distillation, iterative pruning ---------------------------------------

def test_recovery_plan_spends_the_same_budget():
    for recovery, steps in (("prediction", 1), ("prediction", 3), ("transformer", 1), ("transformer", 3), ("joint", 1),
                            ("joint", 3)):
        cfg = PruneConfig(model="m", task="sst2", out="o", heads=0.5, recover_epochs=2, recovery=recovery, steps=steps)
        plan = recovery_plan(cfg, steps_per_epoch=7)
        assert sum(p.optimizer_steps for p in plan) == 14
        assert plan[-1].loss == ("joint" if recovery == "joint" else "prediction") and plan[-1].step == steps
        assert [p.step for p in plan] == sorted(p.step for p in plan)
    assert [p.name for p in recovery_plan(PruneConfig(model="m", task="sst2", out="o", recover_epochs=1,
                                                      recovery="transformer", steps=2), 10)] == \
        ["step1-transformer", "step2-transformer", "step2-prediction"]


def test_steps_remove_exactly_what_one_step_removes():
    for per_layer in (False, True):
        one = step_counts([12, 12, 12], 0.5, 1, 1, per_layer)
        three = [step_counts([12, 12, 12], 0.5, 3, k, per_layer) for k in (1, 2, 3)]
        total = [sum(c) for c in zip(*three)] if per_layer else sum(three)
        assert total == one
    assert step_counts([1536] * 3, 0.5, 3, 1, False) == 768


def test_intermediate_loss_matches_each_kept_head_to_its_own_teacher_head(tiny_bert, sst2_dir):
    """Right after cutting heads of the last layer the kept heads' scores are untouched: their attention
    loss against the same heads of the unpruned model is zero (head-averaged maps would differ), while
    the layer's output has moved."""
    teacher = load_model(str(tiny_bert)).eval()
    student = load_model(str(tiny_bert)).eval()
    prune_structured(student, [[], [0, 2]], [[], []])  # the last layer keeps heads 1 and 3
    assert kept_heads(student.config, 0, 4) == [0, 1, 2, 3] and kept_heads(student.config, 1, 4) == [1, 3]
    tokenizer = load_tokenizer(tiny_bert)
    batch = next(iter(eval_loader(EncodedDataset(load_glue("sst2", "dev", sst2_dir)[:8], tokenizer, 32),
                                  Collator(tokenizer, False), 8)))
    with torch.no_grad(), ScoreCapture(student) as s_cap, ScoreCapture(teacher) as t_cap:
        parts = intermediate_loss_fn(student, teacher, s_cap, t_cap)(dict(batch))
        s = run_with_internals(student, dict(batch), s_cap, logits=False)
        t = run_with_internals(teacher, dict(batch), t_cap, logits=False)
    averaged = attention_loss(s.scores[2], t.scores[2], batch["attention_mask"])  # no head correspondence
    assert float(parts["attention"]) < 1e-6 * float(averaged)
    assert float(parts["hidden"]) > 1e-6
    unpruned = load_model(str(tiny_bert)).eval()
    with torch.no_grad(), ScoreCapture(unpruned) as s_cap, ScoreCapture(teacher) as t_cap:
        same = intermediate_loss_fn(unpruned, teacher, s_cap, t_cap)(dict(batch))
    assert float(same["loss"]) < 1e-10
    with torch.no_grad(), ScoreCapture(student) as s_cap, ScoreCapture(teacher) as t_cap:
        joint = intermediate_loss_fn(student, teacher, s_cap, t_cap, temperature=1.0)(dict(batch))
    # joint recovery: the same layer terms plus the logits' soft cross-entropy, from the same passes
    assert torch.allclose(joint["hidden"], parts["hidden"]) and torch.allclose(joint["attention"], parts["attention"])
    assert float(joint["prediction"]) > 0
    assert torch.allclose(joint["loss"], parts["loss"] + joint["prediction"])
    # attention_weight scales the score term; without captures (weight 0) the layers match by hidden states only
    with torch.no_grad(), ScoreCapture(student) as s_cap, ScoreCapture(teacher) as t_cap:
        half = intermediate_loss_fn(student, teacher, s_cap, t_cap, temperature=1.0, attention_weight=0.5)(dict(batch))
    assert torch.allclose(half["loss"], joint["hidden"] + 0.5 * joint["attention"] + joint["prediction"])
    with torch.no_grad():
        hidden_only = intermediate_loss_fn(student, teacher, None, None, temperature=1.0,
                                           attention_weight=0.0)(dict(batch))
    assert "attention" not in hidden_only
    assert torch.allclose(hidden_only["loss"], joint["hidden"] + joint["prediction"])


def test_transformer_recovery_and_iterative_pruning(tiny_bert, sst2_dir, tmp_path):
    loop = LoopConfig(epochs=1, batch_size=8, max_steps_per_epoch=4, checkpoint_every=0)
    common = dict(heads=0.5, ffn=0.5, recover_epochs=1, loop=loop, max_train_examples=64)
    one = prune(_cfg(tiny_bert, tmp_path / "one", sst2_dir, **common), progress=False)
    tr = prune(_cfg(tiny_bert, tmp_path / "tr", sst2_dir, recovery="transformer", **common), progress=False)
    it = prune(_cfg(tiny_bert, tmp_path / "it", sst2_dir, recovery="transformer", steps=2, eval_dev=False, **common),
               progress=False)
    joint = prune(_cfg(tiny_bert, tmp_path / "joint", sst2_dir, recovery="joint", eval_dev=False, **common),
                  progress=False)
    assert [p["loss"] for p in joint.params["recovery_plan"]] == ["joint"]
    hidden = prune(_cfg(tiny_bert, tmp_path / "hidden", sst2_dir, recovery="joint", attention_weight=0.0,
                        eval_dev=False, **common), progress=False)
    assert hidden.params["attention_weight"] == 0.0
    with pytest.raises(BertforgeError, match="attention_weight"):
        prune(_cfg(tiny_bert, tmp_path / "bad", sst2_dir, recovery="joint", attention_weight=-1.0, **common),
              progress=False)
    assert "dev" in tr.metrics and "dev_before_recovery" in tr.metrics
    assert it.metrics == {}  # no dev scoring asked for
    for m in (tr, it, joint, hidden):
        assert sum(m.params["after"]["heads"]) == sum(one.params["after"]["heads"]) == 4
        assert sum(m.params["after"]["ffn"]) == sum(one.params["after"]["ffn"]) == 64
        assert m.params["recovery_examples"] == one.params["recovery_examples"] == 4 * 8  # the same budget
    assert [s["step"] for s in it.params["pruning_steps"]] == [1, 2]
    assert sum(it.params["pruning_steps"][0]["heads"]) == 6  # half of the heads to remove, in the first step
    for name, m in (("tr", tr), ("it", it)):
        model = load_model(str(tmp_path / name))
        assert head_counts(model) == m.params["after"]["heads"] and ffn_sizes(model) == m.params["after"]["ffn"]
        removed = {int(k): sorted(v) for k, v in model.config.pruned_heads.items() if v}
        assert removed == {int(k): v for k, v in m.params["removed_heads"].items()}
        assert not (tmp_path / name / "checkpoints").exists()


def test_iterative_pruning_resumes_after_a_finished_phase(tiny_bert, sst2_dir, tmp_path, monkeypatch):
    """Interrupted before its last phase, a resumed run ends with the same weights as an uninterrupted one."""
    import pipeline.prune as prune_module

    loop = LoopConfig(epochs=1, batch_size=8, max_steps_per_epoch=3, checkpoint_every=0)
    common = dict(heads=0.5, ffn=0.5, recover_epochs=1, loop=loop, max_train_examples=48, recovery="transformer", steps=2)
    prune(_cfg(tiny_bert, tmp_path / "whole", sst2_dir, **common), progress=False)

    real = prune_module.recover

    def interrupted(cfg, phase, *args, **kw):
        if phase.name == "step2-prediction":
            raise KeyboardInterrupt
        return real(cfg, phase, *args, **kw)

    monkeypatch.setattr(prune_module, "recover", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prune(_cfg(tiny_bert, tmp_path / "cut", sst2_dir, **common), progress=False)
    with pytest.raises(BertforgeError, match="unfinished run"):
        prune(_cfg(tiny_bert, tmp_path / "cut", sst2_dir, **common), progress=False)
    monkeypatch.setattr(prune_module, "recover", real)
    with pytest.raises(BertforgeError, match="other settings"):
        prune(_cfg(tiny_bert, tmp_path / "cut", sst2_dir, **{**common, "heads": 0.25}), resume=True, progress=False)
    m = prune(_cfg(tiny_bert, tmp_path / "cut", sst2_dir, **common), resume=True, progress=False)
    whole, cut = load_model(str(tmp_path / "whole")), load_model(str(tmp_path / "cut"))
    for (name, a), b in zip(whole.state_dict().items(), cut.state_dict().values()):
        assert torch.equal(a, b), name
    assert m.params["recovery_examples"] == json.loads((tmp_path / "whole" / "bertforge.json").read_text())["params"]["recovery_examples"]
