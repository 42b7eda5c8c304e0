"""BERT-of-Theseus: compression by progressive module replacing (Xu et al., 2020), method `theseus`.

The fine-tuned teacher (the predecessor, N layers) is cut into M modules of consecutive layers; each
module has a successor: one layer, initialised from the predecessor's first M layers as in the
paper's code. Phase 1, replacing: at every training step each module independently runs its
successor with probability p, else its original layers, and the task loss (gold labels, no
distillation loss) trains the successors through the mixed network. The predecessor's layers are
frozen; embeddings, pooler and classifier are shared and keep training (`freeze_shared` freezes them).
p follows the paper's linear curriculum p = min(1, b + k * t) over optimizer steps t (b = 0.3,
k = 0.0006), or stays constant (`replacing_rate`). Phase 2: the successors alone (embeddings, M
layers, pooler, classifier) are fine-tuned, keeping the best dev checkpoint. The artifact is a plain
M-layer `BertForSequenceClassification`.

Modules are grouped with the uniform layer mapping (12 -> 4: layers 1-3, 4-6, 7-9, 10-12; counts that
do not divide follow `pipeline.distill.mapping`'s rounding). Successors are stock `BertLayer`s taken
from the teacher itself, so no modelling code is forked: the encoder's layer list is swapped per step.

Method options: replacing_rate (constant p; default: the schedule), base_rate (b), slope (k),
successor_epochs (phase 2; default --epochs), freeze_shared. Phase 1 runs --epochs epochs.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from contextlib import contextmanager

import torch
from torch import nn
from transformers import BertForSequenceClassification

from pipeline.artifacts import Manifest, prepare_output_dir, write_manifest
from pipeline.data import Collator, EncodedDataset, dev_split, load_glue, load_train_examples
from pipeline.distill.config import DistillConfig, TheseusOptions
from pipeline.distill.common import (check_fresh_or_resume, default_student, load_teacher,
                                     require_task, run_config, teacher_score)
from pipeline.distill.mapping import layer_mapping
from pipeline.distill.students import teacher_layer_subset
from pipeline.errors import BertforgeError
from pipeline.evaluate import BestDev
from pipeline.models import count_parameters, load_tokenizer
from pipeline.training import CHECKPOINT_DIR, TrainLoop, seed_everything

REPLACING_DIR = "replacing"


def replacing_rate(step: int, opts: TheseusOptions) -> float:
    """The probability that a module runs its successor at optimizer step `step` (0-based)."""
    if opts.replacing_rate is not None:
        return float(opts.replacing_rate)
    return min(1.0, opts.base_rate + opts.slope * step)


def module_groups(teacher_layers: int, modules: int) -> list[list[int]]:
    """0-based predecessor layer indices of each module: module m ends at the uniform mapping's g(m)."""
    ends = layer_mapping(teacher_layers, modules, "uniform")
    starts = [0] + ends[:-1]
    return [list(range(s, e)) for s, e in zip(starts, ends)]


class TheseusModel(nn.Module):
    """The predecessor with its modules' successors; `forward` mixes them (training) or runs the
    successors alone (eval). At rest the encoder's layer list is empty, so each layer has exactly one
    name in the state dict (`predecessor.i` or `successor.m`)."""

    def __init__(self, teacher: BertForSequenceClassification, successor_init: list[int]):
        super().__init__()
        n = teacher.config.num_hidden_layers
        self.groups = module_groups(n, len(successor_init))
        self.model = teacher
        self.predecessor = teacher.bert.encoder.layer
        self.successor = nn.ModuleList([copy.deepcopy(self.predecessor[i - 1]) for i in successor_init])
        teacher.bert.encoder.layer = nn.ModuleList()
        self.predecessor.requires_grad_(False)
        self.successor.requires_grad_(True)
        self.rate = 0.0

    def chosen_layers(self) -> list[nn.Module]:
        if not self.training:
            return list(self.successor)
        replace = (torch.rand(len(self.groups)) < self.rate).tolist()
        layers = []
        for m, group in enumerate(self.groups):
            layers += [self.successor[m]] if replace[m] else [self.predecessor[i] for i in group]
        return layers

    @contextmanager
    def using(self, layers: list[nn.Module]):
        encoder = self.model.bert.encoder
        encoder.layer = nn.ModuleList(layers)
        try:
            yield self.model
        finally:
            encoder.layer = nn.ModuleList()

    def forward(self, **batch):
        with self.using(self.chosen_layers()) as model:
            return model(**batch)

    def successor_model(self) -> BertForSequenceClassification:
        """A plain M-layer classifier: shared embeddings, pooler and classifier, and the successors."""
        config = copy.deepcopy(self.model.config)
        config.num_hidden_layers = len(self.successor)
        student = BertForSequenceClassification(config)
        with self.using(list(self.successor)) as model:
            student.load_state_dict(model.state_dict())
        return student


