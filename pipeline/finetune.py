"""Recipe: fine-tune a BERT-family model on a GLUE task (the teacher of later stages).

Reads top to bottom: load data and model, train with the shared loop, keep the best dev checkpoint,
write the artifact's manifest.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pipeline.artifacts import Manifest, prepare_output_dir, write_manifest
from pipeline.data import Collator, EncodedDataset, dev_split, get_task, load_examples_file, load_glue
from pipeline.evaluate import evaluate
from pipeline.inference import TorchClassifier
from pipeline.models import count_parameters, load_classifier, load_tokenizer
from pipeline.training import LoopConfig, TrainLoop


@dataclass
class FinetuneConfig:
    task: str
    model: str
    out: str
    glue_dir: str | None = None
    train_file: str | None = None  # a TSV in the task's layout instead of GLUE train
    max_train_examples: int | None = None
    max_length: int | None = None  # default: 64 single sentence, 128 pairs
    eval_batch_size: int = 64
    num_threads: int | None = None
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=3, batch_size=32, learning_rate=5e-5))


def load_train_examples(task: str, glue_dir, train_file, max_examples):
    examples = load_examples_file(task, train_file) if train_file else load_glue(task, "train", glue_dir)
    return examples[:max_examples] if max_examples else examples


def finetune(cfg: FinetuneConfig, resume: bool = False, progress: bool = True) -> Manifest:
    start = time.perf_counter()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    task = get_task(cfg.task)
    out = prepare_output_dir(cfg.out)
    max_length = cfg.max_length or task.default_max_length

    train = load_train_examples(task.name, cfg.glue_dir, cfg.train_file, cfg.max_train_examples)
    dev = load_glue(task.name, dev_split(task), cfg.glue_dir)
    tokenizer = load_tokenizer(cfg.model)
    model = load_classifier(cfg.model, task)
    dataset = EncodedDataset(train, tokenizer, max_length)

    def loss_fn(batch):
        batch.pop("idx")
        return {"loss": model(**batch).loss}

    def evaluate_fn():
        result = evaluate(cfg.model, task.name, split=dev_split(task), runtime=TorchClassifier.from_model(model, tokenizer),
                          max_length=max_length, batch_size=cfg.eval_batch_size, progress=False,
                          examples=dev)
        evaluate_fn.metrics = result.metrics
        return result.metrics["score"]

    def save_best(score):
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        save_best.metrics = dict(evaluate_fn.metrics)

    loop = TrainLoop(cfg.loop, model, dataset, Collator(tokenizer, task.is_regression), loss_fn, out,
                     evaluate_fn, save_best, desc=f"finetune {task.name}", run_config=_run_config(cfg), progress=progress)
    best = loop.run(resume=resume)
    metrics = getattr(save_best, "metrics", None)
    if metrics is None:  # resumed after the best was saved: score the saved best again
        metrics = evaluate(str(out), task.name, cfg.glue_dir, max_length=max_length, progress=progress).metrics
    manifest = write_manifest(out, Manifest(
        stage="finetune", task=task.name, parent=cfg.model,
        params={**_run_config(cfg), "max_length": max_length, "train_examples": len(train), "best_dev_score": best,
                "dev_history": loop.history},
        seed=cfg.loop.seed, metrics={dev_split(task): metrics, "dev": metrics},
        num_parameters=count_parameters(model), wall_s=round(time.perf_counter() - start, 1),
    ))
    loop.finish()
    return manifest


def _run_config(cfg: FinetuneConfig) -> dict:
    d = asdict(cfg)
    d.pop("num_threads")
    d.pop("eval_batch_size")
    return d
