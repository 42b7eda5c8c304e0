"""Pieces every distillation recipe shares: the teacher and its logits, the run's fingerprint for
resuming, and the default student."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from pipeline.artifacts import read_manifest
from pipeline.data import get_task
from pipeline.data.tasks import TaskSpec
from pipeline.distill.config import DistillConfig
from pipeline.distill.students import teacher_layer_subset
from pipeline.errors import BertforgeError
from pipeline.evaluate import label_permutation
from pipeline.models import load_classifier, load_encoder
from pipeline.training import CHECKPOINT_DIR


def require_task(cfg: DistillConfig) -> TaskSpec:
    """The task of a method that distils a fine-tuned teacher on a task."""
    if cfg.stage != "task" or not cfg.task:
        raise BertforgeError(f"method {cfg.method} distils a fine-tuned teacher on a task: set stage task and a task")
    return get_task(cfg.task)


def run_config(cfg: DistillConfig, **extra) -> dict:
    """The settings that define the run (compared on --resume); threads and eval batch size do not."""
    d = dataclasses.asdict(cfg)
    for volatile in ("num_threads", "eval_batch_size"):
        d.pop(volatile)
    return {**d, **extra}


def check_fresh_or_resume(out: Path, resume: bool) -> None:
    if (out / CHECKPOINT_DIR).exists() and not resume:
        raise BertforgeError(f"{out} holds an unfinished run: resume it, or remove the folder to start over")


def load_teacher(name: str, task: TaskSpec | None):
    """The teacher in eval mode without gradients: a fine-tuned classifier for a task, else an encoder."""
    if task is not None:
        teacher = load_classifier(name, task, require_head=True)
    else:
        teacher = load_encoder(name)
    teacher.eval().requires_grad_(False)
    return teacher


def teacher_score(teacher: str) -> float | None:
    """The teacher's dev score from its manifest (None for a folder made elsewhere or a hub id)."""
    manifest = read_manifest(teacher) if Path(teacher).is_dir() else None
    return manifest.score if manifest else None


def default_student(cfg: DistillConfig, teacher_layers: int) -> DistillConfig:
    """With no student chosen: the teacher's first half of layers (at least one)."""
    if any(v is not None for v in vars(cfg.student).values()):
        return cfg
    first = ",".join(str(i) for i in range(1, max(1, teacher_layers // 2) + 1))
    return dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, init_from_teacher=first))


def student_note(cfg: DistillConfig, teacher) -> dict:
    """How the student was made, for the manifest (with the teacher layers it was copied from)."""
    desc = cfg.student.describe()
    if cfg.student.init_from_teacher is not None:
        desc["teacher_layers"] = teacher_layer_subset(teacher.config.num_hidden_layers, cfg.student.init_from_teacher)
    return desc


class TeacherLogits:
    """The teacher's logits in the task's label order; cached per example when `cache` (the teacher
    is frozen and in eval mode, so they are the same every epoch)."""

    def __init__(self, teacher, task: TaskSpec, cache: bool):
        self.teacher, self.cache = teacher, cache
        self.perm = label_permutation(teacher.config, task)
        self.store: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, batch: dict, idx: torch.Tensor) -> torch.Tensor:
        ids = idx.tolist()
        if self.cache and all(i in self.store for i in ids):
            return torch.stack([self.store[i] for i in ids])
        logits = self.teacher(**batch).logits.float()
        if self.perm:
            logits = logits[:, self.perm]
        if self.cache:
            self.store.update(zip(ids, logits))
        return logits
