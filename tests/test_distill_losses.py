"""TinyBERT losses, layer mapping and score capture, each against a direct computation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

from pipeline.distill.capture import ScoreCapture, run_with_internals
from pipeline.distill.config import LossWeights
from pipeline.distill.losses import (attention_loss, embedding_loss, hidden_loss, prediction_loss,
                                     transformer_loss)
from pipeline.distill.mapping import layer_mapping
from pipeline.errors import BertforgeError

B, S = 3, 7


def padding_mask() -> torch.Tensor:
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return mask


# -- hidden and embedding losses ----------------------------------------------------------------
def test_hidden_loss_without_mask_is_plain_mse():
    torch.manual_seed(0)
    s, t = torch.randn(B, S, 8), torch.randn(B, S, 12)
    proj = torch.nn.Linear(8, 12)
    assert torch.allclose(hidden_loss(s, t, proj), F.mse_loss(proj(s), t))
    assert torch.allclose(embedding_loss(s, t, proj), F.mse_loss(proj(s), t))
    same = torch.randn(B, S, 12)
    assert torch.allclose(hidden_loss(same, t, torch.nn.Identity()), ((same - t) ** 2).mean())


def test_hidden_loss_with_mask_is_mean_over_real_tokens_and_units():
    torch.manual_seed(1)
    s, t, mask = torch.randn(B, S, 8), torch.randn(B, S, 12), padding_mask()
    proj = torch.nn.Linear(8, 12)
    rows = [((proj(s[b, i]) - t[b, i]) ** 2) for b in range(B) for i in range(S) if mask[b, i]]
    expected = torch.cat(rows).mean()
    assert torch.allclose(hidden_loss(s, t, proj, mask), expected, atol=1e-6)
    assert torch.allclose(embedding_loss(s, t, proj, mask), expected, atol=1e-6)


def test_hidden_loss_ignores_values_at_padded_positions():
    torch.manual_seed(2)
    s, t, mask = torch.randn(B, S, 8), torch.randn(B, S, 8), padding_mask()
    before = hidden_loss(s, t, torch.nn.Identity(), mask)
    pad = mask == 0
    s2, t2 = s.clone(), t.clone()
    s2[pad] = 1e6
    t2[pad] = float("nan")
    assert torch.equal(hidden_loss(s2, t2, torch.nn.Identity(), mask), before)


# -- attention loss -----------------------------------------------------------------------------
def test_attention_loss_without_padding_is_plain_mean():
    torch.manual_seed(3)
    s, t = torch.randn(B, 4, S, S), torch.randn(B, 4, S, S)
    expected = ((s - t) ** 2).mean()
    assert torch.allclose(attention_loss(s, t), expected)
    assert torch.allclose(attention_loss(s, t, torch.ones(B, S)), expected)


def test_attention_loss_is_mean_over_heads_and_real_pairs():
    torch.manual_seed(4)
    s, t, mask = torch.randn(B, 4, S, S), torch.randn(B, 4, S, S), padding_mask()
    values = [(s[b, h, i, j] - t[b, h, i, j]) ** 2 for b in range(B) for h in range(4)
              for i in range(S) for j in range(S) if mask[b, i] and mask[b, j]]
    assert torch.allclose(attention_loss(s, t, mask), torch.stack(values).mean(), atol=1e-6)


def test_attention_loss_ignores_padded_queries_and_keys():
    torch.manual_seed(5)
    s, t, mask = torch.randn(B, 4, S, S), torch.randn(B, 4, S, S), padding_mask()
    before = attention_loss(s, t, mask)
    s2, t2 = s.clone(), t.clone()
    for b in range(B):
        pad = (mask[b] == 0).nonzero().flatten()
        s2[b][:, pad, :] = 1e4  # padded query rows
        t2[b][:, :, pad] = float("inf")  # padded key columns
    assert torch.equal(attention_loss(s2, t2, mask), before)


def test_attention_loss_with_different_head_counts_matches_head_averaged_maps():
    torch.manual_seed(6)
    s, t, mask = torch.randn(B, 2, S, S), torch.randn(B, 6, S, S), padding_mask()
    expected = attention_loss(s.mean(1, keepdim=True), t.mean(1, keepdim=True), mask)
    assert torch.allclose(attention_loss(s, t, mask), expected)


# -- prediction loss and the weighted total ------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_prediction_loss_is_soft_cross_entropy(temperature):
    torch.manual_seed(7)
    s, t = torch.randn(5, 3), torch.randn(5, 3)
    expected = sum(-sum(F.softmax(t[i] / temperature, -1)[c] * F.log_softmax(s[i] / temperature, -1)[c]
                        for c in range(3)) for i in range(5)) / 5
    assert torch.allclose(prediction_loss(s, t, temperature), expected, atol=1e-6)
    # equals the teacher's entropy (its minimum) when the student copies the teacher
    p = F.softmax(t, -1)
    assert torch.allclose(prediction_loss(t, t), -(p * p.log()).sum(-1).mean(), atol=1e-6)


def test_prediction_loss_for_regression_is_mse_to_teacher():
    s, t = torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([[1.5], [2.0], [3.0]])
    assert torch.allclose(prediction_loss(s, t), torch.tensor((0.25 + 0 + 1) / 3))
    assert torch.allclose(prediction_loss(s.squeeze(-1), t.squeeze(-1), regression=True), torch.tensor((0.25 + 1) / 3))


def test_transformer_loss_is_weighted_sum_over_mapped_layers():
    from pipeline.distill.capture import Internals

    torch.manual_seed(8)
    mask = padding_mask()
    student = Internals(tuple(torch.randn(B, S, 8) for _ in range(3)), {m: torch.randn(B, 2, S, S) for m in (1, 2)})
    teacher = Internals(tuple(torch.randn(B, S, 8) for _ in range(5)), {n: torch.randn(B, 2, S, S) for n in (1, 2, 3, 4)})
    ident = torch.nn.Identity()
    w = LossWeights(embedding=0.5, hidden=2.0, attention=3.0)
    parts = transformer_loss(student, teacher, [2, 4], ident, ident, mask, w)
    emb = hidden_loss(student.hidden_states[0], teacher.hidden_states[0], ident, mask)
    hid = sum(hidden_loss(student.hidden_states[m], teacher.hidden_states[n], ident, mask) for m, n in ((1, 2), (2, 4)))
    att = sum(attention_loss(student.scores[m], teacher.scores[n], mask) for m, n in ((1, 2), (2, 4)))
    assert torch.allclose(parts["loss"], 0.5 * emb + 2.0 * hid + 3.0 * att)
    assert torch.allclose(parts["attention"], att)


# -- layer mapping ------------------------------------------------------------------------------
def test_uniform_mapping_matches_the_paper_and_rounds_up():
    assert layer_mapping(12, 4, "uniform") == [3, 6, 9, 12]
    assert layer_mapping(6, 3, "uniform") == [2, 4, 6]
    assert layer_mapping(6, 4, "uniform") == [2, 3, 5, 6]  # 1.5, 3, 4.5, 6 rounded up
    assert layer_mapping(5, 5, "uniform") == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("strategy", ["uniform", "top", "bottom"])
def test_every_strategy_is_strictly_increasing_and_in_range(strategy):
    for n in range(1, 25):
        for m in range(1, n + 1):
            g = layer_mapping(n, m, strategy)
            assert len(g) == m and all(1 <= x <= n for x in g)
            assert all(b > a for a, b in zip(g, g[1:]))
            if strategy == "uniform":
                assert g[-1] == n and all(x == math.ceil(k * n / m) for k, x in enumerate(g, 1))


def test_top_bottom_and_explicit_mappings():
    assert layer_mapping(12, 4, "top") == [9, 10, 11, 12]
    assert layer_mapping(12, 4, "bottom") == [1, 2, 3, 4]
    assert layer_mapping(12, 4, [2, 5, 8, 12]) == [2, 5, 8, 12]
    assert layer_mapping(12, 4, "2,5,8,12") == [2, 5, 8, 12]


@pytest.mark.parametrize("args", [(4, 6, "uniform"), (4, 6, "top"), (12, 4, [3, 6, 9]), (12, 2, [0, 5]),
                                  (12, 2, [5, 13]), (12, 3, [3, 3, 6]), (12, 3, [6, 3, 9]), (12, 2, "middle")])
def test_impossible_mappings_are_errors(args):
    with pytest.raises(BertforgeError, match="mapping"):
        layer_mapping(*args)


# -- capture ------------------------------------------------------------------------------------
def _tiny_encoder(attn: str) -> BertModel:
    torch.manual_seed(9)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=32, max_position_embeddings=32, attn_implementation=attn)
    return BertModel(config).eval()


def _batch():
    ids = torch.randint(1, 50, (B, S))
    return {"input_ids": ids, "attention_mask": padding_mask(), "token_type_ids": torch.zeros_like(ids)}


def test_captured_scores_are_the_models_pre_softmax_scores():
    """softmax(scores + additive padding mask) must equal the attention probabilities HF reports."""
    model, batch = _tiny_encoder("eager"), _batch()
    with torch.no_grad(), ScoreCapture(model) as cap:
        out = run_with_internals(model, batch, cap, logits=False)
        probs = model(**batch, output_attentions=True).attentions
    additive = (1 - batch["attention_mask"][:, None, None, :].float()) * torch.finfo(torch.float32).min
    for n in (1, 2):
        assert out.scores[n].shape == (B, 4, S, S)
        assert torch.allclose(torch.softmax(out.scores[n] + additive, dim=-1), probs[n - 1], atol=1e-6)
    assert len(out.hidden_states) == 3


def test_capture_works_with_sdpa_and_keeps_gradients():
    eager, sdpa, batch = _tiny_encoder("eager"), _tiny_encoder("sdpa"), _batch()
    with torch.no_grad(), ScoreCapture(eager, [2]) as cap:
        ref = run_with_internals(eager, batch, cap, logits=False)
    with ScoreCapture(sdpa, [2]) as cap:
        got = run_with_internals(sdpa, batch, cap, logits=False)
    assert set(got.scores) == {2}
    assert torch.allclose(got.scores[2], ref.scores[2], atol=1e-5)
    got.scores[2].sum().backward()
    query = sdpa.encoder.layer[1].attention.self.query
    assert query.weight.grad is not None and query.weight.grad.abs().sum() > 0
    # hooks are gone after the context: a later forward captures nothing, so there are no scores to read
    with torch.no_grad():
        run_with_internals(sdpa, batch, logits=False)
    with pytest.raises(KeyError):
        cap.scores()
