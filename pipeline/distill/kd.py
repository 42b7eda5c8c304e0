"""Soft-label knowledge distillation (Hinton et al., 2015), method `kd`.

    loss = (1 - alpha) * CE(student, gold) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The T^2 factor keeps the soft term's gradients on the same scale whatever the temperature. For the
regression task (STS-B) both terms are mean squared errors, to the gold score and to the teacher's.
The student is by default the teacher's embeddings and first half of its layers (12 -> 6, 6 -> 3;
any `--init-from-teacher`, `--student-config` or `--student` also works), so it starts close to the
teacher rather than from scratch.

Method options (`--method-option KEY=VALUE`): alpha (default 0.5). The temperature is `--temperature`.
This module also holds the recipe shared with `difficulty`: a student trained on one loss of its
logits, the teacher's logits and the gold labels, keeping the best dev checkpoint.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pipeline.artifacts import Manifest, prepare_output_dir, write_manifest
from pipeline.data import Collator, EncodedDataset, dev_split, load_glue, load_train_examples
from pipeline.distill.common import (TeacherLogits, check_fresh_or_resume, default_student, load_teacher,
                                     require_task, run_config, student_note, teacher_score)
from pipeline.distill.config import DistillConfig
from pipeline.distill.students import build_student
from pipeline.errors import BertforgeError
from pipeline.evaluate import BestDev
from pipeline.models import count_parameters, load_tokenizer
from pipeline.training import TrainLoop, seed_everything


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            alpha: float | torch.Tensor, temperature: float = 1.0, regression: bool = False) -> dict[str, torch.Tensor]:
    """(1 - alpha) * gold term + alpha * soft term, averaged over the batch; `alpha` may be one weight
    per example (shape [batch]). Returns the total and both terms (batch means) for the progress bar."""
    if regression:
        hard = F.mse_loss(student_logits.view(-1), labels.float().view(-1), reduction="none")
        soft = F.mse_loss(student_logits.view(-1), teacher_logits.view(-1), reduction="none")
    else:
        t = temperature
        hard = F.cross_entropy(student_logits, labels, reduction="none")
        soft = (t * t) * F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                                  reduction="none", log_target=True).sum(-1)
    loss = ((1 - alpha) * hard + alpha * soft).mean()
    return {"loss": loss, "gold": hard.mean().detach(), "soft": soft.mean().detach()}


def distill(cfg: DistillConfig, resume: bool = False, progress: bool = True) -> Manifest:
    opts = cfg.kd
    if not 0.0 <= opts.alpha <= 1.0:
        raise BertforgeError(f"kd: alpha must lie in [0, 1], got {opts.alpha}")
    task = require_task(cfg)

    def loss_of(s, t, y):
        return kd_loss(s, t, y, opts.alpha, cfg.temperature, task.is_regression)

    return train_with_teacher(cfg, loss_of, {"kd": dataclasses.asdict(opts)}, resume, progress)


# -- the recipe kd and difficulty share ----------------------------------------------------------
def train_with_teacher(cfg: DistillConfig, loss_of: Callable, method_params: dict, resume: bool = False,
                       progress: bool = True) -> Manifest:
    """Train a student on `loss_of(student_logits, teacher_logits, labels) -> {"loss", parts...}` with the
    shared loop (epochs and learning rate: `cfg.loop`), keep the best dev checkpoint, write the manifest."""
    start = time.perf_counter()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    task = require_task(cfg)
    out = prepare_output_dir(cfg.out)
    check_fresh_or_resume(out, resume)
    max_length = cfg.max_length or task.default_max_length
    train = load_train_examples(task.name, cfg.glue_dir, cfg.train_file, cfg.max_train_examples)
    dev = load_glue(task.name, dev_split(task), cfg.glue_dir)
    teacher = load_teacher(cfg.teacher, task)
    tokenizer = load_tokenizer(cfg.teacher)
    cfg = default_student(cfg, teacher.config.num_hidden_layers)
    seed_everything(cfg.loop.seed)
    student = build_student(cfg.student, teacher, tokenizer, task)
    targets = TeacherLogits(teacher, task, cfg.cache_teacher)
    dataset = EncodedDataset(train, tokenizer, max_length)
    fingerprint = run_config(cfg)

    def loss_fn(batch):
        idx = batch.pop("idx")
        labels = batch.pop("labels")
        return loss_of(student(**batch).logits, targets(batch, idx), labels)

    best_dev = BestDev(student, tokenizer, task, dev, max_length, cfg.eval_batch_size, out)
    loop = TrainLoop(cfg.loop, student, dataset, Collator(tokenizer, task.is_regression), loss_fn, out,
                     best_dev.evaluate, best_dev.save, desc=f"{cfg.method} {task.name}", run_config=fingerprint,
                     progress=progress)
    teacher.to(loop.device)
    best = loop.run(resume=resume)
    manifest = write_manifest(out, Manifest(
        stage="distill", task=task.name, parent=cfg.teacher, seed=cfg.loop.seed,
        params={**fingerprint, **method_params, "student": student_note(cfg, teacher), "max_length": max_length,
                "train_examples": len(train), "best_dev_score": best, "teacher_score": teacher_score(cfg.teacher)},
        metrics=best_dev.metrics_for_manifest(), num_parameters=count_parameters(student),
        wall_s=round(time.perf_counter() - start, 1),
    ))
    loop.finish()
    return manifest
