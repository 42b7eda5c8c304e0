"""One batch of raw inputs to answers: tokenize, pad to the batch's longest sequence, run, label.

It runs in the batcher's worker thread, never on the event loop: tokenization (Rust, GIL released)
and the forward pass are the CPU-heavy parts of a request.
"""
from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from pipeline.errors import BertforgeError
from pipeline.onnx_runtime import label_names

# Only the first max_tokens tokens of a text count, but the tokenizer reads all of it (a megabyte
# takes a second). No real text averages 20 characters per word piece (English: 4-5), so cutting
# there first changes nothing but bounds the work per input.
MAX_CHARS_PER_TOKEN = 20

Input = str | tuple[str, str]


class InputTooLong(ValueError):
    """An input longer than max_tokens when the server refuses rather than truncates."""


class Answer(dict):
    """One input's answer as the native route sends it, plus what other protocols need but the native JSON
    leaves out: the raw logits (TEI's raw_scores, the v2 `logits` output) and whether the input was cut."""

    logits: list[float]
    truncated: bool = False


class Predictor:
    def __init__(self, runtime, max_tokens: int, on_long_input: str = "truncate", metrics=None):
        self.runtime = runtime
        self.metrics = metrics
        tokenizer = runtime.tokenizer
        if isinstance(tokenizer, Tokenizer):  # the torch-free ONNX runtime (pipeline.onnx_runtime)
            backend, self.pad_id = tokenizer, getattr(runtime, "pad_token_id", 0) or 0
        elif getattr(tokenizer, "is_fast", False):  # a transformers tokenizer (PyTorch artifacts)
            backend, self.pad_id = tokenizer.backend_tokenizer, tokenizer.pad_token_id or 0
        else:
            raise BertforgeError("serving needs a fast tokenizer (tokenizer.json or a vocab a fast tokenizer can load)")
        config = runtime.config
        positions = getattr(config, "max_position_embeddings", None)
        self.max_tokens = min(max_tokens, positions) if positions else max_tokens
        self.reject_long = on_long_input == "reject"
        # A private copy: truncation and padding settings are per-tokenizer state.
        self.tokenizer = Tokenizer.from_str(backend.to_str())
        self.tokenizer.no_padding()
        if self.reject_long:
            self.tokenizer.no_truncation()
        else:
            self.tokenizer.enable_truncation(self.max_tokens)
        self.labels = label_names(config)
        self.regression = getattr(config, "problem_type", None) == "regression" or config.num_labels == 1

    def __call__(self, inputs: list[Input]) -> list[Answer | InputTooLong]:
        answers: list = [None] * len(inputs)
        keep, texts, cut = [], [], set()
        max_chars = self.max_tokens * MAX_CHARS_PER_TOKEN
        for i, x in enumerate(inputs):
            parts = (x,) if isinstance(x, str) else x
            if self.reject_long and any(len(p) > max_chars for p in parts):
                answers[i] = InputTooLong(f"more than {self.max_tokens} tokens")
                continue
            keep.append(i)
            if any(len(p) > max_chars for p in parts):
                cut.add(i)
            texts.append(tuple(p[:max_chars] for p in parts) if len(parts) == 2 else parts[0][:max_chars])
        encodings = self.tokenizer.encode_batch(texts) if texts else []
        if self.reject_long:
            kept = [(i, e) for i, e in zip(keep, encodings) if len(e.ids) <= self.max_tokens]
            for i, e in zip(keep, encodings):
                if len(e.ids) > self.max_tokens:
                    answers[i] = InputTooLong(f"{len(e.ids)} tokens, more than {self.max_tokens}")
            keep, encodings = [i for i, _ in kept], [e for _, e in kept]
        if encodings:
            logits = self.runtime(self.pad(encodings))
            for i, e, answer, row in zip(keep, encodings, self.postprocess(logits), logits):
                answer.logits = [float(v) for v in row]
                # the tokenizer keeps what truncation cut as `overflowing`
                answer.truncated = i in cut or bool(e.overflowing)
                answers[i] = answer
        return answers

    def pad(self, encodings) -> dict[str, np.ndarray]:
        """Pad to the longest sequence of this batch only, not to max_tokens."""
        length = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), length), self.pad_id, dtype=np.int64)
        types = np.zeros((len(encodings), length), dtype=np.int64)
        mask = np.zeros((len(encodings), length), dtype=np.int64)
        for row, e in enumerate(encodings):
            n = len(e.ids)
            ids[row, :n] = e.ids
            types[row, :n] = e.type_ids
            mask[row, :n] = 1
        if self.metrics:
            self.metrics.padded_length.observe(length)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    def postprocess(self, logits: np.ndarray) -> list[Answer]:
        if self.regression:
            return [Answer(value=float(v)) for v in logits[:, 0]]
        z = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(z)
        probs /= probs.sum(axis=1, keepdims=True)
        best = probs.argmax(axis=1)
        return [Answer(label=self.labels[b], score=float(p[b]), scores=dict(zip(self.labels, map(float, p))))
                for b, p in zip(best, probs)]
