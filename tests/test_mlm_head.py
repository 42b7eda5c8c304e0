"""The masked-LM head fitted on a frozen encoder (augmentation's offline candidate source), and the
stopword rule for masked-LM candidates."""
import json

import torch
from transformers import AutoModelForMaskedLM, BertForMaskedLM, BertForSequenceClassification

from pipeline.data import load_glue, sample_data_dir
from pipeline.distill.augment import STOPWORDS, AugmentConfig, Augmenter, augment_dataset
from pipeline.distill.glove import load_glove
from pipeline.distill.mlm_head import MANIFEST, MlmHeadConfig, fit_mlm_head


def _texts(n=64):
    return [ex.text_a for ex in load_glue("sst2", "train", str(sample_data_dir()))[:n]]


def test_head_learns_while_the_encoder_stays_frozen(tiny_bert, tmp_path):
    out = fit_mlm_head(MlmHeadConfig(encoder=str(tiny_bert), out=str(tmp_path / "mlm"), steps=40, batch_size=16,
                                     learning_rate=1e-2), _texts(), progress=False)
    fitted = AutoModelForMaskedLM.from_pretrained(out)
    original = BertForSequenceClassification.from_pretrained(tiny_bert)
    for name, value in original.bert.state_dict().items():
        if not name.startswith("pooler"):
            assert torch.equal(fitted.bert.state_dict()[name], value), name
    report = json.loads((out / MANIFEST).read_text())
    assert report["last_loss"] < report["first_loss"]
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    fit_mlm_head(MlmHeadConfig(encoder=str(tiny_bert), out=str(out), steps=40, batch_size=16, learning_rate=1e-2),
                 _texts(), progress=False)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # same settings and text: reused


def test_augment_fits_a_head_when_asked_and_says_so(tiny_bert, tmp_path):
    out = tmp_path / "aug.tsv"
    manifest = augment_dataset(AugmentConfig(task="sst2", out=str(out), glue_dir=str(sample_data_dir()),
                                             mlm_head_on=str(tiny_bert), mlm_head_steps=5, n=2, max_examples=6),
                               progress=False)
    assert manifest["candidates"]["single_piece"] == f"masked-lm:{out}.mlm"
    assert manifest["fallback"] is None and manifest["mlm_head"]["encoder"] == str(tiny_bert)
    assert manifest["examples_out"] >= 6


def test_masked_lm_never_offers_stopwords(tiny_bert, tmp_path):
    model = BertForMaskedLM.from_pretrained(tiny_bert)
    from pipeline.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_bert))
    favourites = tokenizer.convert_tokens_to_ids(["the", "he", "to", "was", "garden"])
    with torch.no_grad():
        model.cls.predictions.bias[favourites] = 100.0  # a head that ranks these first everywhere
    model.save_pretrained(tmp_path / "mlm")
    tokenizer.save_pretrained(tmp_path / "mlm")
    aug = Augmenter(load_glove(None), str(tmp_path / "mlm"), k=3)
    _, cands = aug.candidates(["The movie was good fun"])
    offered = [c for c in cands[0] if c]
    assert offered and all("garden" in c for c in offered)
    assert not any(set(c) & STOPWORDS for c in offered)
