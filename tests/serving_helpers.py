"""Shared by the serving tests: a tiny model exported to ONNX (the format bertforge serves in production)."""
from __future__ import annotations

import warnings
from pathlib import Path


def export_tiny_onnx(model_dir: Path, out: Path) -> Path:
    """model_dir (a PyTorch classifier folder) as out/model.onnx + config + tokenizer: an ONNX artifact folder."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(model_dir).eval()
    model.config.return_dict = False
    out.mkdir(parents=True, exist_ok=True)
    ids = torch.ones(2, 8, dtype=torch.long)
    axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's tracer warnings about constants
        torch.onnx.export(model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(out / "model.onnx"),
                          input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["logits"],
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes,
                                        "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    model.config.return_dict = True
    model.config.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out
