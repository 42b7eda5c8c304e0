"""Losses more than one stage trains with: distillation and pruning's recovery both match a student's
logits, hidden states and attention scores to a teacher's (TinyBERT, Jiao et al. 2020, section 3.1).

The hidden and attention losses are means over real tokens: padding never contributes, so a batch's loss
does not depend on how far it was padded (see pipeline/distill/losses.py for how this differs from the
official TinyBERT code)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Projection = Callable[[Tensor], Tensor]


def prediction_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                    regression: bool | None = None) -> Tensor:
    """Soft cross-entropy: batch mean of -sum_c softmax(t/T)_c log softmax(s/T)_c.

    For a regression head (one output; `regression=None` detects it from the shape) it is the MSE to
    the teacher's prediction instead.
    """
    if regression is None:
        regression = student_logits.shape[-1] == 1
    if regression:
        return F.mse_loss(student_logits.float().reshape(-1), teacher_logits.float().reshape(-1))
    t = F.softmax(teacher_logits.float() / temperature, dim=-1)
    return -(t * F.log_softmax(student_logits.float() / temperature, dim=-1)).sum(dim=-1).mean()


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
