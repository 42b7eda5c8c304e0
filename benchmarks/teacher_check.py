"""Is a weak teacher our bug or the checkpoint's limit? Two controls, on one task (default CoLA).

1. Linear probes: logistic regression (scikit-learn) on frozen features of the backbone (the [CLS]
   vector, the pooler output, the mean over tokens of each layer). They say how much of the task the
   checkpoint's representations carry before any fine-tuning.
2. A plain transformers fine-tuning loop, written here from scratch with nothing from bertforge but
   the GLUE reader: BertForSequenceClassification, torch AdamW, transformers' linear warm-up schedule,
   the teacher row's epochs, learning rate and batch size. If bertforge's `finetune` were at fault, this
   control would score clearly higher than the teacher in teachers.json. Variants: the pooler
   re-initialised (its checkpoint weights were never trained by the sentence-embedding objective).
3. bertforge's own `finetune` with one setting changed from the teacher row's recipe, to find what
   separates it from the plain loop (the plain loop neither clips gradients nor uses seed 42):
   `bertforge-noclip` (max_grad_norm 0), `bertforge-seed0` (seed 0), `bertforge` (unchanged: the
   run-to-run control).

Writes benchmarks/results/teacher_check.json.

    python benchmarks/teacher_check.py --task cola --threads 1
    python benchmarks/teacher_check.py --task cola --skip-finetune     # probes only (about a minute)
    python benchmarks/teacher_check.py --task cola --skip-probes --variants bertforge-noclip
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks.common import command_line, write_results
from pipeline.data import compute_metrics, get_task, load_glue
from pipeline.models import resolve_model

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "all-MiniLM-L6-v2"


def encode(tokenizer, examples, max_length):
    a = [ex.text_a for ex in examples]
    b = [ex.text_b for ex in examples] if examples[0].text_b is not None else None
    return tokenizer(a, b, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


@torch.no_grad()
def features(model, tokenizer, examples, max_length) -> dict[str, np.ndarray]:
    out: dict[str, list] = {}
    for i in range(0, len(examples), 128):
        enc = encode(tokenizer, examples[i:i + 128], max_length)
        o = model(**enc, output_hidden_states=True)
        mask = enc["attention_mask"].unsqueeze(-1).float()
        parts = {"cls": o.last_hidden_state[:, 0], "pooler": o.pooler_output}
        for layer, h in enumerate(o.hidden_states):
            parts[f"mean_layer{layer}"] = (h * mask).sum(1) / mask.sum(1)
        for k, v in parts.items():
            out.setdefault(k, []).append(v)
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def linear_probes(task, train, dev, max_length) -> dict[str, dict]:
    from sklearn.linear_model import LogisticRegression, Ridge
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model(MODEL)
    model, tokenizer = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    f_train, f_dev = features(model, tokenizer, train, max_length), features(model, tokenizer, dev, max_length)
    y = np.array([ex.label for ex in train])
    rows = {}
    for name in tqdm(f_train, desc="linear probes"):
        clf = Ridge(alpha=1.0) if task.is_regression else LogisticRegression(max_iter=2000)
        pred = clf.fit(f_train[name], y).predict(f_dev[name])
        rows[name] = compute_metrics(task.name, pred, [ex.label for ex in dev])
    return rows


def plain_finetune(task, train, dev, max_length, epochs, lr, batch_size, reinit_pooler, seed) -> dict:
    """The textbook recipe, with no bertforge code: dev metrics after each epoch."""
    from transformers import AutoTokenizer, BertForSequenceClassification, get_linear_schedule_with_warmup

    path = resolve_model(MODEL)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=task.num_labels)
    if reinit_pooler:
        model.bert.pooler.dense.weight.data.normal_(0.0, model.config.initializer_range)
        model.bert.pooler.dense.bias.data.zero_()
    no_decay = ("bias", "LayerNorm.weight")
    groups = [{"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)], "weight_decay": 0.01},
              {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    steps_per_epoch = -(-len(train) // batch_size)
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.1 * steps_per_epoch * epochs), steps_per_epoch * epochs)
    labels = torch.tensor([ex.label for ex in train], dtype=torch.float32 if task.is_regression else torch.long)
    history = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for i in tqdm(range(0, len(order), batch_size), desc=f"plain epoch {epoch + 1}"):
            idx = order[i:i + batch_size]
            loss = model(**encode(tokenizer, [train[j] for j in idx], max_length), labels=labels[idx]).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
        model.eval()
        preds = []
        with torch.no_grad():
            for i in range(0, len(dev), 128):
                logits = model(**encode(tokenizer, dev[i:i + 128], max_length)).logits
                preds += (logits.squeeze(-1) if task.is_regression else logits.argmax(-1)).tolist()
        history.append(compute_metrics(task.name, preds, [ex.label for ex in dev]))
        print(f"epoch {epoch + 1}: {history[-1]}")
    return {"per_epoch": history, "best_score": max(h["score"] for h in history)}


BERTFORGE_VARIANTS = {"bertforge": {}, "bertforge-noclip": {"max_grad_norm": 0.0}, "bertforge-seed0": {"seed": 0}}


def bertforge_finetune(task, glue_dir, epochs, lr, changes: dict, out: Path) -> dict:
    """bertforge's recipe with `changes` applied to its loop: dev score after each epoch."""
    from pipeline.finetune import FinetuneConfig, finetune
    from pipeline.training import LoopConfig

    cfg = FinetuneConfig(task=task.name, model=MODEL, out=str(out), glue_dir=glue_dir,
                         loop=LoopConfig(epochs=epochs, batch_size=32, learning_rate=lr, checkpoint_every=100, **changes))
    manifest = finetune(cfg, resume=(out / "checkpoints").is_dir())
    history = manifest.params["dev_history"]
    return {"per_epoch": [{"score": h["score"]} for h in history], "best_score": max(h["score"] for h in history),
            "changes": changes}


