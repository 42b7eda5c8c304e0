"""A masked-LM head fitted on a frozen BERT encoder: a masked LM where no pretrained one can be had.

TinyBERT's augmentation wants masked-LM predictions for single-piece words, but the only offline
weights here (all-MiniLM-L6-v2) ship without their masked-LM head. This fits BERT's own head on the
frozen encoder, over the task's own text, with BERT's masking recipe (15% of pieces; of those 80%
[MASK], 10% a random piece, 10% kept; transformers' DataCollatorForLanguageModeling). The decoder is
tied to the frozen word embeddings, so only the head's transform, its LayerNorm and the vocabulary bias
learn: a few hundred thousand parameters, minutes on a CPU. The result is a plain BertForMaskedLM folder
that `augment --mlm` (or any transformers code) loads like any other masked LM.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pipeline.errors import BertforgeError

MANIFEST = "mlm_head.json"


@dataclass
class MlmHeadConfig:
    encoder: str  # a BERT model (hub id or folder): its encoder and word embeddings stay frozen
    out: str  # the BertForMaskedLM folder written
    steps: int = 600
    batch_size: int = 32
    learning_rate: float = 1e-3
    mask_probability: float = 0.15
    max_length: int = 128
    seed: int = 0


def fit_mlm_head(cfg: MlmHeadConfig, texts: Sequence[str], progress: bool = True) -> Path:
    """Fit the head on `texts` and save the masked LM to `cfg.out`; an existing fit with the same
    settings and text is reused. Returns the folder."""
    from transformers import BertForMaskedLM, DataCollatorForLanguageModeling

    from pipeline.models import load_tokenizer, resolve_model

    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise BertforgeError("fitting a masked-LM head needs some text")
    out = Path(cfg.out)
    key = {**asdict(cfg), "out": None, "texts": len(texts), "first_text": texts[0]}
    done = out / MANIFEST
    if done.is_file() and json.loads(done.read_text()).get("key") == key:
        return out

    start = time.perf_counter()
    path = resolve_model(cfg.encoder)
    try:
        model = BertForMaskedLM.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise BertforgeError(f"cannot load a BERT encoder from {cfg.encoder}: {str(e).splitlines()[0]}") from None
    tokenizer = load_tokenizer(path)
    torch.manual_seed(cfg.seed)
    model.bert.requires_grad_(False)  # also freezes the decoder, tied to the word embeddings
    model.bert.eval()
    head = [p for p in model.cls.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(head, lr=cfg.learning_rate, weight_decay=0.0)

    encoded = tokenizer(list(texts), truncation=True, max_length=cfg.max_length)["input_ids"]
    collate = DataCollatorForLanguageModeling(tokenizer, mlm_probability=cfg.mask_probability, return_tensors="pt")
    generator = torch.Generator().manual_seed(cfg.seed)
    losses = []
    bar = tqdm(range(cfg.steps), desc="fit masked-LM head", disable=not progress)
    for step in bar:
        rows = torch.randint(len(encoded), (cfg.batch_size,), generator=generator).tolist()
        batch = collate([{"input_ids": encoded[r]} for r in rows])
        where = batch["labels"] != -100
        if not where.any():
            continue
        with torch.no_grad():
            hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = model.cls(hidden[where])  # the vocabulary projection only where a piece was masked
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"][where])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    tail = losses[-50:] or [float("nan")]
    done.write_text(json.dumps({
        "key": key, "encoder": cfg.encoder, "params": asdict(cfg), "texts": len(texts),
        "first_loss": round(losses[0], 4) if losses else None, "last_loss": round(sum(tail) / len(tail), 4),
        "wall_s": round(time.perf_counter() - start, 1),
    }, indent=2) + "\n")
    return out
