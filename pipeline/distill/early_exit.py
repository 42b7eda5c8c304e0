"""Adaptive early exit (FastBERT, Liu et al., 2020), method `early-exit`.

A fine-tuned classifier (a teacher or a distilled student) gets a small classifier (a "branch":
[CLS] -> Linear -> tanh -> Linear) after each layer but the last, whose own classifier stays the
final one. Branches are trained by self-distillation: the backbone and final classifier are frozen,
and each branch learns the final classifier's distribution, loss = sum over branches of
KL(p_final || p_branch), on the task's training texts (labels are not used).

At inference a sample leaves at the first layer whose branch is confident enough, normalised entropy
H(p) / log C < threshold; layers run one at a time on the samples still inside, so the remaining layers
are really not computed for those that left. Threshold 0 never exits early (the full model);
threshold 1 leaves after the first layer. `speed_accuracy_curve` scores a set of thresholds.

The artifact is the backbone as a plain `BertForSequenceClassification` folder (every other tool
loads it and ignores the exits) plus `early_exit.pt` and `early_exit.json` for the branches.
Method options: branch_hidden (default 128), thresholds (for the curve in the manifest,
e.g. "0,0.1,0.2,0.3,0.5,0.8").
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertForSequenceClassification

from pipeline.artifacts import Manifest, prepare_output_dir, write_manifest
from pipeline.data import (Collator, EncodedDataset, compute_metrics, dev_split, eval_loader, load_glue, load_train_examples,
                           logits_to_predictions)
from pipeline.distill.config import DEFAULT_THRESHOLDS, DistillConfig  # noqa: F401  (DEFAULT_THRESHOLDS: the curve script)
from pipeline.distill.common import (check_fresh_or_resume, load_teacher, require_task, run_config,
                                     teacher_score)
from pipeline.errors import BertforgeError
from pipeline.models import count_parameters, load_tokenizer
from pipeline.training import TrainLoop

EXITS_FILE = "early_exit.pt"
EXITS_CONFIG = "early_exit.json"


def normalised_entropy(logits: torch.Tensor) -> torch.Tensor:
    log_p = F.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1) / math.log(logits.shape[-1])


class Branch(nn.Module):
    def __init__(self, hidden: int, branch_hidden: int, num_labels: int):
        super().__init__()
        self.dense = nn.Linear(hidden, branch_hidden)
        self.out = nn.Linear(branch_hidden, num_labels)

    def forward(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.dense(cls_hidden)))


class EarlyExitBert(nn.Module):
    def __init__(self, model: BertForSequenceClassification, branch_hidden: int = 128):
        super().__init__()
        if not isinstance(model, BertForSequenceClassification):
            raise BertforgeError(f"early exit needs a BertForSequenceClassification, got {type(model).__name__}")
        if model.config.num_labels < 2:
            raise BertforgeError("early exit decides by the entropy of a class prediction: not for regression tasks")
        self.model = model
        self.branch_hidden = branch_hidden
        c = model.config
        self.branches = nn.ModuleList([Branch(c.hidden_size, branch_hidden, c.num_labels)
                                       for _ in range(c.num_hidden_layers - 1)])

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    def all_logits(self, **batch) -> list[torch.Tensor]:
        """Logits after every layer (branches, then the final classifier), with the full model run."""
        out = self.model(**batch, output_hidden_states=True)
        hidden = out.hidden_states  # embeddings, layer 1, ..., layer L
        return [branch(hidden[i + 1][:, 0]) for i, branch in enumerate(self.branches)] + [out.logits]

    def self_distillation_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        self.model.eval()  # the frozen backbone (no dropout) gives the targets it gives at inference
        logits = self.all_logits(**batch)
        target = F.log_softmax(logits[-1].detach().float(), -1)
        parts = [F.kl_div(F.log_softmax(b.float(), -1), target, reduction="batchmean", log_target=True) for b in logits[:-1]]
        return {"loss": torch.stack(parts).sum(), **{f"kl{i + 1}": p.detach() for i, p in enumerate(parts)}}

    @torch.no_grad()
    def predict(self, input_ids, attention_mask, token_type_ids=None, threshold: float = 0.5):
        """(logits [batch, labels], exit layer per sample, 1-based). Each layer runs only on the samples
        that have not left yet."""
        bert = self.model.bert
        hidden = bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        mask = self.model.get_extended_attention_mask(attention_mask, input_ids.shape)
        n = input_ids.shape[0]
        logits = torch.zeros(n, self.model.config.num_labels, device=input_ids.device)
        exits = torch.full((n,), self.num_layers, dtype=torch.long)
        active = torch.arange(n, device=input_ids.device)
        for i, layer in enumerate(bert.encoder.layer):
            hidden = layer(hidden, attention_mask=mask)[0]
            if i == self.num_layers - 1:
                logits[active] = self.model.classifier(bert.pooler(hidden)).float()
                break
            branch_logits = self.branches[i](hidden[:, 0]).float()
            leave = normalised_entropy(branch_logits) < threshold
            if leave.any():
                logits[active[leave]] = branch_logits[leave]
                exits[active[leave].cpu()] = i + 1
                stay = ~leave
                active, hidden, mask = active[stay], hidden[stay], mask[stay]
            if len(active) == 0:
                break
        return logits, exits

    def save_pretrained(self, out: str | Path, tokenizer=None) -> None:
        out = Path(out)
        self.model.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        torch.save(self.branches.state_dict(), out / EXITS_FILE)
        (out / EXITS_CONFIG).write_text(json.dumps({"branch_hidden": self.branch_hidden, "branches": len(self.branches),
                                                    "exit_rule": "normalised entropy < threshold"}, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> EarlyExitBert:
        folder = Path(folder)
        if not (folder / EXITS_CONFIG).is_file():
            raise BertforgeError(f"{folder} has no early exits ({EXITS_CONFIG}): train them with the early-exit method")
        meta = json.loads((folder / EXITS_CONFIG).read_text())
        self = cls(BertForSequenceClassification.from_pretrained(folder), meta["branch_hidden"])
        self.branches.load_state_dict(torch.load(folder / EXITS_FILE, map_location="cpu"))
        return self.eval()


def parse_thresholds(text: str) -> list[float]:
    try:
        values = sorted({float(v) for v in str(text).split(",") if v.strip()})
    except ValueError:
        raise BertforgeError(f"thresholds {text!r}: expected numbers separated by commas") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise BertforgeError(f"thresholds {text!r}: expected values in [0, 1]")
    return values


def speed_accuracy_curve(model: EarlyExitBert, tokenizer, task: str, examples, thresholds: list[float],
                         max_length: int, batch_size: int = 32) -> list[dict]:
    """One row per threshold: dev score, mean exit layer, share of layer computations done, wall time and
    speed-up against threshold 0 (the full model), all measured in this one run on the same batches."""
    model.eval()
    dataset = EncodedDataset(examples, tokenizer, max_length)
    batches = list(eval_loader(dataset, Collator(tokenizer, regression=False), batch_size))
    labels = [ex.label for ex in examples]
    device = next(model.parameters()).device
    rows = []
    for threshold in sorted(set([0.0, *thresholds])):
        logits = np.zeros((len(dataset), model.model.config.num_labels), dtype=np.float32)
        exits = np.zeros(len(dataset), dtype=np.int64)
        start = time.perf_counter()
        for batch in batches:
            idx = batch["idx"].numpy()
            feed = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
            out, ex = model.predict(**feed, threshold=threshold)
            logits[idx], exits[idx] = out.cpu().numpy(), ex.numpy()
        wall = time.perf_counter() - start
        metrics = compute_metrics(task, logits_to_predictions(task, logits), labels)
        rows.append({"threshold": threshold, "score": metrics["score"], "metrics": metrics,
                     "mean_exit_layer": float(exits.mean()), "layer_fraction": float(exits.mean() / model.num_layers),
                     "wall_s": round(wall, 4)})
    full = rows[0]["wall_s"]
    for row in rows:
        row["speedup"] = round(full / row["wall_s"], 3) if row["wall_s"] else None
    return rows


def distill(cfg: DistillConfig, resume: bool = False, progress: bool = True) -> Manifest:
    """Train exits for the fine-tuned classifier `cfg.teacher` (self-distillation; `cfg.loop` settings),
    save it with them to `cfg.out`, and put the speed/accuracy curve on dev in the manifest."""
    start = time.perf_counter()
    opts = cfg.early_exit
    thresholds = parse_thresholds(opts.thresholds)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    task = require_task(cfg)
    if task.is_regression:
        raise BertforgeError(f"early exit decides by the entropy of a class prediction: {task.name} is a regression task")
    out = prepare_output_dir(cfg.out)
    check_fresh_or_resume(out, resume)
    max_length = cfg.max_length or task.default_max_length
    train = load_train_examples(task.name, cfg.glue_dir, cfg.train_file, cfg.max_train_examples)
    dev = load_glue(task.name, dev_split(task), cfg.glue_dir)
    backbone = load_teacher(cfg.teacher, task)  # frozen, eval mode
    tokenizer = load_tokenizer(cfg.teacher)
    torch.manual_seed(cfg.loop.seed)
    model = EarlyExitBert(backbone, opts.branch_hidden)
    dataset = EncodedDataset(train, tokenizer, max_length)
    fingerprint = run_config(cfg)

    def loss_fn(batch):
        batch.pop("idx")
        batch.pop("labels", None)
        return model.self_distillation_loss(batch)

    loop = TrainLoop(cfg.loop, model, dataset, Collator(tokenizer, task.is_regression), loss_fn, out,
                     desc=f"early-exit {task.name}: self-distillation", run_config=fingerprint, progress=progress)
    loop.run(resume=resume)
    model = loop.accelerator.unwrap_model(loop.modules).eval()
    model.save_pretrained(out, tokenizer)
    curve = speed_accuracy_curve(model, tokenizer, task.name, dev, thresholds, max_length, cfg.eval_batch_size)
    full = curve[0]["metrics"]
    manifest = write_manifest(out, Manifest(
        stage="distill", task=task.name, parent=cfg.teacher, seed=cfg.loop.seed,
        params={**fingerprint, "early_exit": asdict(opts), "max_length": max_length, "train_examples": len(train),
                "teacher_score": teacher_score(cfg.teacher)},
        metrics={dev_split(task): full, "dev": full, "early_exit_curve": curve},
        num_parameters=count_parameters(model), wall_s=round(time.perf_counter() - start, 1),
    ))
    loop.finish()
    return manifest
