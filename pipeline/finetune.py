"""Recipe: fine-tune a BERT-family model on a GLUE task (the teacher of later stages).

Reads top to bottom: load data and model, train with the shared loop, keep the best dev checkpoint,
write the artifact's manifest.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from pipeline.artifacts import Manifest, prepare_output_dir, write_manifest
from pipeline.data import (GLUE_DIR_HELP, GLUE_TASKS, Collator, EncodedDataset, dev_split, get_task, load_glue,
                           load_train_examples)
from pipeline.evaluate import BestDev
from pipeline.models import count_parameters, load_classifier, load_tokenizer
from pipeline.settings import setting
from pipeline.training import LoopConfig, TrainLoop, seed_everything


@dataclass
class FinetuneConfig:
    task: str = setting(help=f"GLUE task: {', '.join(GLUE_TASKS)}")
    model: str = setting(help="hub id, model folder, or all-MiniLM-L6-v2 (packaged, offline)")
    out: str = setting(help="the fine-tuned model's folder")
    glue_dir: str | None = setting(None, GLUE_DIR_HELP, env="GLUE_DIR")
    train_file: str | None = setting(None, "TSV in the task's layout instead of GLUE train")
    max_train_examples: int | None = setting(None, "train on the first N examples only")
    max_length: int | None = setting(None, "word-pieces per example (default 64 single sentence / 128 pairs)")
    eval_batch_size: int = setting(64, "examples per dev-scoring batch")
    num_threads: int | None = setting(None, "CPU threads for torch", flag="--threads")
    loop: LoopConfig = setting(factory=lambda: LoopConfig(epochs=3, batch_size=32, learning_rate=5e-5))


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
    # The classification head is new weights: drawn from the seed, not from whatever state the process's
    # RNG is in, or the same command and seed gives another teacher in every process.
    seed_everything(cfg.loop.seed)
    model = load_classifier(cfg.model, task)
    dataset = EncodedDataset(train, tokenizer, max_length)

    def loss_fn(batch):
        batch.pop("idx")
        return {"loss": model(**batch).loss}

    best_dev = BestDev(model, tokenizer, task, dev, max_length, cfg.eval_batch_size, out)
    loop = TrainLoop(cfg.loop, model, dataset, Collator(tokenizer, task.is_regression), loss_fn, out,
                     best_dev.evaluate, best_dev.save, desc=f"finetune {task.name}", run_config=_run_config(cfg),
                     progress=progress)
    best = loop.run(resume=resume)
    metrics = best_dev.metrics_for_manifest()
    manifest = write_manifest(out, Manifest(
        stage="finetune", task=task.name, parent=cfg.model,
        params={**_run_config(cfg), "max_length": max_length, "train_examples": len(train), "best_dev_score": best,
                "dev_history": loop.history},
        seed=cfg.loop.seed, metrics=metrics,
        num_parameters=count_parameters(model), wall_s=round(time.perf_counter() - start, 1),
    ))
    loop.finish()
    return manifest


def _run_config(cfg: FinetuneConfig) -> dict:
    d = asdict(cfg)
    d.pop("num_threads")
    d.pop("eval_batch_size")
    return d
