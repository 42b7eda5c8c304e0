"""TinyBERT data augmentation: candidate sources, untouched words, labels, sentence pairs, determinism,
the output file and its manifest. A tiny random masked LM (real BERT vocabulary) and a tiny GloVe file."""
import json

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.data import Example, load_examples_file, sample_data_dir
from pipeline.distill.augment import STOPWORDS, AugmentConfig, Augmenter, augment_dataset, manifest_path
from pipeline.distill.glove import load_glove

# "kumquats" and "zorblax" are several word-pieces in the uncased BERT vocabulary; "movie" is one.
GLOVE = {
    "kumquats": [1.0, 0.0, 0.0], "oranges": [0.9, 0.1, 0.0], "lemons": [0.8, 0.3, 0.0], "limes": [0.7, 0.5, 0.1],
    "zorblax": [0.0, 1.0, 0.0], "gizmo": [0.1, 0.9, 0.0], "widget": [0.2, 0.8, 0.1], "movie": [0.0, 0.0, 1.0],
    "gloveonly": [0.0, 0.1, 0.95], ",": [0.95, 0.05, 0.0], "the": [0.0, 0.3, 0.3],
}


@pytest.fixture(scope="module")
def glove_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("glove") / "tiny.glove.txt"
    path.write_text("".join(f"{w} {' '.join(map(str, v))}\n" for w, v in GLOVE.items()))
    return path


@pytest.fixture(scope="module")
def tiny_mlm(tmp_path_factory):
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from pipeline.models import packaged_minilm_dir

    out = tmp_path_factory.mktemp("mlm") / "tiny-mlm"
    tok = AutoTokenizer.from_pretrained(packaged_minilm_dir())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertForMaskedLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _augmenter(glove_file, mlm=None, **kw):
    return Augmenter(load_glove(str(glove_file)), str(mlm) if mlm else None, **{"k": 3, "n": 4, **kw})


def test_glove_neighbours_are_cosine_ordered_words(glove_file):
    glove = load_glove(str(glove_file))
    found = glove.neighbours(["kumquats", "unknownword"], k=3)
    assert found == {"kumquats": ["oranges", "lemons", "limes"]}  # "," is closer but not a word; no self


def test_packaged_glove_loads():
    glove = load_glove()
    assert len(glove.words) == 400_000 and glove.unit.shape == (400_000, 50)
    assert "horrible" in glove.neighbours(["terrible"], k=5)["terrible"]


def test_single_piece_words_take_masked_lm_candidates_multi_piece_take_glove(glove_file, tiny_mlm):
    aug = _augmenter(glove_file, tiny_mlm)
    words, cands = aug.candidates(["The movie had kumquats and zorblax ."])
    assert words[0] == ["The", "movie", "had", "kumquats", "and", "zorblax", "."]
    movie = cands[0][1]
    assert len(movie) == 3 and "movie" not in movie and "gloveonly" not in movie
    assert all(c.isalpha() and c in aug.tokenizer.vocab for c in movie)  # whole words of the LM's vocabulary
    assert cands[0][3] == ["oranges", "lemons", "limes"]
    assert cands[0][5] == ["gizmo", "widget", "the"]
    assert aug.sources["single_piece"].startswith("masked-lm:") and aug.sources["multi_piece"].startswith("glove:")


def test_without_masked_lm_every_word_takes_glove(glove_file):
    aug = _augmenter(glove_file)
    _, cands = aug.candidates(["the movie , kumquats"])
    assert cands[0] == [None, glove_neighbours(glove_file, "movie"), None, ["oranges", "lemons", "limes"]]
    assert aug.sources["single_piece"] == aug.sources["multi_piece"] == f"glove:{glove_file}"


def glove_neighbours(glove_file, word):
    return load_glove(str(glove_file)).neighbours([word], k=3)[word]


