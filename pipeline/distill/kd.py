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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.artifacts import Manifest, prepare_output_dir, read_manifest, write_manifest
from pipeline.data import Collator, EncodedDataset, dev_split, get_task, load_glue
from pipeline.data.tasks import TaskSpec
from pipeline.distill.config import DistillConfig
from pipeline.distill.students import build_student
from pipeline.errors import BertforgeError
from pipeline.evaluate import evaluate
from pipeline.finetune import load_train_examples
from pipeline.inference import TorchClassifier
from pipeline.models import count_parameters, load_tokenizer
from pipeline.training import TrainLoop, seed_everything


@dataclass
class KDOptions:
    alpha: float = 0.5  # weight of the teacher's soft labels; 1 - alpha goes to the gold labels


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
    opts = options_from(KDOptions, cfg.method_options, cfg.method)
    if not 0.0 <= opts.alpha <= 1.0:
        raise BertforgeError(f"kd: alpha must lie in [0, 1], got {opts.alpha}")
    task = _task(cfg)

    def loss_of(s, t, y):
        return kd_loss(s, t, y, opts.alpha, cfg.temperature, task.is_regression)

    return train_with_teacher(cfg, loss_of, {"kd": dataclasses.asdict(opts)}, resume, progress)


# -- the recipe kd and difficulty share ----------------------------------------------------------
def _task(cfg: DistillConfig) -> TaskSpec:
    if cfg.stage != "task" or not cfg.task:
        raise BertforgeError(f"method {cfg.method} distils a fine-tuned teacher on a task: use --stage task --task T")
    return get_task(cfg.task)


def default_student(cfg: DistillConfig, teacher_layers: int) -> DistillConfig:
    """With no student chosen: the teacher's first half of layers (at least one)."""
    if any(v is not None for v in vars(cfg.student).values()):
        return cfg
    first = ",".join(str(i) for i in range(1, max(1, teacher_layers // 2) + 1))
    return dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, init_from_teacher=first))


def train_with_teacher(cfg: DistillConfig, loss_of: Callable, method_params: dict, resume: bool = False,
                       progress: bool = True) -> Manifest:
    """Train a student on `loss_of(student_logits, teacher_logits, labels) -> {"loss", parts...}` with the
    shared loop (epochs and learning rate: `cfg.loop`), keep the best dev checkpoint, write the manifest."""
    from pipeline.distill.transformer import (TeacherLogits, _check_fresh_or_resume, _run_config,
                                              _student_layers_note, load_teacher)

    start = time.perf_counter()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    task = _task(cfg)
    out = prepare_output_dir(cfg.out)
    _check_fresh_or_resume(out, resume)
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
    run_config = _run_config(cfg)

    def loss_fn(batch):
        idx = batch.pop("idx")
        labels = batch.pop("labels")
        return loss_of(student(**batch).logits, targets(batch, idx), labels)

    best_dev = BestDev(student, tokenizer, task, dev, max_length, cfg.eval_batch_size, out)
    loop = TrainLoop(cfg.loop, student, dataset, Collator(tokenizer, task.is_regression), loss_fn, out,
                     best_dev.evaluate, best_dev.save, desc=f"{cfg.method} {task.name}", run_config=run_config,
                     progress=progress)
    teacher.to(loop.device)
    best = loop.run(resume=resume)
    manifest = write_manifest(out, Manifest(
        stage="distill", task=task.name, parent=cfg.teacher, seed=cfg.loop.seed,
        params={**run_config, **method_params, "student": _student_layers_note(cfg, teacher), "max_length": max_length,
                "train_examples": len(train), "best_dev_score": best, "teacher_score": teacher_score(cfg.teacher)},
        metrics=best_dev.metrics_for_manifest(), num_parameters=count_parameters(student),
        wall_s=round(time.perf_counter() - start, 1),
    ))
    loop.finish()
    return manifest


class BestDev:
    """Dev scoring of a live model and saving of the best one (a plain classifier folder)."""

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


def teacher_score(teacher: str) -> float | None:
    manifest = read_manifest(teacher) if Path(teacher).is_dir() else None
    return manifest.score if manifest else None