def distill(cfg: DistillConfig, resume: bool = False, progress: bool = True) -> Manifest:
    start = time.perf_counter()
    opts = cfg.theseus
    if opts.replacing_rate is not None and not 0.0 < opts.replacing_rate <= 1.0:
        raise BertforgeError(f"theseus: a constant replacing rate must lie in (0, 1], got {opts.replacing_rate}")
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    task = require_task(cfg)
    out = prepare_output_dir(cfg.out)
    check_fresh_or_resume(out, resume)
    max_length = cfg.max_length or task.default_max_length
    train = load_train_examples(task.name, cfg.glue_dir, cfg.train_file, cfg.max_train_examples)
    dev = load_glue(task.name, dev_split(task), cfg.glue_dir)
    teacher = load_teacher(cfg.teacher, task)
    if not isinstance(teacher, BertForSequenceClassification):
        raise BertforgeError(f"theseus replaces BERT layers: {cfg.teacher} is a {type(teacher).__name__}")
    tokenizer = load_tokenizer(cfg.teacher)
    cfg = default_student(cfg, teacher.config.num_hidden_layers)
    if cfg.student.init_from_teacher is None:
        raise BertforgeError("theseus successors are copies of teacher layers: choose them with student.init_from_teacher "
                             "(a count or a layer list), not student.pretrained or student.config")
    init_layers = teacher_layer_subset(teacher.config.num_hidden_layers, cfg.student.init_from_teacher)
    dataset = EncodedDataset(train, tokenizer, max_length)
    collator = Collator(tokenizer, task.is_regression)
    fingerprint = run_config(cfg)

    # Phase 1: module replacing. Its result stays in OUT/checkpoints/replacing/successor until the end,
    # so --resume after a kill in phase 2 does not replay it.
    work = out / CHECKPOINT_DIR / REPLACING_DIR
    done = work / "successor"
    theseus = TheseusModel(teacher, init_layers)
    groups = theseus.groups
    if not (done / "config.json").is_file():
        theseus.model.requires_grad_(not opts.freeze_shared)  # the shared parts (its layer list is empty)
        seed_everything(cfg.loop.seed)

        def replacing_loss(batch):
            batch.pop("idx")
            theseus.rate = replacing_rate(loop.state["global_step"], opts)
            return {"loss": theseus(**batch).loss, "p": torch.tensor(theseus.rate)}

        loop = TrainLoop(cfg.loop, theseus, dataset, collator, replacing_loss, work,
                         desc=f"theseus {task.name}: replacing", run_config={**fingerprint, "phase": "replacing"},
                         progress=progress)
        loop.run(resume=resume)
        final_rate = theseus.rate
        tmp = work / "successor.tmp"
        theseus.successor_model().save_pretrained(tmp)
        tmp.replace(done)
        loop.finish()
    else:
        final_rate = None
    student = BertForSequenceClassification.from_pretrained(done)
    del theseus, teacher

    # Phase 2: successor fine-tuning.
    def loss_fn(batch):
        batch.pop("idx")
        return {"loss": student(**batch).loss}

    best_dev = BestDev(student, tokenizer, task, dev, max_length, cfg.eval_batch_size, out)
    phase2 = dataclasses.replace(cfg.loop, epochs=opts.successor_epochs or cfg.loop.epochs)
    loop = TrainLoop(phase2, student, dataset, collator, loss_fn, out, best_dev.evaluate, best_dev.save,
                     desc=f"theseus {task.name}: successor", run_config={**fingerprint, "phase": "successor"},
                     progress=progress)
    best = loop.run(resume=resume)
    manifest = write_manifest(out, Manifest(
        stage="distill", task=task.name, parent=cfg.teacher, seed=cfg.loop.seed,
        params={**fingerprint, "theseus": dataclasses.asdict(opts), "successor_init_layers": init_layers,
                "modules": [[i + 1 for i in g] for g in groups],
                "max_length": max_length, "train_examples": len(train), "best_dev_score": best,
                "final_replacing_rate": final_rate, "successor_epochs": phase2.epochs,
                "teacher_score": teacher_score(cfg.teacher)},
        metrics=best_dev.metrics_for_manifest(), num_parameters=count_parameters(student),
        wall_s=round(time.perf_counter() - start, 1),
    ))
    loop.finish()
    return manifest
