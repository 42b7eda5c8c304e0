"""Helpers the export and quantize stages share: ONNX artifact folders, graph op counts and the
comparison of two runtimes on real task inputs."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.data import Collator, EncodedDataset, dev_split, eval_loader, get_task, load_glue, sample_data_dir
from pipeline.data.tasks import TaskSpec
from pipeline.errors import BertforgeError
from pipeline.inference import is_onnx_artifact, onnx_file
from pipeline.models import load_config

ONNX_FILE = "model.onnx"  # one graph per folder, the name optimum's ORTModel opens by default
# config and tokenizer files an ONNX folder carries over from its source
SUPPORT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                 "merges.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model", "added_tokens.json")


def onnx_path(folder: str | Path) -> Path:
    """The graph of an ONNX artifact folder; a clear error for anything else."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BertforgeError(f"model folder {folder} does not exist")
    if not is_onnx_artifact(folder):
        raise BertforgeError(f"{folder} holds no .onnx file (export it first: bertforge export --model {folder} --out DIR)")
    path = folder / onnx_file(folder)
    check_onnx(path)
    return path


def check_onnx(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as e:  # onnx raises its own types for truncated or non-ONNX files
        raise BertforgeError(f"{path} is not a valid ONNX model: {str(e).strip().splitlines()[0][:200]}") from None


def copy_support_files(src: str | Path, dst: Path) -> None:
    """config.json and the tokenizer files, without a PyTorch-only `auto_map` (no modeling code in an ONNX
    folder; the per-layer sizes stay in the config as a record)."""
    for name in SUPPORT_FILES:
        if (Path(src) / name).is_file():
            shutil.copy(Path(src) / name, dst / name)
    config_path = dst / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        if config.pop("auto_map", None) is not None:
            config_path.write_text(json.dumps(config, indent=2) + "\n")


def op_counts(model) -> dict[str, int]:
    """Operator types of a graph (a path or a ModelProto), most frequent first."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False) if not hasattr(model, "graph") else model
    return dict(Counter(n.op_type for n in proto.graph.node).most_common())


def resolve_task(model_dir: str | Path, task: str | None) -> TaskSpec | None:
    """The task given, else the one the model was fine-tuned on (config.finetuning_task)."""
    name = task or getattr(load_config(model_dir), "finetuning_task", None)
    if not name:
        return None
    try:
        return get_task(name)
    except BertforgeError:
        if task:
            raise
        return None


def task_examples(task: TaskSpec | None, glue_dir, split: str | None = None, limit: int | None = None):
    """Real inputs: the task's split (default dev); without a task, the bundled SST-2 sample sentences."""
    if task is None:
        examples = load_glue("sst2", "dev", sample_data_dir())
    else:
        examples = load_glue(task.name, split or dev_split(task), glue_dir)
    return examples[:limit] if limit else examples


def batches(examples, tokenizer, max_length: int, batch_size: int, input_names=None):
    """Numpy feeds with dynamic padding (varying batch and sequence sizes exercise the dynamic axes)."""
    loader = eval_loader(EncodedDataset(examples, tokenizer, max_length), Collator(tokenizer, False), batch_size)
    for batch in loader:
        batch.pop("idx")
        batch.pop("labels", None)
        yield {k: v.numpy().astype(np.int64) for k, v in batch.items() if input_names is None or k in input_names}


def compare_runtimes(reference, candidate, examples, max_length: int, batch_size: int = 32) -> dict:
    """Largest absolute logit difference and the share of identical predicted labels."""
    diffs, agree, n, regression = [], 0, 0, reference.config.num_labels == 1
    for feed in batches(examples, reference.tokenizer, max_length, batch_size):
        a, b = reference(feed), candidate(feed)
        diffs.append(float(np.abs(a - b).max()))
        if not regression:
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += len(a)
    return {"examples": n, "max_abs_diff": max(diffs) if diffs else 0.0,
            "label_agreement": None if regression else agree / max(n, 1)}
