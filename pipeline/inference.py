"""One interface to run a classifier artifact, PyTorch or ONNX Runtime: eval, serving and bench share it."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from pipeline import onnx_runtime
from pipeline.errors import BertforgeError
# torch-free parts, kept importable from here where other stages import them
from pipeline.onnx_runtime import is_onnx_artifact, label_names, onnx_file  # noqa: F401
from pipeline.models import load_config, load_model, load_tokenizer  # noqa: F401
from pipeline.providers import torch_device


class TorchClassifier:
    format = "pytorch"

    def __init__(self, path: str, device: str = "cpu", num_threads: int | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.path = path
        self.device = torch.device(torch_device(device))
        self.model = load_model(path).to(self.device).eval()
        self.config = self.model.config
        self.input_names = ["input_ids", "attention_mask", "token_type_ids"]

    @classmethod
    def from_model(cls, model, tokenizer):
        """Wrap a model already in memory (evaluation during training)."""
        self = cls.__new__(cls)
        self.path, self.model, self.config, self.tokenizer = None, model, model.config, tokenizer
        self.device = next(model.parameters()).device
        self.input_names = ["input_ids", "attention_mask", "token_type_ids"]
        return self

    @torch.inference_mode()
    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        feed = {k: torch.as_tensor(np.asarray(v), device=self.device) for k, v in inputs.items() if k in self.input_names}
        return self.model(**feed).logits.float().cpu().numpy()


class OrtClassifier(onnx_runtime.OrtClassifier):
    """The torch-free ONNX Runtime session (pipeline.onnx_runtime) with the full transformers config."""

    def __init__(self, path: str, device: str = "cpu", num_threads: int | None = None, file_name: str | None = None):
        super().__init__(path, device, num_threads, file_name)
        self.config = load_config(path)


def load_runtime(path: str | os.PathLike, device: str = "cpu", num_threads: int | None = None):
    """A callable `inputs -> logits` for an artifact folder (ONNX if it holds a .onnx file), with its
    `.config` (labels) and a `.tokenizer`."""
    path = str(path)
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise BertforgeError(f"{path} is not a model folder (no config.json)")
    runtime = OrtClassifier(path, device, num_threads) if is_onnx_artifact(path) else TorchClassifier(path, device, num_threads)
    runtime.tokenizer = load_tokenizer(path)
    return runtime


def dump(obj, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")
