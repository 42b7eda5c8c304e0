"""Distillation weighted by sample difficulty, method `difficulty` (after Dynamic KD, Li et al., 2021:
uncertainty-based supervision adjustment).

How hard an example is for the student right now is measured by the normalised entropy of the
student's prediction (detached, so it steers the loss without being optimised itself):

    w_i = H(softmax(s_i)) / log C            in [0, 1]; C = number of classes

and the example's loss moves between the gold label and the teacher accordingly:

    loss_i = w_i * T^2 * KL(softmax(t_i / T) || softmax(s_i / T)) + (1 - w_i) * CE(s_i, y_i)
    loss   = mean_i loss_i

A confident student (low entropy: an easy example) learns mostly from the gold label; an uncertain
one (a hard example) mostly from the teacher's soft labels. Classification tasks only: a regression
output has no entropy. Training otherwise follows `kd` (same recipe, student and loop settings).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.artifacts import Manifest
from pipeline.distill.config import DistillConfig
from pipeline.distill.common import require_task
from pipeline.distill.kd import kd_loss, train_with_teacher
from pipeline.errors import BertforgeError


def difficulty_weights(student_logits: torch.Tensor) -> torch.Tensor:
    """w_i = H(softmax(s_i)) / log C per example, without gradient."""
    logits = student_logits.detach().float()
    log_p = F.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return entropy / math.log(logits.shape[-1])


def difficulty_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                    temperature: float = 1.0) -> dict[str, torch.Tensor]:
    weights = difficulty_weights(student_logits)
    parts = kd_loss(student_logits, teacher_logits, labels, weights, temperature)
    return {**parts, "teacher_weight": weights.mean()}


def distill(cfg: DistillConfig, resume: bool = False, progress: bool = True) -> Manifest:
    task = require_task(cfg)
    if task.is_regression:
        raise BertforgeError("method difficulty weighs examples by the entropy of a class prediction: "
                             f"{task.name} is a regression task (use kd)")
    def loss_of(s, t, y):
        return difficulty_loss(s, t, y, cfg.temperature)

    return train_with_teacher(cfg, loss_of, {"difficulty": {"weight": "H(softmax(student))/log(C)"}}, resume, progress)
