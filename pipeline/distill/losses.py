"""TinyBERT's transformer-distillation losses (Jiao et al., 2020, section 3.1).

All losses are means over real tokens: padding never contributes, so a batch's loss does not depend
on how far it was padded. Without padding each one equals the plain mean of squared differences.

Where this differs from the official TinyBERT code (see NOTES): the official attention loss zeroes
masked scores but still counts them in the mean and keeps padded query rows; its hidden loss is an
unmasked MSE. Both make the loss depend on batch padding; here masked pairs/positions are excluded.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from pipeline.distill.config import LossWeights
# The per-layer losses and the prediction layer's are shared with pruning's recovery, so they live below the stages.
from pipeline.losses import attention_loss, hidden_loss, pair_mask, prediction_loss  # noqa: F401

Projection = Callable[[Tensor], Tensor]


def embedding_loss(student_emb: Tensor, teacher_emb: Tensor, projection: Projection,
                   mask: Tensor | None = None) -> Tensor:
    """The hidden loss applied to the embedding layers' outputs (E_S W_e against E_T)."""
    return hidden_loss(student_emb, teacher_emb, projection, mask)


def transformer_loss(student, teacher, mapping: list[int], embedding_projection: Projection,
                     hidden_projection: Projection, mask: Tensor | None, weights: LossWeights) -> dict[str, Tensor]:
    """The weighted sum over layers of the intermediate losses (embedding layer 0 <-> 0, student layer
    m <-> teacher layer mapping[m-1]); `student`/`teacher` are `capture.Internals`.

    Returns {"loss": total, "embedding": ..., "hidden": ..., "attention": ...} (parts summed over layers,
    unweighted) so progress bars can show them.
    """
    parts = {"embedding": embedding_loss(student.hidden_states[0], teacher.hidden_states[0], embedding_projection, mask)}
    hid = att = 0.0
    for m, n in enumerate(mapping, start=1):
        hid = hid + hidden_loss(student.hidden_states[m], teacher.hidden_states[n], hidden_projection, mask)
        att = att + attention_loss(student.scores[m], teacher.scores[n], mask)
    parts["hidden"], parts["attention"] = hid, att
    total = weights.embedding * parts["embedding"] + weights.hidden * hid + weights.attention * att
    return {"loss": total, **parts}
