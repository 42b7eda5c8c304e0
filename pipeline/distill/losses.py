"""TinyBERT's transformer-distillation losses (Jiao et al., 2020, section 3.1).

All losses are means over real tokens: padding never contributes, so a batch's loss does not depend
on how far it was padded. Without padding each one equals the plain mean of squared differences.

Where this differs from the official TinyBERT code (see NOTES): the official attention loss zeroes
masked scores but still counts them in the mean and keeps padded query rows; its hidden loss is an
unmasked MSE. Both make the loss depend on batch padding; here masked pairs/positions are excluded.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pipeline.distill.config import LossWeights
from pipeline.losses import prediction_loss  # noqa: F401  (the prediction layer's loss, shared with pruning)

Projection = Callable[[Tensor], Tensor]


def _masked_mean(sq: Tensor, mask: Tensor | None, feature_dims: int) -> Tensor:
    """Mean of `sq` over the positions where `mask` is 1; `mask` covers all but the last `feature_dims` dims."""
    if mask is None:
        return sq.mean()
    m = mask.to(torch.bool).reshape(mask.shape + (1,) * feature_dims).expand_as(sq)
    # torch.where, not sq * m: padded values may be inf/nan and must not leak into the sum.
    total = torch.where(m, sq, torch.zeros((), dtype=sq.dtype, device=sq.device)).sum()
    return total / m.sum().clamp(min=1)


def hidden_loss(student_hidden: Tensor, teacher_hidden: Tensor, projection: Projection,
                mask: Tensor | None = None) -> Tensor:
    """MSE between projection(H_S) [batch, seq, d_s -> d_t] and H_T [batch, seq, d_t], over real tokens."""
    diff = projection(student_hidden).float() - teacher_hidden.float()
    return _masked_mean(diff.pow(2), mask, feature_dims=1)


def embedding_loss(student_emb: Tensor, teacher_emb: Tensor, projection: Projection,
                   mask: Tensor | None = None) -> Tensor:
    """The hidden loss applied to the embedding layers' outputs (E_S W_e against E_T)."""
    return hidden_loss(student_emb, teacher_emb, projection, mask)


def pair_mask(mask: Tensor) -> Tensor:
    """[batch, seq] token mask -> [batch, 1, seq, seq]: 1 where both query and key are real tokens."""
    m = mask.to(torch.bool)
    return (m[:, None, :, None] & m[:, None, None, :])


def attention_loss(student_scores: Tensor, teacher_scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """MSE between pre-softmax attention scores QK^T/sqrt(d) [batch, heads, seq, seq], over heads and the
    (query, key) pairs of real tokens.

    When student and teacher have different head counts there is no head-to-head correspondence, so
    both sides are averaged over heads first and the single head-averaged score maps are matched.
    """
    if student_scores.shape[1] != teacher_scores.shape[1]:
        student_scores = student_scores.mean(dim=1, keepdim=True)
        teacher_scores = teacher_scores.mean(dim=1, keepdim=True)
    sq = (student_scores.float() - teacher_scores.float()).pow(2)
    if mask is None:
        return sq.mean()
    pm = pair_mask(mask).expand_as(sq)
    total = torch.where(pm, sq, torch.zeros((), dtype=sq.dtype, device=sq.device)).sum()
    return total / pm.sum().clamp(min=1)


def transformer_loss(student, teacher, mapping: list[int], embedding_projection: Projection,
                     hidden_projection: Projection, mask: Tensor | None, weights: LossWeights) -> dict[str, Tensor]:
    """The weighted sum over layers of the intermediate losses (embedding layer 0 <-> 0, student layer
    m <-> teacher layer mapping[m-1]); `student`/`teacher` are `capture.Internals`.

    Returns {"loss": total, "embedding": ..., "hidden": ..., "attention": ...} (parts summed over layers,
    unweighted) so progress bars can show them.
    """
    parts = {"embedding": embedding_loss(student.hidden_states[0], teacher.hidden_states[0], embedding_projection, mask)}
    hid = att = 0.0
    for m, n in enumerate(mapping, start=1):
        hid = hid + hidden_loss(student.hidden_states[m], teacher.hidden_states[n], hidden_projection, mask)
        att = att + attention_loss(student.scores[m], teacher.scores[n], mask)
    parts["hidden"], parts["attention"] = hid, att
    total = weights.embedding * parts["embedding"] + weights.hidden * hid + weights.attention * att
    return {"loss": total, **parts}
