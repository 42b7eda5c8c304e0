"""Structured pruning really shrinks the model, saves and reloads; bad targets are clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from pipeline.cli import main
from pipeline.data import Collator, EncodedDataset, eval_loader, load_glue
from pipeline.errors import BertforgeError
from pipeline.models import count_parameters, load_tokenizer
from pipeline.models import load_model
from pipeline.prune import PruneConfig, ffn_sizes, head_counts, prune, select_units, unit_importance
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