def main() -> None:
    logging.getLogger("torchao").setLevel(logging.ERROR)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR", "../shared/glue_data"))
    p.add_argument("--task", default="cola")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-finetune", action="store_true")
    p.add_argument("--skip-probes", action="store_true")
    p.add_argument("--variants", nargs="+", default=["stock"],
                   choices=["stock", "reinit-pooler", *BERTFORGE_VARIANTS])
    p.add_argument("--out", default=str(RESULTS / "teacher_check.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.task)
    train, dev = list(load_glue(task.name, "train", args.glue_dir)), list(load_glue(task.name, "dev", args.glue_dir))
    max_length = task.default_max_length
    teachers = {r["task"]: r for r in json.loads((RESULTS / "teachers.json").read_text())}
    row = teachers.get(task.name, {})
    path = Path(args.out)
    report = json.loads(path.read_text()) if path.is_file() else {}
    entry = report.setdefault(task.name, {})
    entry["model"] = MODEL
    entry["teacher_row"] = {k: row.get(k) for k in ("score", "epochs", "learning_rate", "train_examples")}
    if not args.skip_probes:
        start = time.perf_counter()
        entry["linear_probes"] = linear_probes(task, train, dev, max_length)
        entry["linear_probes_wall_s"] = round(time.perf_counter() - start, 1)
        entry["linear_probes_command"] = command_line()
        write_results(path, report)
    if not args.skip_finetune:
        epochs, lr = row.get("epochs", 3), row.get("learning_rate", 1e-4)
        for variant in args.variants:
            start = time.perf_counter()
            if variant in BERTFORGE_VARIANTS:
                result = bertforge_finetune(task, args.glue_dir, epochs, lr, BERTFORGE_VARIANTS[variant],
                                            RESULTS / "teacher_check" / f"{task.name}-{variant}")
                section = "bertforge_finetune"
            else:
                result = plain_finetune(task, train, dev, max_length, epochs, lr, 32, variant == "reinit-pooler", seed=0)
                section = "plain_transformers"
            entry.setdefault(section, {})[variant] = {
                **result, "epochs": epochs, "learning_rate": lr, "batch_size": 32, "warmup_ratio": 0.1,
                "wall_s": round(time.perf_counter() - start, 1), "command": command_line()}
            write_results(path, report)
    print(json.dumps(entry, indent=2))


if __name__ == "__main__":
    main()
