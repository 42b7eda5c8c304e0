"""Pieces every distillation recipe shares: the teacher and its logits, the run's fingerprint for
resuming, and the default student."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from pipeline.artifacts import read_manifest
from pipeline.capture import Internals, ScoreCapture, run_with_internals
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


class TeacherInternals:
    """The teacher's embedding output and, for the mapped layers, layer outputs and attention scores:
    what intermediate-layer distillation matches, per batch.

    With a budget (MiB, > 0) they are kept per training example in fp16 on the CPU, up to the budget,
    and reused every later epoch: the teacher is frozen and in eval mode, so they never change, and its
    forward pass is about 40% of an intermediate step (docs/training.md). Every batch gets the
    fp16-rounded values, cached or not, so a run gives the same student whether an example came from
    the store or was recomputed (after --resume the store starts empty). Budget 0: the teacher runs on
    every batch and its fp32 outputs are used as they are.
    """

    def __init__(self, teacher, mapping: list[int], budget_mb: int):
        self.teacher = teacher
        self.capture = ScoreCapture(teacher, mapping)
        self.hidden_layers = [0, *sorted(set(mapping))]
        self.score_layers = sorted(set(mapping))
        self.num_layers = teacher.config.num_hidden_layers
        self.budget = budget_mb * 2**20
        self.used = 0
        self.store: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    @torch.no_grad()
    def __call__(self, batch: dict, idx: torch.Tensor) -> Internals:
        if self.budget <= 0:
            return run_with_internals(self.teacher, batch, self.capture, logits=False)
        mask = batch["attention_mask"]
        lengths = mask.sum(dim=1)
        # Stored rows are cut to their real tokens, so rebuilding a batch assumes right padding.
        positions = torch.arange(mask.shape[1], device=mask.device)
        if not torch.equal(mask.to(torch.bool), positions[None, :] < lengths[:, None]):
            raise BertforgeError("the teacher cache needs right-padded batches (set the tokenizer's padding_side)")
        ids, lengths = idx.tolist(), lengths.tolist()
        over_budget = {} if all(i in self.store for i in ids) else self._compute(batch, ids, lengths)
        return self._assemble(ids, lengths, mask.shape[1], mask.device, over_budget)

    def _compute(self, batch: dict, ids: list[int], lengths: list[int]) -> dict:
        """Run the teacher; store the batch's new rows within the budget and return the rest (they live
        only for this batch)."""
        t = run_with_internals(self.teacher, batch, self.capture, logits=False)
        hidden = [t.hidden_states[n].to("cpu", torch.float16) for n in self.hidden_layers]
        scores = [t.scores[n].to("cpu", torch.float16) for n in self.score_layers]
        over_budget = {}
        for row, (i, n) in enumerate(zip(ids, lengths)):
            if i in self.store:
                continue
            item = ([h[row, :n].clone() for h in hidden], [s[row, :, :n, :n].clone() for s in scores])
            size = sum(x.numel() * x.element_size() for part in item for x in part)
            if self.used + size <= self.budget:
                self.store[i] = item
                self.used += size
            else:
                over_budget[i] = item
        return over_budget

    def _assemble(self, ids: list[int], lengths: list[int], seq: int, device, over_budget: dict) -> Internals:
        items = [self.store.get(i) or over_budget[i] for i in ids]
        b = len(ids)
        hidden = {}
        for k, n in enumerate(self.hidden_layers):
            h = torch.zeros(b, seq, items[0][0][k].shape[-1], dtype=torch.float16)
            for row, (item, length) in enumerate(zip(items, lengths)):
                h[row, :length] = item[0][k]
            hidden[n] = h.to(device=device, dtype=torch.float32)
        scores = {}
        for k, n in enumerate(self.score_layers):
            s = torch.zeros(b, items[0][1][k].shape[0], seq, seq, dtype=torch.float16)
            for row, (item, length) in enumerate(zip(items, lengths)):
                s[row, :, :length, :length] = item[1][k]
            scores[n] = s.to(device=device, dtype=torch.float32)
        # Layers that are not mapped are never read: None keeps the tuple indexed by layer number.
        states = tuple(hidden.get(n) for n in range(self.num_layers + 1))
        return Internals(hidden_states=states, scores=scores)
