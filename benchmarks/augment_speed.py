"""Augmentation speed: the batched augmenter against a batch-1 loop (one masked-LM forward per word, as
the official TinyBERT script runs), on the same examples with the same seed.

Writes benchmarks/results/augment.json: examples/second of each, their ratio, and how much of the
output both share (batching changes the speed, not the procedure; only float rounding differs).

The masked LM defaults to the packaged all-MiniLM-L6-v2 encoder under a masked-LM head (the head is
untrained: no pretrained masked LM exists offline here), so the compute is that of a real 6-layer,
384-wide masked LM with BERT's 30k vocabulary, but the candidates are meaningless; pass --mlm for a real one.

    python benchmarks/augment_speed.py --glue-dir ../shared/glue_data --task cola --examples 100
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch

from benchmarks.common import command_line, write_results
from pipeline.data import load_glue
from pipeline.distill.augment import Augmenter
from pipeline.distill.glove import load_glove

RESULTS = Path(__file__).parent / "results"


def timed_run(glove, mlm: str, examples, batch_size: int, args) -> tuple[dict, list]:
    glove._cache.clear()  # each run finds its own GloVe neighbours
    aug = Augmenter(glove, mlm, p=args.p, k=args.k, n=args.n, seed=args.seed, batch_size=batch_size)
    start = time.perf_counter()
    out = aug.augment(examples)
    wall = time.perf_counter() - start
    return {"batch_size": batch_size, "wall_s": round(wall, 3), "examples_per_s": round(len(examples) / wall, 3),
            "mlm_forwards": aug.forwards, "examples_out": len(out)}, out


def main() -> None:
    logging.getLogger("torchao").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR", "../shared/glue_data"))
    p.add_argument("--task", default="cola")
    p.add_argument("--examples", type=int, default=100)
    p.add_argument("--mlm", default="all-MiniLM-L6-v2")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--p", type=float, default=0.4)
    p.add_argument("--k", type=int, default=15)
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(RESULTS / "augment.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    examples = load_glue(args.task, "train", args.glue_dir)[:args.examples]
    glove = load_glove()
    timed_run(glove, args.mlm, examples[:4], args.batch_size, args)  # warm-up: model load, first kernels
    batched, out_batched = timed_run(glove, args.mlm, examples, args.batch_size, args)
    single, out_single = timed_run(glove, args.mlm, examples, 1, args)
    result = {
        "task": args.task, "examples": len(examples), "mlm": args.mlm, "p": args.p, "k": args.k, "n": args.n,
        "seed": args.seed, "threads": torch.get_num_threads(), "device": "cuda" if torch.cuda.is_available() else "cpu",
        "batched": batched, "batch1_loop": single,
        "speedup": round(batched["examples_per_s"] / single["examples_per_s"], 2),
        # Padding in a batch moves logits by float rounding, which can swap near-tied candidates at the
        # top-K boundary of a real-sized model: report how much of the output agrees.
        "identical_output": out_batched == out_single,
        "shared_rows_fraction": round(len(set(out_batched) & set(out_single)) / max(1, len(set(out_batched))), 4),
        "command": command_line(),
    }
    write_results(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
