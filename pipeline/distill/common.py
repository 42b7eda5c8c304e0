"""Pieces every distillation recipe shares: the teacher and its logits, the run's fingerprint for
--resume, typed method options, and dev scoring that keeps the best student."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from transformers import AutoModel

from pipeline.artifacts import read_manifest
from pipeline.data import dev_split, get_task
from pipeline.data.tasks import TaskSpec
from pipeline.distill.config import DistillConfig
from pipeline.distill.students import teacher_layer_subset
from pipeline.errors import BertforgeError
from pipeline.evaluate import evaluate, label_permutation
from pipeline.inference import TorchClassifier
from pipeline.models import load_classifier, resolve_model
from pipeline.training import CHECKPOINT_DIR


def require_task(cfg: DistillConfig) -> TaskSpec:
    """The task of a method that distils a fine-tuned teacher on a task."""
    if cfg.stage != "task" or not cfg.task:
        raise BertforgeError(f"method {cfg.method} distils a fine-tuned teacher on a task: use --stage task --task T")
    return get_task(cfg.task)


def run_config(cfg: DistillConfig, **extra) -> dict:
    """The settings that define the run (compared on --resume); threads and eval batch size do not."""
    d = dataclasses.asdict(cfg)
    for volatile in ("num_threads", "eval_batch_size"):
        d.pop(volatile)
    return {**d, **extra}


def check_fresh_or_resume(out: Path, resume: bool) -> None:
    if (out / CHECKPOINT_DIR).exists() and not resume:
        raise BertforgeError(f"{out} holds an unfinished run: pass --resume to continue it")


def options_from(cls, options: dict, method: str):
    """A typed options dataclass from `--method-option` strings (unknown keys are an error)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise BertforgeError(f"method {method} has no option {', '.join(unknown)}; its options: {', '.join(fields)}")
    values = {}
    for key, raw in options.items():
        kind = str(fields[key].type)
        try:
            if isinstance(raw, str) and raw.lower() in ("none", "null", ""):
                values[key] = None
            elif "bool" in kind:
                values[key] = raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes", "on")
            elif "float" in kind:
                values[key] = float(raw)
            elif "int" in kind:
                values[key] = int(raw)
            else:
                values[key] = raw
        except ValueError:
            raise BertforgeError(f"method {method}: option {key}={raw!r} is not a {kind}") from None
    return cls(**values)


def load_teacher(name: str, task: TaskSpec | None):
    """The teacher in eval mode without gradients: a fine-tuned classifier for a task, else an encoder."""
    if task is not None:
        teacher = load_classifier(name, task, require_head=True)
    else:
        try:
            teacher = AutoModel.from_pretrained(resolve_model(name))
        except (OSError, ValueError, RuntimeError) as e:
            raise BertforgeError(f"cannot load teacher from {name}: {str(e).splitlines()[0]}") from None
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


class BestDev:
    """Dev scoring of a live model (TrainLoop's evaluate_fn) and saving of the best one as a plain
    classifier folder (its save_best_fn); `metrics_for_manifest` gives the saved model's dev metrics."""

    def __init__(self, model, tokenizer, task: TaskSpec, dev, max_length: int, batch_size: int, out: Path):
        self.model, self.tokenizer, self.task, self.dev = model, tokenizer, task, dev
        self.max_length, self.batch_size, self.out = max_length, batch_size, Path(out)
        self.last = self.best = None

    def evaluate(self) -> float:
        result = evaluate("student", self.task.name, runtime=TorchClassifier.from_model(self.model, self.tokenizer),
                          max_length=self.max_length, batch_size=self.batch_size, progress=False, examples=self.dev)
        self.last = result.metrics
        return result.metrics["score"]

    def save(self, score: float) -> None:
        self.model.save_pretrained(self.out)
        self.tokenizer.save_pretrained(self.out)
        self.best = dict(self.last) if self.last else None

    def metrics_for_manifest(self) -> dict:
        metrics = self.best
        if metrics is None:  # resumed after the best was saved: score the saved best again
            metrics = evaluate(str(self.out), self.task.name, max_length=self.max_length, batch_size=self.batch_size,
                               progress=False, examples=self.dev).metrics
        return {dev_split(self.task): metrics, "dev": metrics}
