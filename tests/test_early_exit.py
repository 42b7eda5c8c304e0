"""FastBERT-style early exit: branches self-distilled from the final classifier; at inference samples
leave at the first confident layer and the layers after it are really not run for them."""
import pytest
import torch
from transformers import BertForSequenceClassification

from conftest import make_tiny_bert
from pipeline.artifacts import read_manifest
from pipeline.data import Example, load_glue, write_examples_file
from pipeline.distill import distill
from pipeline.distill.config import DistillConfig, EarlyExitOptions
from pipeline.distill.early_exit import EarlyExitBert, normalised_entropy, speed_accuracy_curve
from pipeline.finetune import FinetuneConfig, finetune
from pipeline.models import load_tokenizer
from pipeline.training import LoopConfig

POS = ["great wonderful great", "wonderful great fun", "great fun wonderful great", "fun great great"]
NEG = ["awful terrible awful", "terrible awful boring", "boring awful terrible awful", "awful awful boring"]
HARD = ["great awful", "wonderful terrible fun boring", "awful great great terrible", "boring fun"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-layer classifier fine-tuned on an easy synthetic task, then given exits."""
    root = tmp_path_factory.mktemp("ee")
    glue = root / "glue" / "SST-2"
    glue.mkdir(parents=True)
    rows = [Example(t, None, 1) for t in POS] + [Example(t, None, 0) for t in NEG]
    write_examples_file("sst2", rows * 8, glue / "train.tsv")
    write_examples_file("sst2", rows, glue / "dev.tsv")
    base = make_tiny_bert(root / "base", layers=4, seed=2)
    loop = LoopConfig(epochs=4, batch_size=16, learning_rate=3e-3, checkpoint_every=0, warmup_ratio=0.0)
    finetune(FinetuneConfig(task="sst2", model=str(base), out=str(root / "ft"), glue_dir=str(root / "glue"), loop=loop),
             progress=False)
    # A few steps leave a tiny model right but barely confident (p ~ 0.5): sharpen its final classifier
    # (predictions unchanged) so that its confidence, which the exits learn, separates easy from hard.
    model = BertForSequenceClassification.from_pretrained(root / "ft")
    with torch.no_grad():
        model.classifier.weight.mul_(100.0)
        model.classifier.bias.mul_(100.0)
    model.save_pretrained(root / "ft")
    cfg = DistillConfig(stage="task", teacher=str(root / "ft"), out=str(root / "ee"), method="early-exit", task="sst2",
                        glue_dir=str(root / "glue"), early_exit=EarlyExitOptions(branch_hidden=16, thresholds="0.2,0.5,1"),
                        loop=LoopConfig(epochs=10, batch_size=16, learning_rate=1e-2, checkpoint_every=0, warmup_ratio=0.0))
    manifest = distill(cfg, progress=False)
    return root, manifest


def _batch(tokenizer, texts):
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


class LayerCalls:
    """Rows each encoder layer really computed (forward hooks on the stock BertLayer modules)."""

    def __init__(self, model: EarlyExitBert):
        self.rows = [0] * model.num_layers
        for i, layer in enumerate(model.model.bert.encoder.layer):
            layer.register_forward_hook(lambda mod, args, out, i=i: self._add(i, args[0].shape[0]))

    def _add(self, i, n):
        self.rows[i] += n


def test_threshold_zero_is_the_full_model(trained):
    root, _ = trained
    model = EarlyExitBert.from_pretrained(root / "ee")
    batch = _batch(load_tokenizer(root / "ee"), POS + HARD)
    logits, exits = model.predict(**batch, threshold=0.0)
    assert torch.allclose(logits, model.model(**batch).logits, atol=1e-5)
    assert exits.tolist() == [4] * len(POS + HARD)


def test_exits_really_skip_the_remaining_layers(trained):
    root, _ = trained
    model = EarlyExitBert.from_pretrained(root / "ee")
    batch = _batch(load_tokenizer(root / "ee"), POS + NEG + HARD)
    calls = LayerCalls(model)
    all_logits = model.all_logits(**batch)  # one full pass: every layer sees every row
    assert calls.rows == [12] * 4
    entropies = torch.stack([normalised_entropy(x.detach()) for x in all_logits[:-1]], dim=1)  # [batch, 3]
    threshold = entropies[:, 0].median().item()
    calls.rows = [0] * 4
    _, exits = model.predict(**batch, threshold=threshold)
    expected = [next((i + 1 for i in range(3) if entropies[r, i] < threshold), 4) for r in range(12)]
    assert exits.tolist() == expected
    # layer i ran exactly for the samples still inside when it came
    assert calls.rows == [sum(e >= i + 1 for e in expected) for i in range(4)]
    assert calls.rows[-1] < 12
    calls.rows = [0] * 4
    model.predict(**batch, threshold=1.0)
    assert calls.rows == [12, 0, 0, 0]


def test_easy_inputs_leave_earlier_than_hard_ones(trained):
    root, _ = trained
    model = EarlyExitBert.from_pretrained(root / "ee")
    tok = load_tokenizer(root / "ee")
    _, easy = model.predict(**_batch(tok, POS + NEG), threshold=0.5)
    _, hard = model.predict(**_batch(tok, HARD), threshold=0.5)
    assert easy.float().mean() < hard.float().mean()
    assert easy.float().mean() < 4


def test_manifest_carries_the_speed_accuracy_curve(trained):
    root, manifest = trained
    saved = read_manifest(root / "ee")
    assert saved.params["method"] == "early-exit"
    curve = saved.metrics["early_exit_curve"]
    assert [row["threshold"] for row in curve] == [0.0, 0.2, 0.5, 1.0]
    layers = [row["mean_exit_layer"] for row in curve]
    assert layers[0] == 4 and layers[-1] == 1 and layers == sorted(layers, reverse=True)
    assert saved.metrics["dev"]["score"] == curve[0]["score"]
    model = EarlyExitBert.from_pretrained(root / "ee")
    rows = speed_accuracy_curve(model, load_tokenizer(root / "ee"), "sst2",
                                load_glue("sst2", "dev", root / "glue"), [0.5], max_length=16)
    assert rows[0]["threshold"] == 0.0 and rows[1]["speedup"] > 0
