"""GLUE data layer: tasks, loaders, metrics and batching.

Tasks and loaders are plain Python; metrics (scipy, scikit-learn) and batching (torch) load on first use,
so a slim serving install (`bertforge[serve]`, no torch) can still read task names and the GLUE layout.
"""
from pipeline.data.glue import (GLUE_DIR_HELP, Example, default_data_dir, load_examples_file, load_glue, load_train_examples,
                                sample_data_dir, write_examples_file)
from pipeline.data.tasks import GLUE_TASKS, TASKS, TaskSpec, dev_split, get_task

_LAZY = {"compute_metrics": "metrics", "logits_to_predictions": "metrics", "Collator": "encode",
         "EncodedDataset": "encode", "eval_loader": "encode", "train_loader": "encode"}

__all__ = [
    "GLUE_DIR_HELP", "GLUE_TASKS", "TASKS", "TaskSpec", "Example", "default_data_dir", "dev_split", "get_task",
    "load_examples_file", "load_glue", "load_train_examples", "sample_data_dir", "write_examples_file", *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"pipeline.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'pipeline.data' has no attribute {name!r}")
