"""Run an ONNX artifact with ONNX Runtime, without torch or transformers: what `bertforge[serve]` needs.

The serving path reads the folder's config.json as plain JSON (labels, positions, problem type) and its
tokenizer.json with the `tokenizers` library, so a slim install (onnxruntime, tokenizers, the HTTP stack)
serves an exported model. pipeline.inference builds the PyTorch runtime and the full-config ONNX one on top.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from pipeline.artifacts import read_manifest
from pipeline.errors import BertforgeError
from pipeline.providers import BoundRunner, check_placement, disabled_optimizers, parse_device, select_providers


class OrtClassifier:
    format = "onnx"

    def __init__(self, path: str, device: str = "cpu", num_threads: int | None = None, file_name: str | None = None):
        import onnxruntime as ort

        self.path = path
        self.config = read_config(path)
        model_file = Path(path) / (file_name or onnx_file(Path(path)))
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        providers = select_providers(device)
        try:
            self.session = ort.InferenceSession(str(model_file), options, providers=providers,
                                                disabled_optimizers=disabled_optimizers(providers))
        except Exception as e:  # onnxruntime raises its own exception types for corrupt files
            raise BertforgeError(f"cannot load ONNX model {model_file}: {str(e).splitlines()[0][:200]}") from None
        check_placement(self.session, device)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.run = BoundRunner(self.session, parse_device(device)[1])  # on a GPU: one copy in, one out

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        feed = {k: np.asarray(v, dtype=np.int64) for k, v in inputs.items() if k in self.input_names}
        return self.run(feed)[0].astype(np.float32)


def onnx_file(folder: Path) -> str:
    """The file name of an ONNX artifact's graph: the manifest's `onnx_file`, else model.onnx, else the first.
    A manifest may only name a plain file inside its folder (never `../x.onnx` or an absolute path)."""
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


def read_config(path: str | os.PathLike) -> SimpleNamespace:
    """The few config.json fields inference needs, read as data: no model class, no code from the folder."""
    file = Path(path) / "config.json"
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise BertforgeError(f"cannot read {file}: {e}") from None
    id2label = {int(k): str(v) for k, v in (raw.get("id2label") or {}).items()}
    # transformers' rule: num_labels is the size of id2label, 2 when the config names no labels
    num_labels = len(id2label) or int(raw.get("num_labels", 2))
    return SimpleNamespace(num_labels=num_labels, id2label=id2label or None, problem_type=raw.get("problem_type"),
                           max_position_embeddings=raw.get("max_position_embeddings"), model_type=raw.get("model_type"),
                           # BERT's default (2 segments) when absent; the server refuses pairs below 2
                           type_vocab_size=int(raw.get("type_vocab_size", 2)))


def label_names(config) -> list[str]:
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(config.num_labels)]


def load_fast_tokenizer(path: str | os.PathLike):
    """The folder's tokenizer.json as a `tokenizers.Tokenizer`, with the pad id its tokenizer config names.

    Folders without tokenizer.json (a bare vocab.txt) need transformers to convert it: the torch extra."""
    from tokenizers import Tokenizer

    folder = Path(path)
    if not (folder / "tokenizer.json").is_file():
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise BertforgeError(f"{folder} has no tokenizer.json; serving it needs `pip install bertforge[torch]`") from None
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if not tokenizer.is_fast:
            raise BertforgeError("serving needs a fast tokenizer (tokenizer.json or a vocab a fast tokenizer can load)")
        return tokenizer.backend_tokenizer, tokenizer.pad_token_id or 0
    try:
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise BertforgeError(f"cannot load {folder / 'tokenizer.json'}: {str(e).splitlines()[0][:200]}") from None
    pad = None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if pad is None and (folder / name).is_file():
            pad = json.loads((folder / name).read_text()).get("pad_token")
    if isinstance(pad, dict):  # an AddedToken written out in full
        pad = pad.get("content")
    pad_id = tokenizer.token_to_id(pad) if isinstance(pad, str) else None
    if pad_id is None and tokenizer.padding:
        pad_id = tokenizer.padding.get("pad_id")
    return tokenizer, pad_id or 0


def load_serving_runtime(path: str | os.PathLike, device: str = "cpu", num_threads: int | None = None):
    """What `bertforge serve` runs: an ONNX folder without torch; anything else through pipeline.inference
    (PyTorch artifacts and hub ids, which need the torch extra)."""
    path = str(path)
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise BertforgeError(f"{path} is not a model folder (no config.json)")
    if not is_onnx_artifact(path):
        if importlib.util.find_spec("torch") is None:
            raise BertforgeError(f"{path} is not an ONNX artifact; serving PyTorch models needs "
                                 "`pip install bertforge[torch]`") from None
        from pipeline.inference import load_runtime

        return load_runtime(path, device, num_threads)
    runtime = OrtClassifier(path, device, num_threads)
    runtime.tokenizer, runtime.pad_token_id = load_fast_tokenizer(path)
    return runtime
