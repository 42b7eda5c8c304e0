"""Recipes: TinyBERT transformer distillation (general and task stages) and its two baselines.

General distillation: a pretrained teacher, unlabeled text; the student learns the teacher's
embedding output, layer outputs and attention scores (no prediction loss).

Task distillation, the paper's two steps as one run:
  1. intermediate layers: the same three losses on the task's (possibly augmented) training set;
  2. prediction layer: soft cross-entropy to the fine-tuned teacher's logits, keeping the best dev
     checkpoint.
Step 1 works in OUT/checkpoints/intermediate/ and leaves its student there, so `--resume` after a
kill anywhere continues in the right step. Projections (student -> teacher width) exist only in step
1 and are dropped: the artifact is a plain `BertForSequenceClassification` with the task's labels.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from transformers import BertForSequenceClassification

from pipeline.artifacts import Manifest, prepare_output_dir, write_manifest
from pipeline.data import Collator, EncodedDataset, Example, dev_split, get_task, load_glue, load_train_examples
from pipeline.data.tasks import TaskSpec
from pipeline.distill.capture import ScoreCapture, run_with_internals
from pipeline.distill.common import (TeacherInternals, TeacherLogits, check_fresh_or_resume, load_teacher, run_config,
                                     student_note, teacher_score)
from pipeline.distill.config import GENERAL_MAX_LENGTH, DistillConfig
from pipeline.distill.losses import prediction_loss, transformer_loss
from pipeline.distill.mapping import layer_mapping
from pipeline.distill.students import build_student
from pipeline.errors import BertforgeError
from pipeline.evaluate import BestDev
from pipeline.models import count_parameters, load_tokenizer
from pipeline.training import CHECKPOINT_DIR, LoopConfig, TrainLoop, seed_everything

INTERMEDIATE_DIR = "intermediate"


class Projections(nn.Module):
    """Learned maps from the student's width to the teacher's (W_e for embeddings, W_h shared by the
    layers, as in the paper); identity when the widths match."""

    def __init__(self, student_width: int, teacher_width: int):
        super().__init__()
        same = student_width == teacher_width
        self.embedding = nn.Identity() if same else nn.Linear(student_width, teacher_width)
        self.hidden = nn.Identity() if same else nn.Linear(student_width, teacher_width)


# -- methods (see pipeline.distill.METHODS) ------------------------------------------------------
def distill_tinybert(cfg: DistillConfig, resume: bool = False, progress: bool = True) -> Manifest:
    if cfg.stage == "general":
        return general_distillation(cfg, resume, progress)
    return task_distillation(cfg, resume, progress, steps=("intermediate", "prediction"))


def distill_prediction_layer(cfg: DistillConfig, resume: bool = False, progress: bool = True) -> Manifest:
    _require_task_stage(cfg)
    return task_distillation(cfg, resume, progress, steps=("prediction",))


def train_on_labels(cfg: DistillConfig, resume: bool = False, progress: bool = True) -> Manifest:
    _require_task_stage(cfg)
    return task_distillation(cfg, resume, progress, steps=("labels",))


def _require_task_stage(cfg: DistillConfig) -> None:
    if cfg.stage != "task":
        raise BertforgeError(f"method {cfg.method} is a task-stage method: set stage task")


# -- shared pieces -------------------------------------------------------------------------------
def intermediate_loss_fn(student, teacher, projections: Projections, mapping: list[int], cfg: DistillConfig,
                         epochs: int):
    """loss_fn for TrainLoop: embedding + hidden + attention losses of one batch.

    The hooks stay registered for the life of the run (they cost nothing while unused). The teacher's
    side comes from `TeacherInternals`, kept per example across epochs within `cfg.teacher_cache_mb`
    (a one-epoch step would only fill memory, so it keeps nothing)."""
    s_cap = ScoreCapture(student)
    keep = cfg.cache_teacher and epochs > 1
    targets = TeacherInternals(teacher, mapping, cfg.teacher_cache_mb if keep else 0)

    def loss_fn(batch):
        idx = batch.pop("idx")
        batch.pop("labels", None)
        t = targets(batch, idx)
        s = run_with_internals(student, batch, s_cap, logits=False)
        return transformer_loss(s, t, mapping, projections.embedding, projections.hidden,
                                batch["attention_mask"], cfg.weights)

    return loss_fn


def track_epoch_losses(loop: TrainLoop) -> None:
    """Keep the mean of each loss part per epoch in the loop's state, so it is checkpointed with it
    and survives --resume; `epoch_loss_summary` reads it for the manifest."""
    loss_fn = loop.loss_fn

    def tracked(batch):
        parts = loss_fn(batch)
        epochs = loop.state.setdefault("epoch_losses", {})
        acc = epochs.setdefault(loop.state["epoch"], {"steps": 0})
        acc["steps"] += 1
        for k, v in parts.items():
            acc[k] = acc.get(k, 0.0) + float(v.detach())
        return parts

    loop.loss_fn = tracked


def epoch_loss_summary(loop: TrainLoop) -> dict:
    """{"first_epoch": {part: mean}, "last_epoch": {...}} of the losses seen while training."""
    epochs = loop.state.get("epoch_losses") or {}
    if not epochs:
        return {}
    means = {e: {k: round(v / acc["steps"], 6) for k, v in acc.items() if k != "steps"} for e, acc in epochs.items()}
    return {"first_epoch": means[min(means)], "last_epoch": means[max(means)], "epochs_seen": len(means)}


# -- general distillation ------------------------------------------------------------------------
def read_corpus(path: str | None, max_examples: int | None) -> list[Example]:
    if not path:
        raise BertforgeError("general distillation needs a corpus (a text file, one text per line)")
    p = Path(path)
    if not p.is_file():
        raise BertforgeError(f"corpus {p} not found")
    texts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise BertforgeError(f"corpus {p} holds no text")
    texts = texts[:max_examples] if max_examples else texts
    return [Example(t, None, None) for t in texts]


def general_distillation(cfg: DistillConfig, resume: bool = False, progress: bool = True) -> Manifest:
    start = time.perf_counter()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = prepare_output_dir(cfg.out)
    check_fresh_or_resume(out, resume)
    texts = read_corpus(cfg.corpus, cfg.max_train_examples)
    teacher = load_teacher(cfg.teacher, None)
    tokenizer = load_tokenizer(cfg.teacher)
    seed_everything(cfg.loop.seed)  # a reproducible random student
    student = build_student(cfg.student, teacher, tokenizer, None)
    mapping = layer_mapping(teacher.config.num_hidden_layers, student.config.num_hidden_layers, cfg.mapping)
    max_length = cfg.max_length or GENERAL_MAX_LENGTH
    dataset = EncodedDataset(texts, tokenizer, max_length)
    projections = Projections(student.config.hidden_size, teacher.config.hidden_size)
    modules = nn.ModuleDict({"student": student, "projections": projections})

    loop = TrainLoop(cfg.loop, modules, dataset, Collator(tokenizer, regression=False),
                     intermediate_loss_fn(student, teacher, projections, mapping, cfg, cfg.loop.epochs), out,
                     desc="general distillation", run_config=run_config(cfg), progress=progress)
    track_epoch_losses(loop)
    teacher.to(loop.device)
    loop.run(resume=resume)
    student = loop.accelerator.unwrap_model(loop.modules)["student"]
    if loop.accelerator.is_main_process:
        student.save_pretrained(out)
        tokenizer.save_pretrained(out)
    manifest = write_manifest(out, Manifest(
        stage="distill", task=None, parent=cfg.teacher, seed=cfg.loop.seed,
        params={**run_config(cfg), "stage": "general", "student": student_note(cfg, teacher),
                "layer_mapping": mapping, "max_length": max_length, "train_examples": len(texts),
                "train_loss": epoch_loss_summary(loop),
                "schedule": {"epochs": cfg.loop.epochs, "learning_rate": cfg.loop.learning_rate,
                             "batch_size": cfg.loop.batch_size, "max_steps_per_epoch": cfg.loop.max_steps_per_epoch}},
        num_parameters=count_parameters(student), wall_s=round(time.perf_counter() - start, 1),
    ))
    loop.finish()
    return manifest


# -- task distillation ---------------------------------------------------------------------------
def task_schedule(cfg: DistillConfig, task: TaskSpec) -> dict[str, LoopConfig]:
    """The loop settings of each step: the paper's table unless overridden (see config.py)."""
    return {
        "intermediate": replace(cfg.loop, epochs=cfg.intermediate_epochs_for(task.name), learning_rate=cfg.intermediate_lr),
        "prediction": replace(cfg.loop, epochs=cfg.prediction_epochs, learning_rate=cfg.prediction_lr),
        "labels": replace(cfg.loop, epochs=cfg.prediction_epochs, learning_rate=cfg.prediction_lr),
    }


