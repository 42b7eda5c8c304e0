"""Losses more than one stage trains with: distillation's prediction layer and pruning's recovery both
match a student's logits to a teacher's."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


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
