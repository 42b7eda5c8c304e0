"""A validation split carved from the training set, so that choices (a checkpoint, a compression setting,
which nodes stay float) never look at the dev set that is reported.

The carve is a seeded shuffle of the train rows: the same seed gives the same rows on any machine. It can
be written out as a GLUE-layout folder whose `train` holds the remaining rows and whose `dev` holds the
carved ones, so every stage that trains on "train" and keeps its best checkpoint by "dev" selects on the
carved split without knowing it. A second carve can keep the rows that score the finished models apart
from the rows the checkpoints are chosen by (`write_selection_dir`).
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

from pipeline.data.glue import Example, load_glue, write_examples_file
from pipeline.data.tasks import get_task
from pipeline.errors import BertforgeError


def carve_validation(examples: list[Example], size: int, seed: int, min_words: int = 0,
                     disjoint: bool = False) -> tuple[list[Example], list[Example]]:
    """(the rest, the carved validation rows), both in their original order. `min_words`: carve only rows
    of at least that many words (first text), so that a training set of short phrases (SST-2's train holds
    every phrase of its sentences, dev whole sentences) gives a split that looks like dev.

    `disjoint`: carve whole sentences and leave none of their phrases behind. SST-2's train holds each
    sentence with its sub-phrases, so a plain carve scores the models on rows whose sentence (or phrases
    of it) they trained on: with 1,000 rows of 10+ words carved by seed 42, 760 sit inside a longer
    training row and 8,341 training rows are pieces of them. Here only rows that no other training row
    contains are carved, and every remaining row found only inside carved rows is dropped from the rest
    (a phrase that also occurs in a kept row stays). Rows are matched as whole words, text_a with text_b."""
    texts = [_text(ex) for ex in examples]
    eligible = [i for i, ex in enumerate(examples) if len(ex.text_a.split()) >= min_words]
    if not 0 < size < len(examples) or size > len(eligible):
        raise BertforgeError(f"a validation split of {size} rows needs more than {size} training rows "
                             f"(the task has {len(examples)}, {len(eligible)} of at least {min_words} words)")
    if not disjoint:
        picked = set(random.Random(seed).sample(eligible, size))
        rest = [ex for i, ex in enumerate(examples) if i not in picked]
        return rest, [ex for i, ex in enumerate(examples) if i in picked]
    # One padded string of every row: "is row i inside another row" is a substring count, fast enough for
    # SST-2's 67k rows (a few seconds) without an index.
    everything = "\n".join(texts)
    copies: dict[str, int] = {}
    for t in texts:
        copies[t] = copies.get(t, 0) + 1
    order = list(eligible)
    random.Random(seed).shuffle(order)
    picked, carved_texts = set(), set()
    for i in order:
        if texts[i] in carved_texts or everything.count(texts[i]) != copies[texts[i]]:
            continue  # a duplicate of a carved row, or inside a longer row: not a whole sentence
        picked.add(i)
        carved_texts.add(texts[i])
        if len(picked) == size:
            break
    else:
        raise BertforgeError(f"a disjoint validation split of {size} rows: only {len(picked)} training rows of at "
                             f"least {min_words} words are not part of another row")
    carved = "\n".join(texts[i] for i in picked)
    inside = {i for i, t in enumerate(texts) if i not in picked and t in carved}
    kept = "\n".join(t for i, t in enumerate(texts) if i not in picked and i not in inside)
    dropped = {i for i in inside if texts[i] not in kept}
    rest = [ex for i, ex in enumerate(examples) if i not in picked and i not in dropped]
    return rest, [ex for i, ex in enumerate(examples) if i in picked]


def _text(ex: Example) -> str:
    """A row as padded words, so that substring tests match whole words only."""
    return f" {ex.text_a.strip()} " + (f"\t {ex.text_b.strip()} " if ex.text_b else "")


def _checksum(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(repr((ex.text_a, ex.text_b, ex.label)).encode())
    return h.hexdigest()[:16]


def write_selection_dir(task: str, glue_dir: str | Path | None, out: str | Path, size: int, seed: int,
                        max_train: int | None = None, min_words: int = 0, disjoint: bool = False,
                        checkpoint_size: int = 0) -> dict:
    """`out/<Task>/train.tsv` (train minus the carved rows, cut to `max_train`) and `out/<Task>/dev.tsv`
    (the carved rows). Returns what the manifest records: sizes, seed and checksums of both.

    `checkpoint_size`: carve a second split from the rest and make *it* `out/<Task>/dev.tsv`, the rows on
    which every training stage keeps its best checkpoint; the first carve goes to
    `out/validation/<Task>/dev.tsv`, out of any training stage's sight, for scoring the finished models.
    Why: a model chosen as the best of many checkpoints on some rows is flattered there, and the more
    checkpoints (a student's 6 + 3 epochs, then its pruning recovery) the more, so the candidates are scored
    on rows no checkpoint was chosen by."""
    spec = get_task(task)
    if spec.train != spec.dev:
        raise BertforgeError(f"{spec.name}: train and dev files differ in layout; a selection folder cannot be written")
    train = load_glue(spec.name, "train", glue_dir)
    rest, val = carve_validation(train, size, seed, min_words, disjoint)
    checkpoint = val
    if checkpoint_size:
        rest, checkpoint = carve_validation(rest, checkpoint_size, seed, min_words, disjoint)
    dropped = len(train) - len(rest) - len(val) - (len(checkpoint) if checkpoint_size else 0)
    rest = rest[:max_train] if max_train else rest
    folder = Path(out) / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    write_examples_file(spec.name, rest, folder / "train.tsv")
    write_examples_file(spec.name, checkpoint, folder / "dev.tsv")
    scored = Path(out) / "validation" / spec.folder
    scored.mkdir(parents=True, exist_ok=True)
    write_examples_file(spec.name, val, scored / "dev.tsv")
    return {"validation_examples": len(val), "train_examples": len(rest), "seed": seed,
            "validation_sha256": _checksum(val), "train_sha256": _checksum(rest),
            "checkpoint_examples": len(checkpoint) if checkpoint_size else 0,
            "checkpoint_rows": "carved apart" if checkpoint_size else "the validation rows",
            "checkpoint_sha256": _checksum(checkpoint),
            "carved_from": "train", "max_train": max_train, "min_words": min_words, "disjoint": disjoint,
            "train_rows_dropped_as_parts_of_carved_rows": dropped}