def test_stopwords_and_non_words_stay_labels_kept(glove_file, tiny_mlm):
    aug = _augmenter(glove_file, tiny_mlm, p=1.0, n=6)
    text = "The movie , sadly , was not 10 kumquats and it is zorblax !"
    out = aug.augment([Example(text, None, 1)])
    assert out[0] == Example(text, None, 1)  # the original first
    assert len(out) > 1 and all(ex.label == 1 and ex.text_b is None for ex in out)
    original = aug.words_of(text)
    for ex in out[1:]:
        words = ex.text_a.split(" ")
        assert len(words) == len(original)
        for old, new in zip(original, words):
            if old.lower() in STOPWORDS or not old.isalpha():
                assert new == old
            else:
                assert new != old  # p = 1: every candidate word replaced
    assert any(ex.text_a.split(" ")[1] != "movie" for ex in out[1:])


def test_pairs_stay_aligned(glove_file, tiny_mlm):
    aug = _augmenter(glove_file, tiny_mlm, p=0.7, n=5)
    pairs = [Example("kumquats taste sour", "movie reviews praised kumquats", 0),
             Example("zorblax sells gadgets", "the gizmo store sells zorblax", 1)]
    out = aug.augment(pairs)
    by_label = {0: pairs[0], 1: pairs[1]}
    assert len(out) > 2
    for ex in out:
        src = by_label[ex.label]
        # one side is the original's own, the other a same-length variant of the original's other side
        assert ex.text_a == src.text_a or ex.text_b == src.text_b
        assert len(ex.text_a.split()) == len(src.text_a.split()) and len(ex.text_b.split()) == len(src.text_b.split())
    assert any(ex.text_a == pairs[0].text_a and ex.text_b != pairs[0].text_b for ex in out)
    assert any(ex.text_a != pairs[1].text_a and ex.text_b == pairs[1].text_b for ex in out)


def test_deterministic_for_a_seed_and_independent_of_batching(glove_file, tiny_mlm):
    examples = [Example(t, None, 0) for t in ["a fine movie with kumquats", "zorblax ruined the movie entirely",
                                              "what a marvellous and splendid film"]]
    a = _augmenter(glove_file, tiny_mlm, seed=3, batch_size=64).augment(examples)
    b = _augmenter(glove_file, tiny_mlm, seed=3, batch_size=64).augment(examples)
    c = _augmenter(glove_file, tiny_mlm, seed=4, batch_size=64).augment(examples)
    single = _augmenter(glove_file, tiny_mlm, seed=3, batch_size=1)
    d = single.augment(examples)
    assert a == b and a != c
    assert d == a  # the batch-1 loop computes the same candidates
    assert single.forwards > 1


def test_masked_lm_forwards_are_batched(glove_file, tiny_mlm):
    aug = _augmenter(glove_file, tiny_mlm, batch_size=256)
    aug.augment([Example("an amazing movie about wonderful people", None, 1)] * 10)
    assert aug.forwards == 1  # 40 masked copies, one forward


def test_augment_file_reads_back_with_manifest(glove_file, tmp_path):
    out = tmp_path / "aug" / "train.tsv"
    manifest = augment_dataset(AugmentConfig(task="sst2", out=str(out), glue_dir=str(sample_data_dir()),
                                             glove=str(glove_file), n=3, max_examples=7, chunk_size=3), progress=False)
    rows = load_examples_file("sst2", out)
    assert len(rows) == manifest["examples_out"] >= 7
    assert json.loads(manifest_path(out).read_text())["candidates"]["single_piece"] == f"glove:{glove_file}"
    assert manifest["fallback"] and manifest["examples_in"] == 7


def test_augment_cli_pairs(glove_file, tiny_mlm, tmp_path, glue_dir, capsys):
    out = tmp_path / "mrpc.tsv"
    rc = main(["augment", "--task", "mrpc", "--glue-dir", str(glue_dir), "--out", str(out), "--mlm", str(tiny_mlm),
               "--glove", str(glove_file), "--n", "2", "--max-examples", "4"])
    assert rc == 0
    rows = load_examples_file("mrpc", out)
    assert len(rows) >= 4 and all(r.text_b for r in rows)
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["candidates"]["single_piece"] == f"masked-lm:{tiny_mlm}"
    assert main(["augment", "--task", "mrpc", "--glue-dir", str(glue_dir), "--out", str(out), "--p", "2"]) == 2
