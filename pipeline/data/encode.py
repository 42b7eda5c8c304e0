"""Turn examples into padded tensor batches (dynamic padding: each batch to its own longest row)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from pipeline.data.glue import Example


class EncodedDataset(Dataset):
    """Tokenized examples; item i is a dict of lists (input_ids, attention_mask, ..., labels)."""

    def __init__(self, examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, max_length: int):
        texts_a = [ex.text_a for ex in examples]
        texts_b = [ex.text_b for ex in examples] if examples and examples[0].text_b is not None else None
        self.encodings = tokenizer(texts_a, texts_b, truncation=True, max_length=max_length)
        self.labels = [ex.label for ex in examples]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        item = {k: v[i] for k, v in self.encodings.items()}
        if self.labels[i] is not None:
            item["labels"] = self.labels[i]
        item["idx"] = i
        return item

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.encodings["input_ids"]]


class Collator:
    """Pads a batch; regression labels become float tensors, class labels long."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, regression: bool):
        self.pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")
        self.regression = regression

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        labels = [it.pop("labels") for it in items if "labels" in it]
        batch = self.pad(items)
        if len(labels) == len(items):
            batch["labels"] = torch.tensor(labels, dtype=torch.float32 if self.regression else torch.long)
        return dict(batch)


def train_loader(dataset: EncodedDataset, collator: Collator, batch_size: int, seed: int, epoch: int,
                 group_by_length: bool = False) -> DataLoader:
    """A shuffled loader whose order depends only on (seed, epoch), so a resumed run sees the same batches.

    `group_by_length`: each batch holds rows of similar length, so dynamic padding pads little (SST-2's
    rows average 13 word pieces, a shuffled batch of 32 pads to 42). transformers' length grouping sorts
    shuffled mega-batches of 50 batches by length; the batches are then put in random order, so the
    model never sees a long-to-short sweep."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    if not group_by_length:
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=collator)
    from transformers.trainer_pt_utils import get_length_grouped_indices

    order = get_length_grouped_indices(dataset.lengths(), batch_size, generator=generator)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    # the generator also seeds the loader's own base seed, which would otherwise draw from the global RNG
    # and shift every dropout mask after a resume
    return DataLoader(dataset, batch_sampler=batches, generator=generator, collate_fn=collator)


def eval_loader(dataset: EncodedDataset, collator: Collator, batch_size: int) -> DataLoader:
    """Batches of similar length (less padding); each batch carries `idx` to restore the order."""
    order = sorted(range(len(dataset)), key=dataset.lengths().__getitem__)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collator)
