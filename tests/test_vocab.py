"""Vocabulary trimming: the folder loads with the standard loaders, gives the untrimmed model's logits on
text whose pieces were kept, counts the pieces lost to [UNK], and works on pruned models."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pipeline.cli import main
from pipeline.data import Example, load_glue
from pipeline.errors import BertforgeError
from pipeline.models import load_model, load_tokenizer
from pipeline.vocab import lost_to_unk, trim_vocab


def _logits(model, tokenizer, texts):
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**enc).logits, enc


def test_trimmed_model_loads_and_matches_on_kept_pieces(tiny_bert, sst2_dir, tmp_path):
    train = load_glue("sst2", "train", sst2_dir)[:200]
    dev = load_glue("sst2", "dev", sst2_dir)[:100]
    m = trim_vocab(tiny_bert, tmp_path / "trim", train, reserve=50, characters=False, dev=dev, task="sst2")
    out = tmp_path / "trim"
    assert m.params["vocab_before"] == 30522
    assert m.params["vocab_after"] == len((out / "vocab.txt").read_text().splitlines()) < 5000
    assert m.params["kept"]["reserve"] == 50
    assert m.num_parameters == m.params["params_before"] - (30522 - m.params["vocab_after"]) * 32
    assert m.params["weights_bytes_after"] < m.params["weights_bytes_before"]

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert tokenizer.vocab_size == model.config.vocab_size == model.get_input_embeddings().num_embeddings
    assert tokenizer.convert_ids_to_tokens(model.config.pad_token_id) == "[PAD]"

    # training sentences: every piece was kept, so the same pieces, new ids, the same logits
    texts = [ex.text_a for ex in train[:16]]
    before, enc_before = _logits(AutoModelForSequenceClassification.from_pretrained(tiny_bert),
                                 AutoTokenizer.from_pretrained(tiny_bert), texts)
    after, enc_after = _logits(model, tokenizer, texts)
    assert [enc_before.tokens(i) for i in range(16)] == [enc_after.tokens(i) for i in range(16)]
    assert not torch.equal(enc_before["input_ids"], enc_after["input_ids"])  # really remapped
    assert torch.allclose(before, after, atol=1e-6)

    # dev has words the 200 training rows never used: without a character fallback some become [UNK]
    tokens = m.metrics["dev_tokens"]
    assert tokens["pieces"] > 0 and 0 < tokens["lost_to_unk"] < tokens["pieces"]
    assert tokens["lost_share"] == pytest.approx(tokens["lost_to_unk"] / tokens["pieces"], abs=1e-6)
    assert tokens["unk_share_after"] > tokens["unk_share_before"]


def test_lost_pieces_are_counted_per_word(tiny_bert, tmp_path):
    train = [Example("the cat sat on the mat", None, 0)]
    dev = [Example("the zebra sat", None, 1)]
    bare = trim_vocab(tiny_bert, tmp_path / "bare", train, reserve=0, characters=False, dev=dev)
    assert bare.params["vocab_after"] == 5 + 5  # the special tokens and the five words seen
    tokens = bare.metrics["dev_tokens"]
    assert (tokens["words"], tokens["pieces"], tokens["lost_to_unk"], tokens["changed_words"]) == (3, 3, 1, 0)
    spelled = trim_vocab(tiny_bert, tmp_path / "spelled", train, reserve=0, characters=True, dev=dev)
    tokens = spelled.metrics["dev_tokens"]
    assert tokens["lost_to_unk"] == 0 and tokens["changed_words"] == 1  # z ##e ##b ##r ##a
    before, after = load_tokenizer(tiny_bert), load_tokenizer(tmp_path / "spelled")
    assert after.tokenize("zebra") == ["z", "##e", "##b", "##r", "##a"] and before.tokenize("zebra") == ["zebra"]
    assert lost_to_unk(before, before, dev)["lost_to_unk"] == 0


def test_trims_a_pruned_model_with_per_layer_widths(tiny_bert, sst2_dir, tmp_path):
    from pipeline.prune import PruneConfig, ffn_sizes, prune

    prune(PruneConfig(model=str(tiny_bert), task="sst2", out=str(tmp_path / "pruned"), glue_dir=str(sst2_dir),
                      heads=0.25, ffn=0.4, importance_examples=32), progress=False)
    pruned = load_model(tmp_path / "pruned")
    assert len(set(ffn_sizes(pruned))) > 1  # per-layer widths: bertforge's own class
    train = load_glue("sst2", "train", sst2_dir)[:100]
    trim_vocab(tmp_path / "pruned", tmp_path / "trim", train, reserve=10)
    config = json.loads((tmp_path / "trim" / "config.json").read_text())
    assert config["intermediate_sizes"] == ffn_sizes(pruned) and config["pruned_heads"]
    assert (tmp_path / "trim" / "modeling_pruned_bert.py").is_file()
    texts = [ex.text_a for ex in train[:8]]
    before, _ = _logits(pruned, load_tokenizer(tmp_path / "pruned"), texts)
    after, _ = _logits(load_model(tmp_path / "trim"), load_tokenizer(tmp_path / "trim"), texts)
    assert torch.allclose(before, after, atol=1e-6)


def test_cli(tiny_bert, sst2_dir, tmp_path, capsys):
    args = ["trim-vocab", "--task", "sst2", "--glue-dir", str(sst2_dir), "--max-train-examples", "300", "--reserve", "20"]
    assert main([*args, "--model", str(tiny_bert), "--out", str(tmp_path / "t")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["vocab_after"] < printed["vocab_before"] and "lost_share" in printed["dev_tokens"]
    manifest = json.loads((tmp_path / "t" / "bertforge.json").read_text())
    assert manifest["stage"] == "vocab" and manifest["params"]["config"]["reserve"] == 20
    assert main([*args, "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*args, "--model", str(tiny_bert), "--out", str(tmp_path / "o"), "--reserve", "-1"]) == 2
    assert "reserve" in capsys.readouterr().err
    with pytest.raises(BertforgeError, match="training rows"):
        trim_vocab(tiny_bert, tmp_path / "o", [], reserve=0)