def task_distillation(cfg: DistillConfig, resume: bool = False, progress: bool = True,
                      steps: tuple[str, ...] = ("intermediate", "prediction")) -> Manifest:
    """`steps`: ("intermediate", "prediction") TinyBERT, ("prediction",) prediction layer only,
    ("labels",) the student trained on gold labels with no teacher signal."""
    start = time.perf_counter()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if not cfg.task:
        raise BertforgeError("task distillation needs a task")
    task = get_task(cfg.task)
    out = prepare_output_dir(cfg.out)
    check_fresh_or_resume(out, resume)
    max_length = cfg.max_length or task.default_max_length
    schedule = task_schedule(cfg, task)

    train = load_train_examples(task.name, cfg.glue_dir, cfg.train_file, cfg.max_train_examples)
    dev = load_glue(task.name, dev_split(task), cfg.glue_dir)
    # The teacher also supplies the tokenizer and, with --init-from-teacher, the student's weights.
    teacher = load_teacher(cfg.teacher, task)
    tokenizer = load_tokenizer(cfg.teacher)
    seed_everything(cfg.loop.seed)
    student = build_student(cfg.student, teacher, tokenizer, task)
    note = student_note(cfg, teacher)
    mapping = None
    if "intermediate" in steps:
        mapping = layer_mapping(teacher.config.num_hidden_layers, student.config.num_hidden_layers, cfg.mapping)
    dataset = EncodedDataset(train, tokenizer, max_length)
    collator = Collator(tokenizer, task.is_regression)
    fingerprint = run_config(cfg, steps=list(steps))

    train_loss = {}
    if "intermediate" in steps:
        student, train_loss["intermediate"] = _intermediate_step(
            cfg, schedule["intermediate"], student, teacher, mapping, dataset, collator, out, resume, progress, fingerprint)

    last = steps[-1]
    targets = TeacherLogits(teacher, task, cfg.cache_teacher) if last == "prediction" else None
    if targets is None:
        del teacher  # labels only: the teacher's part ended with the student's initialisation

    def loss_fn(batch):
        idx = batch.pop("idx")
        if targets is None:
            return {"loss": student(**batch).loss}
        batch.pop("labels", None)  # the prediction step learns from the teacher alone
        loss = prediction_loss(student(**batch).logits, targets(batch, idx), cfg.temperature, task.is_regression)
        return {"loss": cfg.weights.prediction * loss, "prediction": loss}

    best_dev = BestDev(student, tokenizer, task, dev, max_length, cfg.eval_batch_size, out)
    loop = TrainLoop(schedule[last], student, dataset, collator, loss_fn, out, best_dev.evaluate, best_dev.save,
                     desc=f"{cfg.method} {task.name}: {last}", run_config={**fingerprint, "step": last},
                     progress=progress)
    track_epoch_losses(loop)
    if targets is not None:
        targets.teacher.to(loop.device)
    best = loop.run(resume=resume)
    train_loss[last] = epoch_loss_summary(loop)
    manifest = write_manifest(out, Manifest(
        stage="distill", task=task.name, parent=cfg.teacher, seed=cfg.loop.seed,
        params={**fingerprint, "student": note,
                "layer_mapping": mapping,
                "max_length": max_length, "train_examples": len(train), "best_dev_score": best,
                "train_loss": train_loss,
                "teacher_score": teacher_score(cfg.teacher),
                "schedule": {s: {"epochs": schedule[s].epochs, "learning_rate": schedule[s].learning_rate,
                                 "batch_size": schedule[s].batch_size,
                                 "max_steps_per_epoch": schedule[s].max_steps_per_epoch} for s in steps}},
        metrics=best_dev.metrics_for_manifest(),
        num_parameters=count_parameters(student), wall_s=round(time.perf_counter() - start, 1),
    ))
    loop.finish()
    return manifest


