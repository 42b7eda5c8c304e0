"""A validation split carved from the training set, so that choices (a checkpoint, a compression setting,
which nodes stay float) never look at the dev set that is reported.

The carve is a seeded shuffle of the train rows: the same seed gives the same rows on any machine. It can
be written out as a GLUE-layout folder whose `train` holds the remaining rows and whose `dev` holds the
carved ones, so every stage that trains on "train" and keeps its best checkpoint by "dev" selects on the
carved split without knowing it.
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

from pipeline.data.glue import Example, load_glue, write_examples_file
from pipeline.data.tasks import get_task
from pipeline.errors import BertforgeError


def carve_validation(examples: list[Example], size: int, seed: int,
                     min_words: int = 0) -> tuple[list[Example], list[Example]]:
    """(the rest, the carved validation rows), both in their original order. `min_words`: carve only rows
    of at least that many words (first text), so that a training set of short phrases (SST-2's train holds
    every phrase of its sentences, dev whole sentences) gives a split that looks like dev."""
    eligible = [i for i, ex in enumerate(examples) if len(ex.text_a.split()) >= min_words]
    if not 0 < size < len(examples) or size > len(eligible):
        raise BertforgeError(f"a validation split of {size} rows needs more than {size} training rows "
                             f"(the task has {len(examples)}, {len(eligible)} of at least {min_words} words)")
    picked = set(random.Random(seed).sample(eligible, size))
    rest = [ex for i, ex in enumerate(examples) if i not in picked]
    return rest, [ex for i, ex in enumerate(examples) if i in picked]


def _checksum(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(repr((ex.text_a, ex.text_b, ex.label)).encode())
    return h.hexdigest()[:16]


def write_selection_dir(task: str, glue_dir: str | Path | None, out: str | Path, size: int, seed: int,
                        max_train: int | None = None, min_words: int = 0) -> dict:
    """`out/<Task>/train.tsv` (train minus the carved rows, cut to `max_train`) and `out/<Task>/dev.tsv`
    (the carved rows). Returns what the manifest records: sizes, seed and checksums of both."""
    spec = get_task(task)
    if spec.train != spec.dev:
        raise BertforgeError(f"{spec.name}: train and dev files differ in layout; a selection folder cannot be written")
    rest, val = carve_validation(load_glue(spec.name, "train", glue_dir), size, seed, min_words)
    rest = rest[:max_train] if max_train else rest
    folder = Path(out) / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    write_examples_file(spec.name, rest, folder / "train.tsv")
    write_examples_file(spec.name, val, folder / "dev.tsv")
    return {"validation_examples": len(val), "train_examples": len(rest), "seed": seed,
            "validation_sha256": _checksum(val), "train_sha256": _checksum(rest),
            "carved_from": "train", "max_train": max_train, "min_words": min_words}
