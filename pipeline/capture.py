"""Read out what the transformer-distillation losses need from a stock transformers BERT, with gradients:
the embedding and layer outputs, and each layer's pre-softmax attention scores QK^T/sqrt(d). Distillation
and pruning's recovery both use it, so it sits below the stages.

Hugging Face's `output_attentions` returns post-softmax probabilities (and forces eager attention),
so the scores are recomputed instead from the outputs of each layer's `attention.self.query` and
`.key` linear layers, caught by forward hooks. That works whichever attention implementation runs
(eager or SDPA) and needs no copy of the modeling code. The scores are taken before the additive
padding mask; the losses mask padded pairs themselves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pipeline.errors import BertforgeError


@dataclass
class Internals:
    hidden_states: tuple[Tensor, ...]  # [0] embedding output, [n] output of layer n; each [batch, seq, hidden]
    scores: dict[int, Tensor] = field(default_factory=dict)  # 1-based layer -> [batch, heads, seq, seq]
    logits: Tensor | None = None


def self_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The `attention.self` module of each encoder layer, in order (BERT-family models)."""
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if layers is None:
        raise BertforgeError(f"{type(model).__name__} is not a BERT-family encoder (no encoder.layer)")
    mods = []
    for layer in layers:
        sa = layer.attention.self
        if getattr(sa, "position_embedding_type", "absolute") != "absolute":
            # Relative position terms would add to QK^T; recomputing from Q and K alone would be wrong.
            raise BertforgeError("attention-score capture supports absolute position embeddings only "
                                 f"(model uses {sa.position_embedding_type})")
        mods.append(sa)
    return mods


class ScoreCapture:
    """Forward hooks on the query/key projections of chosen layers; `scores()` after a forward pass.

    Use as a context manager (hooks are removed on exit) or call `remove()`.
    """

    def __init__(self, model: nn.Module, layers: list[int] | None = None):
        self.modules = self_attention_modules(model)
        self.layers = sorted(set(layers)) if layers is not None else list(range(1, len(self.modules) + 1))
        self._out: dict[tuple[int, str], Tensor] = {}
        self._handles = []
        for n in self.layers:
            sa = self.modules[n - 1]
            for name in ("query", "key"):
                self._handles.append(getattr(sa, name).register_forward_hook(self._hook(n, name)))

    def _hook(self, layer: int, name: str):
        def hook(module, inputs, output):
            self._out[(layer, name)] = output
        return hook

    def scores(self) -> dict[int, Tensor]:
        """QK^T/sqrt(head size) per captured layer, [batch, heads, seq, seq]; clears the stored outputs."""
        out = {}
        for n in self.layers:
            sa = self.modules[n - 1]
            heads, size = sa.num_attention_heads, sa.attention_head_size  # live values: pruned heads included
            q, k = self._out.pop((n, "query")), self._out.pop((n, "key"))
            b = q.shape[0]
            q = q.view(b, -1, heads, size).transpose(1, 2)
            k = k.view(b, -1, heads, size).transpose(1, 2)
            out[n] = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(size)
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._out.clear()

    def __enter__(self) -> "ScoreCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def run_with_internals(model: nn.Module, batch: dict[str, Tensor], capture: ScoreCapture | None = None,
                       logits: bool = True) -> Internals:
    """One forward pass returning hidden states, the captured layers' scores and (optionally) logits.

    `logits=False` runs only the encoder (`base_model`), skipping pooler and head.
    """
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    runner = model if logits else getattr(model, "base_model", model)
    out = runner(**inputs, output_hidden_states=True, return_dict=True)
    return Internals(hidden_states=tuple(out.hidden_states), scores=capture.scores() if capture else {},
                     logits=getattr(out, "logits", None) if logits else None)
