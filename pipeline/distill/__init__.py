"""Knowledge distillation: TinyBERT's transformer distillation and the baselines it is compared with.

A method is a function `fn(cfg: DistillConfig, resume: bool = False, progress: bool = True) -> Manifest`
that writes the student artifact to `cfg.out`. METHODS names them as "module:function" so that the
CLI can list them without importing torch; adding a method is one module plus one line here, e.g.
`"kd": "pipeline.distill.kd:distill"`. Settings only one method reads are a typed section of
DistillConfig (`cfg.kd`, `cfg.theseus`, `cfg.early_exit`).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable

METHODS: dict[str, str] = {
    # intermediate layers (embeddings, hidden states, attention scores), then the prediction layer
    "tinybert": "pipeline.distill.transformer:distill_tinybert",
    # the prediction layer only: soft cross-entropy to the teacher's logits (no intermediate losses)
    "pred-only": "pipeline.distill.transformer:distill_prediction_layer",
    # no teacher signal at all: the student fine-tuned on the gold labels (the baseline)
    "labels-only": "pipeline.distill.transformer:train_on_labels",
    # Hinton soft labels: (1-alpha) CE(gold) + alpha T^2 KL(teacher_T || student_T)
    "kd": "pipeline.distill.kd:distill",
    # BERT-of-Theseus: progressive module replacing, then successor-only fine-tuning
    "theseus": "pipeline.distill.theseus:distill",
    # per-example teacher/gold weighting by the student's normalised prediction entropy (Dynamic KD)
    "difficulty": "pipeline.distill.difficulty:distill",
    # FastBERT exits for a fine-tuned classifier (--teacher), self-distilled from its final classifier
    "early-exit": "pipeline.distill.early_exit:distill",
}


def get_method(name: str) -> Callable:
    from pipeline.errors import BertforgeError

    if name not in METHODS:
        raise BertforgeError(f"unknown distillation method {name!r}; choose one of: {', '.join(METHODS)}")
    module, function = METHODS[name].split(":")
    return getattr(importlib.import_module(module), function)


def distill(cfg, resume: bool = False, progress: bool = True):
    """Run `cfg.method` on `cfg` (a `pipeline.distill.config.DistillConfig`); returns the student's Manifest."""
    return get_method(cfg.method)(cfg, resume=resume, progress=progress)
