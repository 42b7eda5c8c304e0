"""Score an artifact (PyTorch or ONNX) on a GLUE split with the task's official metrics, and keep the best
checkpoint of a training run by its dev score."""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipeline.data import (GLUE_DIR_HELP, GLUE_TASKS, Collator, EncodedDataset, compute_metrics, dev_split, eval_loader,
                           get_task, load_glue, logits_to_predictions)
from pipeline.data.tasks import TaskSpec
from pipeline.errors import BertforgeError
from pipeline.inference import TorchClassifier, label_names, load_runtime
from pipeline.settings import setting


@dataclass
class EvalConfig:
    task: str = setting(help=f"GLUE task: {', '.join(GLUE_TASKS)}")
    model: str = setting(help="artifact folder (PyTorch or ONNX) or hub id")
    glue_dir: str | None = setting(None, GLUE_DIR_HELP, env="GLUE_DIR")
    split: str | None = setting(None, "default: dev (MNLI: dev_matched)")
    max_length: int | None = setting(None, "word-pieces per example (default: the task's)")
    batch_size: int = setting(64, "examples per batch")


@dataclass
class EvalResult:
    task: str
    split: str
    metrics: dict[str, float]
    num_examples: int
    wall_s: float
    predictions: np.ndarray | None = None  # class ids (STS-B: scores) in input order, for paired statistics

    def as_dict(self) -> dict:
        return {"task": self.task, "split": self.split, "metrics": self.metrics,
                "num_examples": self.num_examples, "wall_s": round(self.wall_s, 2)}


def label_permutation(config, task: TaskSpec) -> list[int] | None:
    """Column order that turns a model's logits into the task's label order, when the model names the
    same labels in another order (e.g. an MNLI model from the original BERT scripts). None: use as is."""
    if task.is_regression:
        return None
    names = [n.lower() for n in label_names(config)]
    wanted = [n.lower() for n in task.labels]
    if sorted(names) != sorted(wanted) or names == wanted:
        return None
    return [names.index(n) for n in wanted]


def predict_logits(runtime, examples, task: TaskSpec, max_length: int, batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """Logits of every example in input order, in the task's label order."""
    dataset = EncodedDataset(examples, runtime.tokenizer, max_length)
    loader = eval_loader(dataset, Collator(runtime.tokenizer, task.is_regression), batch_size)
    out = np.zeros((len(dataset), runtime.config.num_labels), dtype=np.float32)
    for batch in tqdm(loader, desc=f"eval {task.name}", disable=not progress, leave=False):
        idx = batch.pop("idx").numpy()
        batch.pop("labels", None)
        out[idx] = runtime({k: v.numpy() for k, v in batch.items()})
    perm = label_permutation(runtime.config, task)
    return out[:, perm] if perm else out


def evaluate(model: str | os.PathLike, task: str, data_dir: str | os.PathLike | None = None, split: str | None = None,
             max_length: int | None = None, batch_size: int = EvalConfig.batch_size, runtime=None, progress: bool = True,
             examples=None) -> EvalResult:
    """Official metrics of `model` on `task`'s dev split (or `split`)."""
    spec = get_task(task)
    split = split or dev_split(spec)
    runtime = runtime or load_runtime(model)
    if runtime.config.num_labels != spec.num_labels:
        raise BertforgeError(
            f"label-count mismatch: {model} has {runtime.config.num_labels} labels, task {spec.name} has {spec.num_labels}"
        )
    examples = examples if examples is not None else load_glue(spec.name, split, data_dir)
    if any(ex.label is None for ex in examples):
        raise BertforgeError(f"split {split} of {spec.name} has no labels to score against")
    start = time.perf_counter()
    logits = predict_logits(runtime, examples, spec, max_length or spec.default_max_length, batch_size, progress)
    predictions = logits_to_predictions(spec.name, logits)
    metrics = compute_metrics(spec.name, predictions, [ex.label for ex in examples])
    return EvalResult(spec.name, split, metrics, len(examples), time.perf_counter() - start, predictions)


def score_dev_once(folder: str | os.PathLike, task: str, glue_dir: str | os.PathLike | None = None,
                   max_length: int | None = None, dev: dict | None = None, **params) -> dict:
    """For a model whose best checkpoint was kept on rows carved from train: its manifest keeps that score as
    "selection" and gains the real dev score (so nothing shows the carved rows' score as dev), plus `params`.
    `dev`: metrics the caller already scored on the dev split. Returns the dev metrics."""
    from pipeline.artifacts import write_manifest

    spec = get_task(task)
    if dev is None:
        dev = evaluate(folder, spec.name, glue_dir, max_length=max_length, progress=False).metrics
    manifest = name_selection(folder, write=False)
    manifest.metrics.update({dev_split(spec): dev, "dev": dev})
    manifest.params.update(params)
    write_manifest(folder, manifest)
    return dev


def name_selection(folder: str | os.PathLike, write: bool = True):
    """The training loop names whichever rows it scored "dev": for a model trained on a selection folder they
    were rows carved from train, so its manifest calls them "selection" and shows no dev score. Named once: a
    manifest that already has a selection score keeps it (its "dev" is then the real dev score)."""
    from pipeline.artifacts import read_manifest, write_manifest

    manifest = read_manifest(folder)
    manifest.metrics = {"selection": manifest.metrics.get("selection", manifest.metrics.get("dev"))}
    for old, new in (("best_dev_score", "best_selection_score"), ("dev_history", "selection_history")):
        if old in manifest.params:
            manifest.params[new] = manifest.params.pop(old)
    if write:
        write_manifest(folder, manifest)
    return manifest


class BestDev:
    """Dev scoring of a live model (TrainLoop's evaluate_fn) and saving of the best one as a plain
    classifier folder (its save_best_fn); `metrics_for_manifest` gives the saved model's dev metrics.
    `write` replaces the plain save when a recipe saves more than weights and tokenizer."""

    def __init__(self, model, tokenizer, task: TaskSpec, dev, max_length: int, batch_size: int, out: Path,
                 write: Callable[[], None] | None = None):
        self.model, self.tokenizer, self.task, self.dev = model, tokenizer, task, dev
        self.max_length, self.batch_size, self.out = max_length, batch_size, Path(out)
        self.write = write
        self.last = self.best = None

    def evaluate(self) -> float:
        result = evaluate("student", self.task.name, runtime=TorchClassifier.from_model(self.model, self.tokenizer),
                          max_length=self.max_length, batch_size=self.batch_size, progress=False, examples=self.dev)
        self.last = result.metrics
        return result.metrics["score"]

    def save(self, score: float) -> None:
        if self.write:
            self.write()
        else:
            self.model.save_pretrained(self.out)
            self.tokenizer.save_pretrained(self.out)
        self.best = dict(self.last) if self.last else None

    def metrics_for_manifest(self) -> dict:
        metrics = self.best
        if metrics is None:  # resumed after the best was saved: score the saved best again
            metrics = evaluate(str(self.out), self.task.name, max_length=self.max_length, batch_size=self.batch_size,
                               progress=False, examples=self.dev).metrics
        return {dev_split(self.task): metrics, "dev": metrics}
