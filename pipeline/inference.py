"""One interface to run a classifier artifact, PyTorch or ONNX Runtime: eval, serving and bench share it."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from pipeline.artifacts import read_manifest
from pipeline.errors import BertforgeError
from pipeline.models import is_bertforge_pruned, load_config, load_tokenizer, resolve_model


class TorchClassifier:
    format = "pytorch"

    def __init__(self, path: str, device: str = "cpu", num_threads: int | None = None):
        from transformers import AutoModelForSequenceClassification

        if num_threads:
            torch.set_num_threads(num_threads)
        self.path = path
        self.device = torch.device(device)
        self.config = load_config(path)
        try:
            resolved = resolve_model(path)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                resolved, trust_remote_code=is_bertforge_pruned(resolved)).to(self.device).eval()
        except (OSError, ValueError, RuntimeError) as e:
            raise BertforgeError(f"cannot load model weights from {path}: {str(e).splitlines()[0]}") from None
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


class OrtClassifier:
    format = "onnx"

    def __init__(self, path: str, device: str = "cpu", num_threads: int | None = None, file_name: str | None = None):
        import onnxruntime as ort

        self.path = path
        self.config = load_config(path)
        model_file = Path(path) / (file_name or _onnx_file(Path(path)))
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(model_file), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types for corrupt files
            raise BertforgeError(f"cannot load ONNX model {model_file}: {str(e).splitlines()[0][:200]}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        feed = {k: np.asarray(v, dtype=np.int64) for k, v in inputs.items() if k in self.input_names}
        return self.session.run(None, feed)[0].astype(np.float32)


def _onnx_file(folder: Path) -> str:
    manifest = read_manifest(folder)
    if manifest and manifest.params.get("onnx_file"):
        name = manifest.params["onnx_file"]
        if Path(name).name != name or not (Path(folder) / name).is_file():
            raise BertforgeError(f"{folder}: the manifest's onnx_file {name!r} is not a file in that folder")
        return name
    candidates = sorted(p.name for p in folder.glob("*.onnx"))
    if not candidates:
        raise BertforgeError(f"{folder} holds no .onnx file")
    return "model.onnx" if "model.onnx" in candidates else candidates[0]


def is_onnx_artifact(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and any(Path(path).glob("*.onnx"))


def load_runtime(path: str | os.PathLike, device: str = "cpu", num_threads: int | None = None):
    """A callable `inputs -> logits` for an artifact folder (ONNX if it holds a .onnx file), with its
    `.config` (labels) and a `.tokenizer`."""
    path = str(path)
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise BertforgeError(f"{path} is not a model folder (no config.json)")
    runtime = OrtClassifier(path, device, num_threads) if is_onnx_artifact(path) else TorchClassifier(path, device, num_threads)
    runtime.tokenizer = load_tokenizer(path)
    return runtime


def label_names(config) -> list[str]:
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(config.num_labels)]


def dump(obj, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")
