"""Arguments several commands share."""
from __future__ import annotations

import argparse
import json
import os
import sys

from pipeline.data import GLUE_TASKS


def add_task(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--task", required=required, help=f"GLUE task: {', '.join(GLUE_TASKS)}")


def add_glue_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR"),
                   help="folder holding CoLA/, SST-2/, ... (classic glue_data layout); default: $GLUE_DIR, "
                        "else the Hugging Face hub")


def add_loop(p: argparse.ArgumentParser, epochs: int, lr: float, batch_size: int = 32) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--batch-size", type=int, default=batch_size)
    g.add_argument("--learning-rate", type=float, default=lr)
    g.add_argument("--warmup-ratio", type=float, default=0.1)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clip gradients to this norm (0: no clipping)")
    g.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default: each epoch)")
    g.add_argument("--checkpoint-every", type=int, default=200, help="save resume state every N steps")
    g.add_argument("--max-steps-per-epoch", type=int, default=None)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch")


def loop_config(args: argparse.Namespace):
    from pipeline.training import LoopConfig

    return LoopConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                      warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
                      max_grad_norm=args.max_grad_norm, eval_every=args.eval_every,
                      checkpoint_every=args.checkpoint_every, max_steps_per_epoch=args.max_steps_per_epoch,
                      seed=args.seed, mixed_precision=args.mixed_precision)


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")