def _intermediate_step(cfg, loop_cfg, student, teacher, mapping, dataset, collator, out: Path, resume, progress,
                       fingerprint) -> tuple[BertForSequenceClassification, dict]:
    """Step 1; returns the student after it (reloaded from disk when an earlier run finished the step)
    and the step's loss summary."""
    work = out / CHECKPOINT_DIR / INTERMEDIATE_DIR
    done = work / "student"
    if (done / "config.json").is_file():
        summary = json.loads((done / "step.json").read_text())["train_loss"]
        return BertForSequenceClassification.from_pretrained(done), summary
    projections = Projections(student.config.hidden_size, teacher.config.hidden_size)
    modules = nn.ModuleDict({"student": student, "projections": projections})
    loop = TrainLoop(loop_cfg, modules, dataset, collator,
                     intermediate_loss_fn(student, teacher, projections, mapping, cfg, loop_cfg.epochs), work,
                     desc=f"{cfg.method} {cfg.task}: intermediate", run_config={**fingerprint, "step": "intermediate"},
                     progress=progress)
    track_epoch_losses(loop)
    teacher.to(loop.device)
    loop.run(resume=resume)
    student = loop.accelerator.unwrap_model(loop.modules)["student"]
    summary = epoch_loss_summary(loop)
    if loop.accelerator.is_main_process:
        tmp = work / "student.tmp"
        student.save_pretrained(tmp)
        (tmp / "step.json").write_text(json.dumps({"step": "intermediate", "mapping": mapping, "train_loss": summary}))
        tmp.replace(done)
    loop.finish()  # the step's resume state; its student stays until the whole run is finished
    return student, summary

